"""Per-weight sensitivities (g^2) for FGMP, in the orientation of each site's stored initializer.

Two sources, chosen by ``precision.sensitivity`` (the report records which one was used):

- ``fisher``: the empirical Fisher diagonal (squared gradients of the LM loss, see
  :mod:`lowbit.models.fisher`), read from ``precision.fisher_file`` or, when the compiled input is
  a shipped model name, computed with torch on the calibration windows and cached under
  ``$LOWBIT_CACHE/fisher``. Side-file arrays are in torch orientation [out, in]; dynamo exports
  store MatMul weights as [in, out] (reduction axis 0), so those are transposed here.
- ``proxy`` (any bare ONNX model): g^2[i, j] = sum over calibration tokens of x_i^2, i.e.
  diag(X^T X) of the site's input along the reduction axis, broadcast over output channels. It is
  the second moment of the output error ``dW x`` when input channels are uncorrelated, and needs
  only ``ChannelStats.sq_sum`` from calibration.

``auto`` takes ``fisher`` when it is available (a side file, a shipped model, or a lowbit export
directory of one) and else ``proxy``.
Read-only: no graph edits. Values are float32, finite, >= 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.compiler.context import CompileContext
from lowbit.errors import LowbitError
from lowbit.passes.linear_sites import LinearSite

__all__ = ["Sensitivity", "activation_fisher", "check_fisher_file", "fisher_for_site", "proxy_for_site",
           "site_sensitivities"]

logger = logging.getLogger(__name__)

_WEIGHT_PREFIX = "weight/"  # the key layout of lowbit.models.fisher (not imported: it is torch-side)
_ACT_PREFIX, _META_PREFIX = "act/", "meta/"


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
    with _reading(path, label), zipfile.ZipFile(path) as archive:
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
            if key.startswith(_META_PREFIX):
                ok = not dtype.hasobject
            else:
                ndim = 2 if key.startswith(_WEIGHT_PREFIX) else 1 if key.startswith(_ACT_PREFIX) else None
                if ndim is None:
                    raise LowbitError(f"{label}: {path} holds array {key!r}; a Fisher file has weight/<site>, "
                                      "act/<site> and meta/ entries only")  # fmt: skip
                ok = dtype.kind in "fiu" and len(shape) == ndim
                weights += key.startswith(_WEIGHT_PREFIX)
            if not ok:
                raise LowbitError(f"{label}: {path}: array {key!r} is {dtype} of shape {shape}; expected "
                                  f"{'a 2-D [out, in]' if key.startswith(_WEIGHT_PREFIX) else 'a 1-D [in]'} float array")  # fmt: skip
            nbytes = math.prod(shape) * dtype.itemsize
            if info.file_size != header + nbytes:  # numpy would allocate what the header claims
                raise LowbitError(f"{label}: {path}: array {key!r} holds {info.file_size - header} data bytes, "
                                  f"not the {nbytes} its header ({dtype}, shape {shape}) says")  # fmt: skip
    if not weights:
        raise LowbitError(f"{label}: {path} holds no weight/<site> arrays (see lowbit.models.fisher)")
    return path


@contextlib.contextmanager
def _reading(path: Path, label: str) -> Iterator[None]:
    """What numpy and zipfile raise on a corrupt npz, as a one-line error naming ``label``."""
    try:
        yield
    except LowbitError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise LowbitError(f"{label}: {path} is not a readable numpy .npz file ({reason})") from None


@dataclass(frozen=True)
class Sensitivity:
    kind: str  # "fisher" | "proxy"
    source: str  # where the values came from (file, model, or "diag(X^T X) from calibration")
    by_site: dict[str, np.ndarray]  # site name -> g^2 shaped like the stored initializer


def fisher_for_site(fisher: dict[str, np.ndarray], site: LinearSite) -> np.ndarray:
    """The site's Fisher array from a side-file dict, oriented like its stored initializer."""
    key = f"{_WEIGHT_PREFIX}{site.name}"
    if key not in fisher:
        raise LowbitError(f"the Fisher side file has no entry for site {site.name!r} (key {key!r})")
    g2 = np.asarray(fisher[key], np.float32)
    shape = tuple(site.weight.const_value.shape)
    # torch orientation is [out, in]; the stored initializer is [out, in] iff reduction axis is 1
    oriented = g2 if site.reduction_axis == 1 else g2.T
    if oriented.shape != shape:
        raise LowbitError(f"Fisher for {site.name} has shape {g2.shape} (torch [out, in]); the ONNX "
                          f"weight is {shape} with reduction axis {site.reduction_axis}")
    return np.ascontiguousarray(oriented)


def proxy_for_site(sq_sum: np.ndarray, site: LinearSite) -> np.ndarray:
    """diag(X^T X) of the input, broadcast along the output axis of the stored weight."""
    shape = tuple(site.weight.const_value.shape)
    sq = np.asarray(sq_sum, np.float32)
    if sq.shape != (shape[site.reduction_axis],):
        raise LowbitError(f"calibration statistics of {site.name} have {sq.shape} channels, weight is {shape}")
    view = sq[:, None] if site.reduction_axis == 0 else sq[None, :]
    return np.ascontiguousarray(np.broadcast_to(view, shape))


