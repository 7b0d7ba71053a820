"""The portable (non-AVX2) kernels pass the same exactness and error-bound tests.

The kernel set is chosen once per process, so the MatMulLowbit test modules are re-run in a
child pytest with LOWBIT_ORT_ISA=scalar, which forces the baseline kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_scalar_kernels_pass_the_matmul_tests(native_lib):
    here = Path(__file__).parent
    env = dict(os.environ, LOWBIT_ORT_ISA="scalar")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(here / "test_matmul.py"), str(here / "test_mixed.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          cwd=here.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
