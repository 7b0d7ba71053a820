"""Journaled replacement of entries of one directory, safe at every instant of SIGINT/SIGTERM/SIGKILL.

Owns the only way lowbit puts a file or directory in place. New entries are written into a hidden
staging directory beside their targets, ``.NAME.lowbit-swap-XXXXXXXX/`` (same filesystem, so every
move is an atomic rename), which holds ``new/`` (what is being written), ``backup/`` (what it
replaces) and ``journal.json``. The staging directory is locked (``flock``) by its process for as
long as it lives. Commit, with SIGINT/SIGTERM/SIGHUP held back until it is over:

1. ``journal.json`` records every entry (``prepared``);
2. per entry: the old target is renamed into ``backup/``, the new one renamed into place;
3. ``journal.json`` says ``committed``: the commit point;
4. ``backup/`` and the staging directory are removed (at once, or, for an in-place compile whose
   compiled model still reads the old weights, by :meth:`Swap.finish` when that is done).

A process killed anywhere leaves a staging directory nobody holds. :func:`recover` (every lowbit
command runs it on the directories it touches) puts the old entries back when the journal does not
say ``committed`` and removes the backups when it does, and says which in one line. The state is
read from which paths exist, so a kill between any two renames is recoverable.

Test hooks: ``LOWBIT_TEST_SWAP_TRACE=FILE`` appends every step reached to FILE;
``LOWBIT_TEST_SWAP_PAUSE=STEP`` pauses for ``LOWBIT_TEST_SWAP_PAUSE_SECONDS`` (default 30) after
STEP (``staged``, ``prepared``, ``aside:NAME``, ``installed:NAME``, ``committed``), printing
``lowbit: swap paused at STEP`` on stderr, so that the tests can signal or kill the process at
every step.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lowbit.files.scratch import is_held

__all__ = ["Swap", "recover", "remove_entry"]

logger = logging.getLogger(__name__)

MARK = ".lowbit-swap-"
_INIT = ".lowbit-init-"
_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def remove_entry(path: Path) -> None:
    """Remove a file, a link (not its target) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP: a swap's renames and its rollback are never cut halfway. The
    handlers are swapped, not the signal mask: any thread may receive a signal, and Python runs
    its handler in the main thread whatever that thread's mask. A deferred signal is re-sent to
    this process under the original handlers when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread, which is where they run
        return
    pending: list[int] = []
    old = {s: signal.getsignal(s) for s in _HELD_SIGNALS}
    for s in _HELD_SIGNALS:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if pending:
            os.kill(os.getpid(), pending[0])


