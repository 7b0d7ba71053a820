"""Bounded resources: a compile's memory does not grow with the size of ``--calib-text``.

Before: a 16 MiB calibration text took 3 GB of memory for the 72 tokens it needed, 64 MiB aborted
the process. The text is now read and tokenized a chunk at a time, only until the windows are
full. Measured as the peak resident set of the compile process (``wait4``'s rusage).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import TEXT, make_model_dir

CALIB = ["-r", "w8a8", "--set", "calibration.seq_len=64", "--set", "calibration.windows=2",
         "--set", "calibration.slac_windows=0"]  # fmt: skip


def _peak_rss_mib(args: list[str], cwd: Path) -> float:
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    return usage.ru_maxrss / 1024  # KiB on Linux


def test_calibration_memory_does_not_grow_with_the_text(tmp_path):
    m = make_model_dir(tmp_path / "m")
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(TEXT)
    with large.open("w") as f:  # 64 MiB
        for _ in range(64 * 1024 * 1024 // len(TEXT) + 1):
            f.write(TEXT)
    assert large.stat().st_size >= 64 * 1024 * 1024
    base = _peak_rss_mib(["compile", str(m), "-o", str(tmp_path / "a"), "--calib-text", str(small), *CALIB], tmp_path)
    big = _peak_rss_mib(["compile", str(m), "-o", str(tmp_path / "b"), "--calib-text", str(large), *CALIB], tmp_path)
    assert big < base + 64, (base, big)  # within one chunk's worth of noise, not 3 GB


def test_evaluation_text_is_streamed_too(tmp_path):
    from lowbit.models import data

    class CountingTokenizer:
        chars = 0

        def __call__(self, text, add_special_tokens=False):
            CountingTokenizer.chars += len(text)
            return {"input_ids": [ord(c) % 64 for c in text]}

    path = tmp_path / "big.txt"
    with path.open("w") as f:
        for _ in range(4000):  # ~9 MB
            f.write(TEXT)
    windows = data.evaluation_windows(CountingTokenizer(), 128, 4, text_file=path)
    assert windows.shape == (4, 128)
    assert CountingTokenizer.chars <= data.CHUNK_CHARS  # one chunk of the 9 MB held the 512 tokens
    whole = data.token_windows(CountingTokenizer(), path.read_text(), 128, 4)
    assert (windows == whole).all()
