"""Atomic output: write to a temporary sibling, rename into place only on success.

A failed or interrupted command never leaves a half-written file or directory behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lowbit.errors import LowbitError

__all__ = ["atomic_path", "check_writable_parent"]


def check_writable_parent(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise LowbitError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LowbitError(f"output directory {parent} is not writable")


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, *, is_dir: bool = False, keep_old: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success move it onto ``dest``.

    For ``is_dir=True`` the yielded path is an empty directory; an existing ``dest``
    directory is replaced only after the new one is complete, and moved to ``keep_old`` (a path
    that does not exist yet, on the same filesystem) instead of being deleted when that is given.
    """
    dest = Path(dest)
    check_writable_parent(dest)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    tmp = tmp_root / dest.name
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if is_dir and dest.exists():
            old = keep_old if keep_old is not None else tmp_root / (dest.name + ".old")
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