def _pause(step: str) -> None:
    if trace := os.environ.get("LOWBIT_TEST_SWAP_TRACE"):
        with open(trace, "a", encoding="utf-8") as f:
            f.write(step + "\n")
    if os.environ.get("LOWBIT_TEST_SWAP_PAUSE") == step:
        print(f"lowbit: swap paused at {step}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("LOWBIT_TEST_SWAP_PAUSE_SECONDS", "30")))


class Swap:
    """Replace ``names`` (entries of ``directory``) by what the caller writes at :meth:`new_path`.

    Use as a context manager: the body writes the new entries; a normal exit commits, an exception
    (KeyboardInterrupt included) discards them and leaves every target as it was. An entry left
    unwritten is removed by the commit (its old target goes to the backup). ``keep_backup``: the
    old entries stay readable at :meth:`backup_path` until :meth:`finish` (or process exit).
    """

    def __init__(self, directory: Path, names: list[str], *, keep_backup: bool = False) -> None:
        self.directory = Path(directory)
        self.names = list(dict.fromkeys(names))
        self.keep_backup = keep_backup
        self.staging: Path | None = None
        self._fd: int | None = None

    def __enter__(self) -> Swap:
        label = self.names[0][:80]
        init = Path(tempfile.mkdtemp(prefix=f"{_INIT}{label}.", dir=self.directory))
        self._fd = os.open(init, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.staging = init.with_name(f".{label}{MARK}{init.name.rsplit('.', 1)[-1]}")
        os.rename(init, self.staging)  # now visible to recover(), and held
        (self.staging / "new").mkdir()
        (self.staging / "backup").mkdir()
        return self

    def new_path(self, name: str) -> Path:
        return self.staging / "new" / name

    def backup_path(self, name: str) -> Path:
        return self.staging / "backup" / name

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            with _signals_held():
                self.finish()
            return
        self.commit()

    def commit(self) -> None:
        entries = [{"name": n, "existed": os.path.lexists(self.directory / n),
                    "staged": os.path.lexists(self.new_path(n))} for n in self.names]  # fmt: skip
        journal = {"state": "prepared", "pid": os.getpid(), "entries": entries}
        committed = False
        try:
            _pause("staged")  # the last instant a signal still discards the new entries at once
            with _signals_held():
                _write_json(self.staging / "journal.json", journal)
                _pause("prepared")
                for e in entries:
                    name = e["name"]
                    if e["existed"]:
                        os.rename(self.directory / name, self.backup_path(name))
                        _pause(f"aside:{name}")
                    if e["staged"]:
                        os.rename(self.new_path(name), self.directory / name)
                        _pause(f"installed:{name}")
                _write_json(self.staging / "journal.json", {**journal, "state": "committed"})
                committed = True
                _pause("committed")
        finally:  # a signal held back above is delivered here, after the commit point or before it
            if not committed:
                with _signals_held():
                    _roll_back(self.directory, self.staging, entries)
                    self.finish()
            elif self.keep_backup:
                atexit.register(self.finish)
            else:
                self.finish()

    def finish(self) -> None:
        """Drop the staging directory (the backups with it) and its lock."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _roll_back(directory: Path, staging: Path, entries: list[dict]) -> None:
    """Put every moved-aside entry back; remove what was installed where nothing stood."""
    for e in reversed(entries):
        target, backup = directory / e["name"], staging / "backup" / e["name"]
        if os.path.lexists(backup):  # the target was moved aside: what stands there now is new
            if os.path.lexists(target):
                remove_entry(target)
            os.rename(backup, target)
        elif not e["existed"] and e["staged"] and not os.path.lexists(staging / "new" / e["name"]):
            if os.path.lexists(target):
                remove_entry(target)


_STAGING_ENTRIES = frozenset({"new", "backup", "journal.json", "journal.json.tmp"})


def _is_staging(path: Path) -> bool:
    """Only a directory laid out as a Swap lays it out is ever touched by recovery."""
    try:
        return {p.name for p in path.iterdir()} <= _STAGING_ENTRIES
    except OSError:
        return False


def recover(directory: Path) -> list[str]:
    """Finish or undo every swap in ``directory`` whose process died; one message per swap."""
    directory = Path(directory)
    messages = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return messages
    for staging in entries:
        name = staging.name
        if staging.is_symlink() or not staging.is_dir():
            continue
        if name.startswith(_INIT):  # killed in the microseconds between mkdtemp and lock: empty
            if time.time() - staging.lstat().st_mtime > 60 and not is_held(staging):
                shutil.rmtree(staging, ignore_errors=True)
            continue
        if not (name.startswith(".") and MARK in name) or not _is_staging(staging) or is_held(staging):
            continue
        try:
            journal = json.loads((staging / "journal.json").read_text(encoding="utf-8"))
            state, swapped = journal["state"], journal["entries"]
        except (OSError, ValueError, KeyError, TypeError):
            state, swapped = "staging", []  # killed before the journal: nothing was moved
        targets = ", ".join(str(directory / e["name"]) for e in swapped) or "its output"
        if state == "committed":
            message = f"completed an interrupted lowbit replacement of {targets} (removed the old copy)"
        else:
            _roll_back(directory, staging, swapped)
            message = (f"restored {targets} after an interrupted lowbit run"
                       if any(e.get("existed") for e in swapped) else
                       f"removed the unfinished output of an interrupted lowbit run ({targets})")  # fmt: skip
        shutil.rmtree(staging, ignore_errors=True)
        logger.warning("%s", message)
        messages.append(message)
    return messages
