"""Where lowbit keeps what it caches between runs (exports, Fisher files, numba kernels)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """``$LOWBIT_CACHE``, default ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")).expanduser()
