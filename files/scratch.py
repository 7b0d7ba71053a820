"""One scratch directory per lowbit process, removed on every exit path, swept when left behind.

Owns every temporary file lowbit makes outside its output's parent directory (model copies for
ONNX Runtime sessions, Hugging Face staging directories, ...): they live in
``$TMPDIR/lowbit-run-XXXXXXXX/``, created on first use with mode 0700 and locked (``flock``) by the
process for as long as it lives. A normal exit, an exception, SIGINT and SIGTERM remove it
(``atexit``; the CLI turns SIGTERM into an exception so the handlers run). SIGKILL cannot be
caught: the kernel releases the lock, and the next lowbit run removes every ``lowbit-run-*``
directory of the same user that nobody holds.

A directory is created under a name the sweep ignores (``lowbit-init-*``) and renamed to its
``lowbit-run-*`` name only once locked, so a concurrent sweep never takes a directory that is
being set up.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["is_held", "run_dir", "scratch_dir", "sweep_stale"]

logger = logging.getLogger(__name__)

_PREFIX = "lowbit-run-"
_MARKER = ".lowbit-run"  # written first: a directory without it was not made by run_dir()
_lock = threading.Lock()
_state: dict[str, object] = {}  # "path": Path, "fd": int, "pid": int


def is_held(path: Path) -> bool:
    """Whether a live process holds ``path``'s ``flock`` (the lock dies with its process)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return True  # vanished or unreadable: not ours to touch
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we just took
    return False


def sweep_stale(root: Path | None = None) -> list[Path]:
    """Remove the ``lowbit-run-*`` directories of this user that :func:`run_dir` made (its marker
    file inside) and that no live process holds."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            if not entry.name.startswith(_PREFIX) or entry.is_symlink() or not entry.is_dir():
                continue
            if entry.lstat().st_uid != os.getuid() or not (entry / _MARKER).is_file() or is_held(entry):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d scratch directories of killed lowbit runs", len(removed))
    return removed


def run_dir() -> Path:
    """This process's scratch directory (created, locked and stale ones swept on first call)."""
    with _lock:
        if _state.get("pid") == os.getpid():
            return _state["path"]  # type: ignore[return-value]
        root = Path(tempfile.gettempdir())
        sweep_stale(root)
        init = Path(tempfile.mkdtemp(prefix="lowbit-init-", dir=root))  # mode 0700
        fd = os.open(init, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        (init / _MARKER).write_text(f"{os.getpid()}\n")
        path = init.with_name(_PREFIX + init.name.removeprefix("lowbit-init-"))
        os.rename(init, path)
        _state.update(path=path, fd=fd, pid=os.getpid())
        atexit.register(_remove, path, os.getpid())
        return path


def _remove(path: Path, pid: int) -> None:
    if os.getpid() != pid:  # a forked child must not remove its parent's directory
        return
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(_state.pop("fd"))  # type: ignore[arg-type]
    _state.clear()


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory inside :func:`run_dir`, removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=run_dir()) as tmp:
        yield Path(tmp)
