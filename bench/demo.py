"""``lowbit-bench demo`` (what ``make demo`` runs): export SmolLM2-135M, compile it with the default
recipe, and evaluate FP32 vs lowbit vs ONNX Runtime's own quantizers (static W8A8, 4-bit weight-only
RTN) side by side on the same windows -- the bench's SmolLM2 section, restricted to those four.
Then the deployable form: the recipe compiled for ``ort-cpu``, its size and speed beside FP32 and
the best local peers, and a sample it generates."""

from __future__ import annotations

import argparse

__all__ = ["DEFAULT_RECIPE", "add_arguments", "run"]

# The best W4A8 recipe (dINT4 blocks of 32 + OPTQ, AQAS, RPTQ int8 activations; bench/RESULTS.md),
# shown next to ONNX Runtime's own static W8A8 and its 4-bit weight-only RTN.
DEFAULT_RECIPE = "w4a8-dint4"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"lowbit recipe to demo (default {DEFAULT_RECIPE})")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens (default 4)")


def run(args: argparse.Namespace) -> int:
    from lowbit.bench.contenders import CONTENDERS
    from lowbit.bench.runner import BenchConfig, smollm2_section
    from lowbit.core.recipe import load_recipe
    from lowbit.errors import LowbitError

    name = f"lowbit-{args.recipe}"
    if name not in CONTENDERS:
        known = ", ".join(c.removeprefix("lowbit-") for c in CONTENDERS if c.startswith("lowbit-"))
        raise LowbitError(f"demo: no bench contender for recipe {args.recipe!r} (known: {known})")
    # the recipe's own calibration count, shared with ORT's quantize_static: the demo shows what the bench shows
    windows = load_recipe(args.recipe).calibration.windows
    cfg = BenchConfig(eval_windows=args.windows, calib_windows=windows, peer_calib_windows=windows,
                      contenders=("fp32", name, "ort-w8a8", "ort-w4-rtn"))  # fmt: skip
    print("lowbit demo: SmolLM2-135M export -> compile -> evaluate (first run exports, ~1-2 min)", flush=True)
    print(smollm2_section(cfg))
    print(deployable_section(args.recipe), flush=True)
    return 0


def deployable_section(recipe: str) -> str:
    """What a user deploys: the recipe compiled for ``ort-cpu`` from the KV-cache export, its file
    size, prefill and decode speed (1 thread, one round) beside FP32, ONNX Runtime's int4 and, if
    its venv is set up, llama.cpp's Q4_K_M; then a greedy sample through ``lowbit generate``."""
    import tempfile
    from pathlib import Path

    from lowbit.bench.deploy_bench import build_contenders, speed_rows, speed_table
    from lowbit.core.recipe import load_recipe
    from lowbit.errors import LowbitError
    from lowbit.models.generate import SamplingOptions, generate

    try:
        load_recipe(recipe, ["target=ort-cpu"])
    except LowbitError as e:
        return f"\n(no deployable ort-cpu form of {recipe}: {e})"
    print(f"\ndeployable form: compiling {recipe} for ort-cpu from the KV-cache export, then timing it", flush=True)
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as tmp:
        contenders, missing = build_contenders(Path(tmp), recipe=recipe, qdq=False, peers={"llamacpp": ("q4_k_m",)})
        best = speed_rows(contenders, (1,), rounds=1, repeats=10)[0]["best"]
        deployed = contenders[f"lowbit-{recipe}-ort-cpu"][1]
        sample = generate(deployed, "The capital of France is", SamplingOptions(max_new_tokens=24), threads=1)
        lines = [f"## Deployable: {recipe} for ort-cpu (1 thread; the full run is `lowbit-bench deploy`)", "",
                 *speed_table(contenders, best), ""]  # fmt: skip
        if missing:
            lines += ["Not measured: " + "; ".join(missing), ""]
        lines += [f"`lowbit generate OUT \"The capital of France is\" -n 24`: The capital of France is{sample.text}",
                  f"({sample.summary()})"]  # fmt: skip
    return "\n".join(lines)
