"""Resumable compiles: the results of a compile's costly per-block steps (OPTQ's rounding) are kept
on disk until the compile finishes, so the same compile started again after an interruption
(Ctrl-C, a killed process, a reboot) takes them instead of computing them again.

Assumes the steps it serves are deterministic functions of what their key hashes.
Guarantees:
- a result is reused only when everything it was computed from hashes the same (the weights,
  the statistics, the settings, the source code that computes it), so a resumed compile writes the bytes an
  uninterrupted one writes, and a changed input, recipe or calibration text simply misses;
- writes are atomic (a temporary file renamed into place): a kill leaves a whole result or none;
- one directory per compile (input, recipe and calibration data), inside lowbit's cache, never
  beside the user's files; the compiler removes it once the compile has succeeded, and
  directories nobody touched for :data:`STALE_DAYS` days are swept.

Why not a checkpoint of the whole compile state: the graph, the analyses and the report of a
half-done compile are many objects that point at each other; rebuilding them from the input is
cheap (canonicalization, rotations, the observation run: a quarter of a 1B compile), rounding
is not, and a content key cannot go stale the way a saved graph can.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np

from lowbit.files.paths import cache_root

__all__ = ["STALE_DAYS", "ResumeStore", "code_digest", "content_key", "resume_store"]

logger = logging.getLogger(__name__)

STALE_DAYS = 14


def code_digest(*packages: str) -> str:
    """A hash of the source files of ``packages`` (dotted names under lowbit): a result computed
    by other code -- an upgrade between the interruption and the resume -- never matches."""
    import importlib

    h = hashlib.blake2b(digest_size=20)
    for name in packages:
        folder = Path(importlib.import_module(name).__file__).parent
        for path in sorted(folder.glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def content_key(*parts: object) -> str:
    """A hash of ``parts``: arrays by dtype, shape and bytes, anything else by its ``repr``."""
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        if isinstance(part, np.ndarray):
            array = np.ascontiguousarray(part)
            h.update(f"{array.dtype.str}{array.shape}".encode())
            h.update(memoryview(array).cast("B"))
        else:
            h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


class ResumeStore:
    """Named groups of arrays under content keys, in ``directory`` (module doc)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.hits = self.stored = 0
        self.found = sum(1 for _ in directory.glob("*.npz")) if directory.is_dir() else 0

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``, or None (never stored, or unreadable: recomputed)."""
        path = self.directory / f"{key}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in stored.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            logger.warning("resume: %s is unreadable (%s); computing it again", path.name, e)
            return None
        self.hits += 1
        return arrays

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{key}.{os.getpid()}.tmp.npz"
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, self.directory / f"{key}.npz")
        except OSError as e:  # a full disk costs the resume, not the compile
            logger.warning("resume: cannot keep a result in %s (%s)", self.directory, e.strerror)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        self.stored += 1

    def finish(self) -> None:
        """The compile succeeded: nothing needs resuming."""
        shutil.rmtree(self.directory, ignore_errors=True)


def resume_store(*identity: object, root: Path | None = None) -> ResumeStore:
    """The store of the compile that ``identity`` names (input, recipe, calibration data), under
    ``root`` (default ``<lowbit cache>/resume``); stale stores of other compiles are swept."""
    root = root or cache_root() / "resume"
    _sweep(root)
    return ResumeStore(root / content_key(*identity))


def _sweep(root: Path) -> None:
    """Remove the stores (directories named by a content key) nobody touched for STALE_DAYS;
    anything else under ``root`` is not lowbit's and stays."""
    cutoff = time.time() - STALE_DAYS * 86400
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            if not _is_key(entry.name):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink() and entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)


def _is_key(name: str) -> bool:
    return len(name) == 40 and all(c in "0123456789abcdef" for c in name)
