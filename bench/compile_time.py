"""Compile time of a lowbit recipe against ONNX Runtime's ``quantize_static`` on the same
calibration windows, measured back to back, alternating which goes first, and written to
bench/COMPILE_TIME.md with lowbit's per-pass seconds and its observation-run counts.

``lowbit-bench compile-time [--recipe w4a8-dint4] [--rounds 2] [-o FILE]``. Both tools get the
recipe's ``calibration.windows`` windows of ``calibration.seq_len`` tokens from the calibration
split; both times include writing the model. The load average is recorded at every build (two
shared cores: read the ratio of each round, not the absolute seconds).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from lowbit.bench.contender import BuildContext
from lowbit.bench.runner import machine_line

__all__ = ["DEFAULT_OUTPUT", "add_arguments", "measure", "run"]

log = logging.getLogger(__name__)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "COMPILE_TIME.md"


def _lowbit(fp32_dir: Path, recipe: str, windows: list, work: Path) -> tuple[float, dict]:
    from lowbit.compiler.api import compile

    start = time.perf_counter()
    result = compile(fp32_dir, recipe, calibration=windows)
    result.save(work / "model")
    return time.perf_counter() - start, result.report


def _ort(fp32_dir: Path, windows: list, work: Path) -> float:
    from lowbit.bench.contenders import CONTENDERS

    ctx = BuildContext(feeds=tuple({"input_ids": w[None, :]} for w in windows), windows=windows, work_dir=work,
                       description="", peer_windows=len(windows))  # fmt: skip
    return CONTENDERS["ort-w8a8"].build(fp32_dir, ctx)[1]


def measure(recipe: str, rounds: int) -> str:
    from lowbit.core.recipe import load_recipe
    from lowbit.models import data
    from lowbit.models.export import export_model
    from lowbit.models.registry import load_tokenizer

    spec = load_recipe(recipe).calibration
    fp32_dir = export_model("smollm2-135m")
    windows = list(data.calibration_windows(load_tokenizer(fp32_dir), spec.seq_len, spec.windows))
    rows, reports = [], []
    with tempfile.TemporaryDirectory(prefix="lowbit-compile-time-") as root:
        for r in range(rounds):
            order = ("ort", "lowbit") if r % 2 == 0 else ("lowbit", "ort")
            times, loads = {}, {}
            for who in order:
                work = Path(root) / f"{who}-{r}"
                work.mkdir()
                loads[who] = os.getloadavg()[0]
                log.info("round %d: %s", r + 1, who)
                if who == "ort":
                    times[who] = _ort(fp32_dir, windows, work)
                else:
                    times[who], report = _lowbit(fp32_dir, recipe, windows, work)
                    reports.append(report)
            rows.append((r + 1, " then ".join(order), times["lowbit"], times["ort"], loads))
    lines = [
        f"# Compile time: lowbit `{recipe}` vs ONNX Runtime `quantize_static`", "",
        f"Command: `lowbit-bench compile-time --recipe {recipe} --rounds {rounds}`", "",
        f"Machine: {machine_line()}", "",
        f"SmolLM2-135M, {spec.windows} calibration windows x {spec.seq_len} tokens for both; ORT: QDQ W8A8 "
        "(MatMul/Gemm, MinMax, per-channel weights); times include writing the model.", "",
        "| round | order | lowbit s | ORT s | lowbit / ORT | load avg (lowbit, ORT) |",
        "|---|---|---|---|---|---|",
    ]
    for n, order, lb, ortt, loads in rows:
        lines.append(f"| {n} | {order} | {lb:.1f} | {ortt:.1f} | {lb / ortt:.2f} x | "
                     f"{loads['lowbit']:.1f}, {loads['ort']:.1f} |")  # fmt: skip
    last = reports[-1]
    lines += ["", f"lowbit passes (last round; observation runs: {last.get('observation', {})}):", "",
              "| pass | seconds |", "|---|---|"]  # fmt: skip
    lines += [f"| {p['pass']} | {p['seconds']:.2f} |" for p in last["passes"] if p["seconds"] >= 0.05]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="w4a8-dint4", help="lowbit recipe to time (default w4a8-dint4)")
    parser.add_argument("--rounds", type=int, default=2, help="back-to-back rounds, alternating order (default 2)")
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), metavar="FILE",
                        help=f"report to write (default {DEFAULT_OUTPUT})")


def run(args: argparse.Namespace) -> int:
    from lowbit.bench.cli_bench import check_report_path
    from lowbit.core.recipe import load_recipe
    from lowbit.errors import LowbitError
    from lowbit.files.fsutil import atomic_path

    # everything checkable is checked now, not after minutes of compiling
    out = Path(args.output)
    check_report_path(out)
    load_recipe(args.recipe)
    if args.rounds < 1:
        raise LowbitError(f"--rounds must be >= 1, got {args.rounds}")
    text = measure(args.recipe, args.rounds)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    print(text)
    return 0
