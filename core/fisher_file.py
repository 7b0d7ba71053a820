"""The Fisher side file's layout (``weight/<site>`` [out, in], ``act/<site>`` [in], ``meta/*``):
checked from the archive's headers before anything runs, and read with one-line errors.

Owns the file format only; who computes the Fisher is :mod:`lowbit.models.fisher` (torch), who
uses it is :mod:`lowbit.passes.fisher`.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

__all__ = ["ACT_PREFIX", "META_PREFIX", "WEIGHT_PREFIX", "check_fisher_file", "load_fisher", "reading"]

WEIGHT_PREFIX, ACT_PREFIX, META_PREFIX = "weight/", "act/", "meta/"


def check_fisher_file(path: str | os.PathLike, label: str = "Fisher side file") -> Path:
    """Refuse, naming ``label``, anything but a regular file holding an npz in the layout of
    :mod:`lowbit.models.fisher`: ``weight/<site>`` 2-D and ``act/<site>`` 1-D real-number arrays
    (at least one ``weight/``), ``meta/*`` anything but objects, each array's data as long as its
    header says. Reads the archive's directory and each array's header only, not the data (whose
    values -- finite, >= 0 -- and shapes against the model are checked where they are read)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LowbitError(f"{label}: {path} does not exist") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise LowbitError(f"{label}: cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise LowbitError(f"{label}: {path} is a directory, not a numpy .npz file")
    if not stat.S_ISREG(st.st_mode):
        raise LowbitError(f"{label}: {path} is not a regular file")
    weights = 0
    with reading(path, label), zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            key = info.filename.removesuffix(".npy")
            if key == info.filename:
                raise LowbitError(f"{label}: {path} holds {key!r}, which is not a numpy array (.npy)")
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"array {key!r} has .npy format version {version}")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                header = f.tell()
            if key.startswith(META_PREFIX):
                ok = not dtype.hasobject
            else:
                ndim = 2 if key.startswith(WEIGHT_PREFIX) else 1 if key.startswith(ACT_PREFIX) else None
                if ndim is None:
                    raise LowbitError(f"{label}: {path} holds array {key!r}; a Fisher file has weight/<site>, "
                                      "act/<site> and meta/ entries only")  # fmt: skip
                ok = dtype.kind in "fiu" and len(shape) == ndim
                weights += key.startswith(WEIGHT_PREFIX)
            if not ok:
                raise LowbitError(f"{label}: {path}: array {key!r} is {dtype} of shape {shape}; expected "
                                  f"{'a 2-D [out, in]' if key.startswith(WEIGHT_PREFIX) else 'a 1-D [in]'} float array")  # fmt: skip
            nbytes = math.prod(shape) * dtype.itemsize
            if info.file_size != header + nbytes:  # numpy would allocate what the header claims
                raise LowbitError(f"{label}: {path}: array {key!r} holds {info.file_size - header} data bytes, "
                                  f"not the {nbytes} its header ({dtype}, shape {shape}) says")  # fmt: skip
    if not weights:
        raise LowbitError(f"{label}: {path} holds no weight/<site> arrays (see lowbit.models.fisher)")
    return path


@contextlib.contextmanager
def reading(path: Path, label: str) -> Iterator[None]:
    """What numpy and zipfile raise on a corrupt npz, as a one-line error naming ``label``."""
    try:
        yield
    except LowbitError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise LowbitError(f"{label}: {path} is not a readable numpy .npz file ({reason})") from None


def load_fisher(path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """(Fisher dict, source description) from a side file (:func:`lowbit.models.fisher.save_fisher`)."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"Fisher side file {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        fisher = {k: data[k] for k in data.files if not k.startswith(META_PREFIX)}
        source = str(data["meta/source"]) if "meta/source" in data.files else str(path)
    bad = [k for k, v in fisher.items() if not np.isfinite(v).all() or (v < 0).any()]
    if bad:
        raise LowbitError(f"Fisher side file {path}: non-finite or negative values in {bad[:3]}")
    return fisher, source
