"""``lowbit-bench scale``: peak resident memory and compile time against model size, on synthetic
decoders of real shapes (:mod:`lowbit.models.synthetic_llm`), written to ``bench/SCALE.md`` with a
plot (``bench/SCALE.png``).

Each compile runs as its own ``lowbit compile`` process, so its peak resident memory is the
kernel's figure for that process alone (``wait4``'s ``ru_maxrss``). The bound the scale issue sets
is ``3 GB + 1.5 x the largest block's weights`` (float32, as lowbit computes): a decoder layer's
linear weights, or the embedding / untied head table when that is larger.

Random weights say nothing about accuracy: SmolLM2 and MiniLM (``bench/RESULTS.md``) stay the
accuracy references.

``lowbit-bench scale [--cases smollm2-135m,llama-3.2-1b:4,...] [--recipes w8a8-rptq,w4a8-dint4]
[--windows 4] [--work DIR] [-o FILE]``; a case is ``SHAPE[:LAYERS][@float16]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from lowbit.bench.runner import machine_line
from lowbit.errors import LowbitError
from lowbit.models.synthetic_llm import SHAPES, DecoderShape, write_decoder

__all__ = ["DEFAULT_CASES", "DEFAULT_OUTPUT", "add_arguments", "run"]

log = logging.getLogger(__name__)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "SCALE.md"
DEFAULT_CASES = "smollm2-135m,llama-3.2-1b:4,llama-3.2-1b:8,llama-3.2-1b,llama-3.2-3b,llama-3-8b@float16"
BASE_GB = 3.0


@dataclass(frozen=True)
class Case:
    shape: DecoderShape
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.shape.name} ({self.shape.layers} layers, {self.dtype})"

    @property
    def directory_name(self) -> str:
        return f"{self.shape.name}-{self.shape.layers}l-{self.dtype}"

    def largest_block_bytes(self) -> int:
        """Float32 bytes of the largest block: one layer's linear weights, or a vocabulary table."""
        s = self.shape
        layer = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * s.head_dim + 3 * s.hidden * s.ffn
        return 4 * max(layer, s.vocab * s.hidden)


def parse_case(text: str) -> Case:
    name, _, dtype = text.partition("@")
    name, _, layers = name.partition(":")
    if name not in SHAPES:
        raise LowbitError(f"unknown shape {name!r} in --cases (known: {', '.join(SHAPES)})")
    if dtype not in ("", "float32", "float16"):
        raise LowbitError(f"case {text!r}: the dtype after @ must be float32 or float16")
    shape = SHAPES[name]
    if layers:
        if not layers.isdigit() or int(layers) < 1:
            raise LowbitError(f"case {text!r}: the layer count after : must be a positive integer")
        shape = replace(shape, layers=int(layers))
    return Case(shape, dtype or "float32")


def _compile(model_dir: Path, out: Path, recipe: str, windows: int) -> dict:
    """One compile in its own process: wall seconds, its peak resident MB and its report."""
    cmd = [sys.executable, "-m", "lowbit", "compile", str(model_dir), "-o", str(out), "-r", recipe,
           "--set", f"calibration.windows={windows}"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        last = output.strip().splitlines()[-1] if output.strip() else f"exit code {proc.returncode}"
        return {"error": last, "seconds": seconds, "peak_mb": usage.ru_maxrss / 1024}
    report = json.loads((out / "report.json").read_text())
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, "report": report}


def _row(case: Case, recipe: str, result: dict, windows: int) -> dict:
    params = case.shape.parameters()
    bound_mb = (BASE_GB * 1024) + 1.5 * case.largest_block_bytes() / 2**20
    row = {"case": case.label, "recipe": recipe, "params_b": params / 1e9, "seconds": result["seconds"],
           "peak_mb": result["peak_mb"], "bound_mb": bound_mb, "error": result.get("error"), "windows": windows}  # fmt: skip
    report = result.get("report")
    if report:
        blockwise = report.get("blockwise") or {}
        row["blockwise"] = bool(blockwise)
        row["segments"] = blockwise.get("segments")
        row["passes"] = {p["pass"]: p["seconds"] for p in report["passes"] if p["seconds"] >= 0.5}
        row["inner"] = blockwise.get("passes", {})
        row["resident_mb_after_block"] = blockwise.get("resident_mb", [])
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| model | recipe | parameters | calibration windows | block-wise | peak RSS GB | bound GB | within | compile s | s per B params | time by pass (s) |",
             "|---|---|---:|---:|:-:|---:|---:|:-:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['case']} | {r['recipe']} | {r['params_b']:.2f} B | {r['windows']} | - | {r['peak_mb'] / 1024:.2f} | "
                         f"{r['bound_mb'] / 1024:.2f} | - | {r['seconds']:.0f} | - | failed: {r['error']} |")  # fmt: skip
            continue
        passes = {**{k: v for k, v in r["passes"].items() if k != "BlockwisePass"}, **r.get("inner", {})}
        if "BlockwisePass" in r["passes"]:  # the rest of a block-wise run is its segment-by-segment observation
            passes["Observe"] = r["passes"]["BlockwisePass"] - sum(r.get("inner", {}).values())
        by_pass = ", ".join(f"{k.removesuffix('Pass')} {v:.0f}" for k, v in sorted(passes.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {r['case']} | {r['recipe']} | {r['params_b']:.2f} B | {r['windows']} | {'yes' if r['blockwise'] else 'no'} | "
                     f"{r['peak_mb'] / 1024:.2f} | {r['bound_mb'] / 1024:.2f} | {'yes' if r['peak_mb'] <= r['bound_mb'] else 'NO'} | "
                     f"{r['seconds']:.0f} | {r['seconds'] / r['params_b']:.0f} | {by_pass} |")  # fmt: skip
    return "\n".join(lines) + "\n\nCalibration windows of 512 tokens; every other recipe setting as shipped.\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(11, 4))
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        ok = sorted((r for r in rows if r["recipe"] == recipe and not r["error"]), key=lambda r: r["params_b"])
        mem.plot([r["params_b"] for r in ok], [r["peak_mb"] / 1024 for r in ok], "o-", label=f"{recipe} peak RSS")
        sec.plot([r["params_b"] for r in ok], [r["seconds"] for r in ok], "o-", label=recipe)
    bound = sorted(rows, key=lambda r: r["params_b"])
    mem.plot([r["params_b"] for r in bound], [r["bound_mb"] / 1024 for r in bound], "k--", label="bound: 3 GB + 1.5 x largest block")
    mem.set(xlabel="parameters (billions)", ylabel="peak resident memory (GB)", title="memory")
    sec.set(xlabel="parameters (billions)", ylabel="compile time (s, 2 cores)", title="time")
    mem.legend(fontsize=8)
    sec.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated SHAPE[:LAYERS][@float16] (default {DEFAULT_CASES})")
    parser.add_argument("--recipes", default="w8a8-rptq,w4a8-dint4", help="comma-separated recipes")
    parser.add_argument("--windows", type=int, default=4, help="calibration windows per compile (default 4)")
    parser.add_argument("--work", default=None, help="directory for the synthetic models and outputs (kept; default a temporary one)")
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), help="markdown file to write")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of the previous run (its .json beside the output) that this run does not redo")