def site_sensitivities(ctx: CompileContext, sites: list[LinearSite]) -> Sensitivity:
    """g^2 for every site in ``sites`` from the source the recipe asks for (module doc)."""
    spec = ctx.recipe.precision
    fisher, source = None, ""
    if spec.sensitivity in ("auto", "fisher"):
        fisher, source = _fisher_dict(ctx)
        if fisher is None and spec.sensitivity == "fisher":
            raise LowbitError("precision.sensitivity = 'fisher' needs precision.fisher_file or a shipped "
                              "model as input (its torch weights give the gradients)")
    if fisher is not None:
        return Sensitivity("fisher", source, {s.name: fisher_for_site(fisher, s) for s in sites})
    if not ctx.has("activation_stats"):
        raise LowbitError("the diag(X^T X) sensitivity proxy needs calibration statistics: give calibration "
                          "data, or a Fisher file (precision.fisher_file)")
    stats = ctx.get("activation_stats")
    by_site = {}
    for s in sites:
        channel = stats.by_value.get(s.input.name)
        if channel is None or channel.sq_sum is None:
            raise LowbitError(f"no calibration statistics for the input of {s.name}; the proxy needs them")
        by_site[s.name] = proxy_for_site(channel.sq_sum, s)
    return Sensitivity("proxy", "diag(X^T X) of each site input over the calibration windows", by_site)


def _fisher_dict(ctx: CompileContext) -> tuple[dict[str, np.ndarray] | None, str]:
    from lowbit.models.fisher import load_fisher  # numpy-only helpers; torch is imported lazily

    path = _fisher_path(ctx)
    if path is None:
        return None, ""
    label = "recipe key 'precision.fisher_file'" if ctx.recipe.precision.fisher_file else "cached Fisher file"
    check_fisher_file(path, label)  # also when the file changed since the recipe was loaded
    with _reading(path, label):
        return load_fisher(path)


def _fisher_path(ctx: CompileContext) -> Path | None:
    """The side file to use: the recipe's, or the cached (computed on first use) Fisher of a
    shipped model; None when neither applies."""
    from lowbit.models.registry import SHIPPED

    spec = ctx.recipe.precision
    if spec.fisher_file:
        return Path(spec.fisher_file)
    name = _torch_source(str(ctx.report.get("input", "")))
    if name not in SHIPPED or ctx.calibration is None or not ctx.calibration.windows:
        return None
    path = _cache_path(name, np.stack(ctx.calibration.windows))
    if not path.is_file():
        _compute(name, np.stack(ctx.calibration.windows), path)
    return path


def activation_fisher(ctx: CompileContext, site: LinearSite) -> np.ndarray | None:
    """The Fisher of the site's input channels (``act/<site>``, shape [in]) when the recipe's
    sensitivity is a Fisher side file; None for the proxy (no gradients known)."""
    if ctx.recipe.precision.sensitivity == "proxy":
        return None
    path = _fisher_path(ctx)
    if path is None:
        return None
    key = f"{_ACT_PREFIX}{site.name}"
    with _reading(path, "Fisher side file"), np.load(path, allow_pickle=False) as data:  # lazy: reads only this array
        if key not in data.files:
            raise LowbitError(f"the Fisher side file {path} has no activation entry {key!r}")
        g2 = np.asarray(data[key], np.float32)
    if g2.shape != (site.in_features,):
        raise LowbitError(f"activation Fisher of {site.name} has shape {g2.shape}, expected ({site.in_features},)")
    if not np.isfinite(g2).all() or (g2 < 0).any():
        raise LowbitError(f"the Fisher side file {path}: non-finite or negative values in {key!r}")
    return g2


def _torch_source(label: str) -> str:
    """The shipped model behind an input: its name, or the source recorded in a lowbit export
    directory (``lowbit_export.json``, dynamo exports only: their site names are torch paths)."""
    meta = Path(label) / "lowbit_export.json"
    if label and meta.is_file():
        info = json.loads(meta.read_text())
        return str(info.get("model", "")) if not info.get("with_past") else ""
    return label


def _cache_path(model: str, windows: np.ndarray) -> Path:
    from lowbit.models.export import cache_root

    digest = hashlib.sha256(np.ascontiguousarray(windows, np.int64).tobytes()).hexdigest()[:16]
    return cache_root() / "fisher" / f"{model}-{digest}.npz"


def _compute(model: str, windows: np.ndarray, path: Path) -> None:
    from lowbit.models.fisher import empirical_fisher, save_fisher
    from lowbit.models.registry import load_torch_model, resolve_model

    logger.info("computing the empirical Fisher of %s on %d windows (torch)", model, len(windows))
    torch_model = load_torch_model(resolve_model(model))
    path.parent.mkdir(parents=True, exist_ok=True)
    fisher = empirical_fisher(torch_model, windows)
    save_fisher(fisher, path, source=f"empirical Fisher (torch autograd) of {model} on "
                                    f"{windows.shape[0]}x{windows.shape[1]} calibration tokens")
