"""Peer tools in their own virtual environments (protocol: ``bench/peers/PROTOCOL.md``).

A peer lives in ``bench/peers/<name>/`` as ``requirements.txt`` (exact pins) and ``run.py`` (a
standalone script). :func:`setup` creates ``<cache>/peer-venvs/<name>`` with the interpreter that
runs lowbit and installs the pins (``lowbit-bench peers-setup``, run by ``make bench``, never by
``make test``); a stamp holding the pins' hash makes a re-run a no-op until the pins change.
:class:`PeerTool` runs ``run.py`` in that venv: ``configs``, ``build``, ``logits``, ``speed``. The
peer never grades itself: it hands back logits, and the bench scores them like everyone's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import LowbitError

__all__ = ["PEERS_DIR", "PeerTool", "PeerUnavailable", "peer_names", "venv_dir", "setup", "add_arguments", "run"]

PEERS_DIR = Path(__file__).resolve().parent / "peers"
log = logging.getLogger(__name__)


class PeerUnavailable(LowbitError):
    """A peer configuration that cannot run here (not set up, or the peer says why)."""


def peer_names() -> list[str]:
    """Peers shipped in ``bench/peers`` (a folder with run.py and requirements.txt), sorted."""
    return sorted(p.name for p in PEERS_DIR.iterdir() if (p / "run.py").is_file() and (p / "requirements.txt").is_file())


def venv_dir(name: str) -> Path:
    from lowbit.files.paths import cache_root

    return cache_root() / "peer-venvs" / name


def _pins_digest(name: str) -> str:
    return hashlib.sha256((PEERS_DIR / name / "requirements.txt").read_bytes()).hexdigest()[:16]


def _stamp(name: str) -> Path:
    return venv_dir(name) / ".lowbit-peer-installed"


def is_set_up(name: str) -> bool:
    stamp = _stamp(name)
    return stamp.is_file() and stamp.read_text().strip() == _pins_digest(name)


def setup(names: list[str]) -> None:
    """Create (or bring up to date) each peer's venv; progress on stderr, LowbitError naming the
    peer whose install failed."""
    for name in names:
        if is_set_up(name):
            log.info("peer %s: venv up to date (%s)", name, venv_dir(name))
            continue
        venv = venv_dir(name)
        log.info("peer %s: creating %s and installing %s", name, venv, PEERS_DIR / name / "requirements.txt")
        venv.parent.mkdir(parents=True, exist_ok=True)
        # an existing venv is brought up to the pins (pip skips what is already satisfied)
        steps = [] if (venv / "bin" / "python").is_file() else [[sys.executable, "-m", "venv", str(venv)]]
        steps.append([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                      "-r", str(PEERS_DIR / name / "requirements.txt")])
        for cmd in steps:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, check=False)
            if done.returncode:
                raise LowbitError(f"peer {name}: `{' '.join(cmd[-3:])}` failed (exit {done.returncode}); see the output above")
        _stamp(name).write_text(_pins_digest(name) + "\n")


@dataclass(frozen=True)
class PeerTool:
    """One peer's run.py, run in its venv."""

    name: str

    def _run(self, *args: str, capture: bool = False, quiet: bool = False, cwd: Path | None = None) -> str:
        """run.py ARGS in the peer's venv, in ``cwd`` (the build's own directory: some tools write
        side files into their working directory) or the system's temporary directory."""
        if not is_set_up(self.name):
            raise PeerUnavailable(f"not set up: run `lowbit-bench peers-setup {self.name}`")
        cmd = [str(venv_dir(self.name) / "bin" / "python"), str(PEERS_DIR / self.name / "run.py"), *args]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.DEVNULL if quiet else None, text=True, env=env, check=False,
                              cwd=str(cwd or tempfile.gettempdir()))
        if done.returncode:
            raise LowbitError(f"peer {self.name}: run.py {args[0]} failed (exit {done.returncode}); see its output above")
        return done.stdout or ""

    def configs(self, kind: str = "causal-lm") -> list[str]:
        """The configurations offered for causal LMs, or (``kind="encoder"``) for encoders; a peer
        whose run.py knows no ``--kind`` offers none for encoders."""
        if kind == "encoder":
            try:
                return list(json.loads(self._run("configs", "--kind", "encoder", capture=True, quiet=True).strip().splitlines()[-1]))
            except LowbitError:
                return []
        return list(json.loads(self._run("configs", capture=True).strip().splitlines()[-1]))

    def build(self, config: str, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
        """Build ``config`` into ``out_dir`` from ``inputs`` (onnx, hf, gguf, calib for causal LMs;
        onnx and calib-feeds for encoders); its result.json, or PeerUnavailable with the peer's reason."""
        args = ["build", "--config", config, "--out", str(out_dir)]
        if "calib-feeds" in inputs:
            args += ["--kind", "encoder"]
        for key, value in inputs.items():
            args += [f"--{key}", str(value)]
        self._run(*args, cwd=out_dir)
        result = json.loads((out_dir / "result.json").read_text())
        if "unavailable" in result:
            raise PeerUnavailable(str(result["unavailable"]))
        return result

    def logits(self, out_dir: Path, windows: np.ndarray, scratch: Path) -> Iterator[np.ndarray]:
        """Each window's ``[T, V]`` logits, read back one window at a time from the peer's file."""
        win, out = scratch / f"{self.name}-windows.npy", scratch / f"{self.name}-logits.npy"
        np.save(win, np.asarray(windows, dtype=np.int64))
        try:
            self._run("logits", "--out", str(out_dir), "--windows", str(win), "--logits", str(out), cwd=scratch)
            logits = np.load(out, mmap_mode="r")
            if logits.shape[:2] != windows.shape:
                raise LowbitError(f"peer {self.name}: logits {logits.shape} for windows {windows.shape}")
            for row in logits:
                yield np.asarray(row, dtype=np.float32)
            del logits
        finally:
            for f in (win, out):
                f.unlink(missing_ok=True)

    def speed(self, out_dir: Path, prompt: np.ndarray, new_tokens: int, threads: int, scratch: Path) -> dict[str, Any]:
        f = scratch / f"{self.name}-prompt.npy"
        np.save(f, np.asarray(prompt, dtype=np.int64))
        try:
            out = self._run("speed", "--out", str(out_dir), "--prompt", str(f), "--new-tokens", str(new_tokens),
                            "--threads", str(threads), capture=True, cwd=scratch)
        finally:
            f.unlink(missing_ok=True)
        return json.loads(out.strip().splitlines()[-1])


def add_arguments(parser: Any) -> None:
    parser.add_argument("peers", nargs="*", metavar="PEER", help=f"peers to set up (default all in {PEERS_DIR})")


def run(args: Any) -> int:
    """``lowbit-bench peers-setup [PEER ...]``."""
    known = peer_names()
    names = args.peers or known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LowbitError(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(known)}")
    setup(names)
    for n in names:
        print(f"{n}: {venv_dir(n)}")
    return 0
