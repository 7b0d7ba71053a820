"""What lowbit may write where: the output contract, and atomic writes on top of :mod:`swap`.

The contract (README, "Safety"):

- lowbit replaces only what it created. An existing model output (``compile -o``, ``export -o``)
  is replaced only if it is a previous lowbit output -- a directory holding lowbit's
  ``report.json`` or ``lowbit_export.json``, a ``.onnx`` whose ``metadata_props`` carry
  ``lowbit.version`` -- or an empty directory, or with ``--force``; a symbolic link only with
  ``--force`` (the link is replaced, never its target).
- A file is never replaced by a directory nor the reverse, an output never contains its input,
  and lowbit's export cache is never an output (``--force`` or not).
- Everything is written beside its target and renamed into place by a journaled :class:`Swap`, so
  an error, a signal or a kill leaves the old entry or the new one, never a mix (see :mod:`swap`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from lowbit.files.swap import Swap, recover
from lowbit.errors import LowbitError

__all__ = ["atomic_path", "check_model_output", "check_writable_parent", "file_output_names", "normalized", "read_json",
           "recover_around"]

# ORT-format companions of NAME.onnx: NAME.ort and this config (lowbit.ort.ort_format writes them)
CONFIG_SUFFIX = ".required_operators_and_types.config"


def normalized(path: str | os.PathLike) -> Path:
    """Absolute, with ``.``/``..`` folded but symbolic links kept (``-o .`` names the directory)."""
    return Path(os.path.abspath(os.fspath(path)))


def check_writable_parent(path: Path) -> None:
    path = normalized(path)
    if path.parent == path:
        raise LowbitError(f"{path}: not a path lowbit can write (no parent directory)")
    parent = path.parent
    if not parent.is_dir():
        raise LowbitError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LowbitError(f"output directory {parent} is not writable")


def recover_around(*paths: str | os.PathLike) -> None:
    """Finish or undo interrupted swaps beside ``paths`` (and inside them, for directories)."""
    seen = set()
    for p in paths:
        p = normalized(p)
        for d in (p.parent, p) if p.is_dir() else (p.parent,):
            if d not in seen and d.is_dir():
                seen.add(d)
                recover(d)


def read_json(path: Path, what: str) -> object:
    """A JSON file somebody else wrote, parsed; LowbitError saying why ``path`` is not ``what``
    (unreadable, not UTF-8, not JSON, nested too deeply, a number past Python's digit limit)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise LowbitError(f"{path}: cannot read it ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not {what} (not UTF-8 text, byte {e.start})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LowbitError(f"{path}: not {what} (not valid JSON: {e.msg}, line {e.lineno} column {e.colno})") from e
    except (ValueError, RecursionError) as e:
        raise LowbitError(f"{path}: not {what} (not JSON lowbit can read: {type(e).__name__})") from e


def _is_lowbit_report(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "lowbit_version" in data


def is_lowbit_output(path: Path) -> bool:
    """A directory or ``.onnx`` file lowbit wrote (see the module docstring)."""
    if path.is_symlink():
        return False
    if path.is_dir():
        return _is_lowbit_report(path / "report.json") or (path / "lowbit_export.json").is_file()
    if path.is_file() and path.suffix == ".onnx":
        if _is_lowbit_report(path.with_name(f"{path.stem}.report.json")):
            return True
        import onnx

        with contextlib.suppress(Exception):
            model = onnx.load(str(path), load_external_data=False)
            return any(p.key == "lowbit.version" for p in model.metadata_props)
    return False


def file_output_names(path: Path, *, ort_format: bool = False) -> list[str]:
    """The entries a ``.onnx`` output owns in its directory: the model first, then its external
    data, reports and (with ``ort_format``, or when a previous output has one) the ``.ort`` files.
    One swap replaces them together."""
    stem = path.stem
    names = [path.name, f"{path.name}.data", f"{stem}.report.json", f"{stem}.report.md", f"{stem}.report.html"]
    if ort_format or os.path.lexists(path.with_suffix(".ort")):
        names += [f"{stem}.ort", f"{stem}{CONFIG_SUFFIX}"]
    return names


def check_model_output(out: str | os.PathLike, *, is_dir: bool, sources: tuple[Path, ...] = (),
                       force: bool = False, cache: Path | None = None) -> Path:  # fmt: skip
    """Refuse an output path that would replace something lowbit did not create (module docstring).

    ``sources``: the input paths (an output equal to one of them is an in-place compile, allowed;
    one that contains an input is refused). ``cache``: lowbit's export cache, never an output.
    For a new ``.onnx`` output, an existing file it would own beside it (``NAME.onnx.data``,
    ``NAME.report.md``, ...) is somebody else's too. Returns the normalized output path.
    """
    path = normalized(out)
    check_writable_parent(path)
    real = path.resolve()
    if cache is not None and real.is_relative_to(cache.resolve()):
        raise LowbitError(f"-o {out} is inside lowbit's export cache ({cache}): choose a path outside it")
    resolved = [(src, normalized(src).resolve()) for src in sources]
    in_place = any(real == src_real for _, src_real in resolved)
    for src, src_real in resolved:
        if not in_place and src_real.is_relative_to(real):
            raise LowbitError(f"-o {out} contains the input {src}: lowbit never replaces a directory holding its input"
                              + (f" (to compile it in place: lowbit compile {src.parent} -o {src.parent})"
                                 if src.name == "model.onnx" else ""))  # fmt: skip
    if not os.path.lexists(path):
        taken = [n for n in file_output_names(path)[1:] if os.path.lexists(path.parent / n)] if not is_dir else []
        if taken and not force:
            raise LowbitError(f"-o {out}: {path.parent / taken[0]} already exists and lowbit did not write it "
                              f"beside a {path.name}: refusing to replace it (choose a new path, or pass --force)")
        return path
    if path.is_symlink():
        if not force:
            raise LowbitError(f"-o {out} is a symbolic link: lowbit replaces only what it wrote (pass --force to "
                              "replace the link itself; its target is never touched)")  # fmt: skip
        return path
    if is_dir and not path.is_dir():
        raise LowbitError(f"-o {out} is an existing file and the output is a directory: lowbit never replaces a "
                          "file by a directory (name a new directory, or a .onnx file)")  # fmt: skip
    if not is_dir and path.is_dir():
        raise LowbitError(f"-o {out} is an existing directory and the output is a .onnx file: lowbit never "
                          "replaces a directory by a file")  # fmt: skip
    if in_place or force or is_lowbit_output(path) or (path.is_dir() and not any(path.iterdir())):
        return path
    what = "directory" if is_dir else "file"
    raise LowbitError(f"-o {out} is an existing {what} that lowbit did not write: refusing to replace it "
                      "(choose a new path, or pass --force)")  # fmt: skip


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a path to write ``dest``'s new content at (an empty directory for ``is_dir``); on
    success it replaces ``dest`` by a journaled swap, on any exception nothing changes."""
    dest = normalized(dest)
    check_writable_parent(dest)
    with Swap(dest.parent, [dest.name]) as swap:
        tmp = swap.new_path(dest.name)
        if is_dir:
            tmp.mkdir()
        yield tmp
