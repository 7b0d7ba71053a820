"""Throughput of lowbit.formats encode + nibble packing on a 4096 x 4096 float32 matrix.

``python -m lowbit.bench.formats_bench`` prints a Markdown section; :func:`run` returns it (the
lead places it in bench/RESULTS.md). Goal (issue 3): under 0.5 s each for NVFP4 and dINT4.

Cases: NVFP4 (E2M1, E4M3 block scales of 16, FP32 global scale) and dINT4 (per block of 32 and
per row), absmax scales, blocks along the last axis (``axis=-1``, activations/[N, K] weights)
and along the first (``axis=0``, an ONNX MatMul weight [K, N]). The input is standard normal
(seed 0; the lookup-table encoder's time does not depend on the values). Timing: wall time of
``pack_nibbles(encode(x, ...).codes)`` after one warm-up call (which builds the encoder's lookup
table), median (and min) of ``repeats`` runs, single process, numpy's own threading only.
"""

from __future__ import annotations

__all__ = ["run", "main", "CASES"]

import os
import platform
import statistics
import time

import numpy as np

from lowbit.formats import encode, pack_nibbles

SHAPE = (4096, 4096)
GOAL_S = 0.5
# (label, format, axis, block_size)
CASES = (
    ("NVFP4, blocks of 16 along axis -1", "nvfp4", -1, None),
    ("NVFP4, blocks of 16 along axis 0", "nvfp4", 0, None),
    ("dINT4, blocks of 32 along axis -1", "dint4", -1, 32),
    ("dINT4, blocks of 32 along axis 0", "dint4", 0, 32),
    ("dINT4, one scale per row", "dint4", -1, None),
)


def _time_case(x: np.ndarray, fmt: str, axis: int, block: int | None, repeats: int) -> list[float]:
    pack_nibbles(encode(x, fmt, axis, block).codes)  # warm-up: builds the lookup table once
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pack_nibbles(encode(x, fmt, axis, block).codes)
        times.append(time.perf_counter() - t0)
    return times


def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"machine: {cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
            f"numpy {np.__version__}, load average at start {load}")


def run(repeats: int = 5, shape: tuple[int, int] = SHAPE) -> str:
    """Measure every case and return the Markdown section (header, table, machine line)."""
    machine = _machine()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    rows = []
    for label, fmt, axis, block in CASES:
        times = _time_case(x, fmt, axis, block, repeats)
        med = statistics.median(times)
        mbps = x.nbytes / med / 1e6
        rows.append(f"| {label} | {med:.3f} | {min(times):.3f} | {mbps:.0f} | "
                    f"{'yes' if med < GOAL_S else 'NO'} |")
    return "\n".join([
        f"## lowbit.formats: encode + pack of a {shape[0]} x {shape[1]} float32 matrix",
        "",
        f"`python -m lowbit.bench.formats_bench` - median of {repeats} runs after a warm-up; "
        f"goal < {GOAL_S} s each.",
        "",
        "| case | median s | min s | input MB/s | < 0.5 s |",
        "|---|---|---|---|---|",
        *rows,
        "",
        machine,
        "",
    ])


def main() -> int:
    print(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
