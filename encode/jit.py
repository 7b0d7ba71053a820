"""numba, with its on-disk cache in a directory only this user controls. Import numba from here.

``@numba.njit(cache=True)`` needs a writable cache directory when the function is *decorated*, i.e.
when the module is imported: numba tries ``$NUMBA_CACHE_DIR``, then ``__pycache__`` beside the
source file, then ``~/.cache/numba`` (``$XDG_CACHE_HOME``), and raises ``RuntimeError: cannot cache
function ... no locator available`` when none is writable -- a read-only install with an
unwritable ``$HOME`` (a service account, a container) could not even import the compiler.

So, before numba is imported and only when ``NUMBA_CACHE_DIR`` is unset (or empty), it is pointed
at ``$LOWBIT_CACHE/numba`` (default ``~/.cache/lowbit/numba``) if that is a directory this user
owns that nobody else can write into, along a path nobody else can rename (every ancestor owned
by this user or root, and not group/world writable unless sticky); otherwise at a fresh private
(0700) temporary directory removed at exit, so kernels are then compiled once per process. Never a
shared path such as ``/tmp/numba``: cached machine code planted there by another user would run
in this process. A cache directory outside the package also keeps installs read-only.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

__all__ = ["numba", "numba_cache_dir"]

logger = logging.getLogger(__name__)


def _trusted(path: Path) -> bool:
    """``path`` is a real directory of this user, writable by nobody else, on a path nobody else
    can swap (ancestors owned by this user or root, not group/world writable unless sticky)."""
    uid = os.geteuid()
    try:
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
            return False
        for parent in path.parents:
            pst = parent.lstat()
            if stat.S_ISLNK(pst.st_mode):
                pst = parent.stat()  # e.g. /home -> /usr/home: judge the directory it names
            if pst.st_uid not in (uid, 0) or (pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX):
                return False
        with tempfile.TemporaryFile(dir=path):  # writable in fact (read-only mounts, ACLs)
            pass
    except OSError:
        return False
    return True


def _user_cache() -> Path | None:
    from lowbit.files.paths import cache_root

    try:
        path = Path(os.path.abspath(cache_root() / "numba"))
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (OSError, RuntimeError):  # RuntimeError: no home directory to expand "~" with
        return None
    return path if _trusted(path) else None


def _remove(path: Path, pid: int) -> None:
    if os.getpid() == pid:  # a forked child must not remove its parent's directory
        shutil.rmtree(path, ignore_errors=True)


def numba_cache_dir() -> str:
    """Set ``NUMBA_CACHE_DIR`` (module docstring) unless the user did; return it."""
    chosen = os.environ.get("NUMBA_CACHE_DIR")
    if chosen:
        return chosen
    path = _user_cache()
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="lowbit-numba-"))  # mode 0700, a fresh name
        atexit.register(_remove, path, os.getpid())
        logger.info("no private writable numba cache under $LOWBIT_CACHE; compiling kernels into %s", path)
    os.environ["NUMBA_CACHE_DIR"] = str(path)
    return str(path)


_cache_dir = numba_cache_dir()
if "numba" in sys.modules:  # imported before us: its config was read without our directory
    from numba.core import config as _config

    if not _config.CACHE_DIR:
        _config.CACHE_DIR = _cache_dir

import numba  # noqa: E402 - after NUMBA_CACHE_DIR is set: numba reads it at import
