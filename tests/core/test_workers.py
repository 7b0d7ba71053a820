"""lowbit.core.workers: a signal stops a pass promptly -- queued tasks are dropped, and a run whose
worker is inside a call that cannot be stopped exits (after its exit handlers) without waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lowbit.core.workers import call_on, worker_pool

_HANG_COMMAND = '''
import time
from lowbit.core.workers import call_on, worker_pool
from lowbit.files.scratch import run_dir

def add_arguments(parser):
    pass

def run(args):
    print(run_dir(), flush=True)
    with worker_pool(1) as pool:
        call_on(pool, time.sleep, 600)  # stands for a LAPACK factor: no signal reaches it
'''


def test_worker_pool_drops_queued_tasks_when_its_body_raises():
    release, ran = threading.Event(), []
    with pytest.raises(KeyboardInterrupt):
        with worker_pool(1) as pool:
            pool.submit(release.wait, 60)  # running: the pool's only thread
            for i in range(3):
                pool.submit(ran.append, i)  # queued behind it
            raise KeyboardInterrupt
    release.set()
    pool.shutdown(wait=True)
    assert ran == []


def test_call_on_returns_the_result_from_a_pool_thread():
    with worker_pool(2) as pool:
        assert call_on(pool, lambda a, b: (a + b, threading.current_thread() is threading.main_thread()), 2, 3) == (5, False)


def test_sigterm_exits_a_run_whose_worker_cannot_be_stopped(tmp_path):
    """The program's own run (argv from its command line): SIGTERM while the main thread waits on a
    worker stuck for 10 minutes exits with 128 + 15, the scratch directory removed by the exit
    handlers; it does not wait for the worker."""
    (tmp_path / "hang_command.py").write_text(_HANG_COMMAND)
    code = ("import sys; from lowbit.compiler.cli import main; "
            "sys.exit(main(commands={'hang': ('hang_command', 'a worker that never returns')}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, "hang"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)  # fmt: skip
    try:
        scratch = Path(proc.stdout.readline().strip())
        assert scratch.is_dir()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)  # the worker sleeps 600 s
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "lowbit hang: interrupted (SIGTERM)" in err
    assert not scratch.exists()