def _previous_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """The rows and commands of an earlier run's ``.json`` (for ``--append``)."""
    from lowbit.files.fsutil import read_json

    earlier = read_json(path, "a lowbit-bench scale result")
    if not (isinstance(earlier, dict) and isinstance(earlier.get("rows"), list) and isinstance(earlier.get("commands"), list)):
        raise LowbitError(f"{path}: not a lowbit-bench scale result (no rows and commands): --append needs the .json it wrote")
    return earlier["rows"], earlier["commands"]


def run(args: argparse.Namespace) -> int:
    import tempfile

    from lowbit.bench.cli_bench import check_report_path
    from lowbit.core.recipe import load_recipe
    from lowbit.files.fsutil import atomic_path

    # Validate everything now, not after an hour of compiling.
    cases = [parse_case(c.strip()) for c in args.cases.split(",") if c.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not cases or not recipes:
        raise LowbitError("--cases and --recipes each need at least one entry")
    for recipe in recipes:
        load_recipe(recipe)  # an unknown name is a one-line error
    if args.windows < 1:
        raise LowbitError("--windows must be at least 1")
    output = Path(args.output)
    results, plot = output.with_suffix(".json"), output.with_suffix(".png")
    for path in (output, results, plot):
        check_report_path(path)
    rows, commands = _previous_rows(results) if args.append and results.is_file() else ([], [])
    redo = {(c.label, r) for c in cases for r in recipes}
    rows = [r for r in rows if (r["case"], r["recipe"]) not in redo]
    with tempfile.TemporaryDirectory(prefix="lowbit-scale-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = machine_line()
        for case in cases:
            model_dir = work / case.directory_name
            if not (model_dir / "model.onnx").is_file():  # reused when there (read only)
                write_decoder(case.shape, model_dir, dtype=case.dtype)
            for recipe in recipes:
                out = work / f"{case.directory_name}-{recipe}"
                log.info("compiling %s with %s", case.label, recipe)
                result = _compile(model_dir, out, recipe, args.windows)
                rows.append(_row(case, recipe, result, args.windows))
                print(f"{case.label} {recipe}: {rows[-1]['peak_mb'] / 1024:.2f} GB peak, {result['seconds']:.0f} s"
                      + (f" FAILED: {result['error']}" if result.get("error") else ""), flush=True)  # fmt: skip
                if "error" not in result:  # this run's compile wrote it (a failed one may have met a user's directory)
                    _remove_output(out)
    commands.append({"command": f"lowbit-bench scale --cases {args.cases} --recipes {args.recipes} --windows {args.windows}"
                                + (" --append" if args.append else ""), "machine": started})  # fmt: skip
    ran = "\n".join(f"- `{c['command']}` -- {c['machine']}" for c in commands)
    text = (f"# lowbit at scale: peak memory and compile time\n\nCommands (machine, start):\n\n{ran}\n\n"
            f"{_table(rows)}\n![peak memory and time against parameters]({plot.name})\n\n"
            "Weights are random (`lowbit.models.synthetic_llm`): these runs measure memory and time, not accuracy.\n")  # fmt: skip
    with atomic_path(plot) as tmp_plot:
        _plot(rows, tmp_plot)
    with atomic_path(results) as tmp_results:
        tmp_results.write_text(json.dumps({"rows": rows, "commands": commands}, indent=1))
    with atomic_path(output) as tmp_output:
        tmp_output.write_text(text)
    print(f"wrote {output}")
    return 0


def _remove_output(out: Path) -> None:
    """A compiled output this run wrote into its work directory (only ever lowbit's own)."""
    import shutil

    from lowbit.files.fsutil import is_lowbit_output

    if is_lowbit_output(out):
        shutil.rmtree(out)
