"""One recipe variant on SmolLM2-135M: compile time, pass times and perplexity, as the bench
measures them (the script behind the sweep tables of bench/RESULTS.md).

``python -m lowbit.bench.recipe_sweep w4a8-dint4 --set rounding.refit_scales=false``

Same FP32 export, calibration split (the recipe's ``calibration.windows`` windows) and 8 x 512
evaluation windows as ``lowbit-bench run``; perplexity at ORT_ENABLE_BASIC ("QDQ in float": the
quantization the graph describes) unless ``--default-options``. Prints one result line and the
seconds of each pass; a single contender, so not a side-by-side comparison.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import sys
import tempfile
import time
from pathlib import Path

FP32_MODEL = "smollm2-135m"


def main(argv: list[str] | None = None) -> int:
    """Run one sweep row; bad input (unknown recipe or key, bad value) is one line on stderr, exit 2."""
    from lowbit.errors import LowbitError

    try:
        print(sweep(argv))
    except LowbitError as e:
        print(f"recipe_sweep: error: {e}", file=sys.stderr)
        return 2
    return 0


def sweep(argv: list[str] | None = None) -> str:
    """The result line and the pass seconds of one recipe variant, as text."""
    import onnxruntime as ort

    import lowbit
    from lowbit.core.recipe import load_recipe
    from lowbit.models.data import calibration_windows, evaluation_windows
    from lowbit.models.evaluate import perplexity
    from lowbit.models.export import export_model
    from lowbit.models.registry import load_tokenizer

    ap = argparse.ArgumentParser(prog="python -m lowbit.bench.recipe_sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens (default 8)")
    ap.add_argument("--default-options", action="store_true", help="evaluate with ORT's default session options")
    args = ap.parse_args(argv)

    recipe = load_recipe(args.recipe, args.set)  # bad keys fail before the (first-run) export
    source = export_model(FP32_MODEL)
    tokenizer = load_tokenizer(source)
    calibration = calibration_windows(tokenizer, 512, recipe.calibration.windows)
    evaluation = evaluation_windows(tokenizer, 512, args.windows)
    fp32 = perplexity(source, evaluation).ppl
    start = time.perf_counter()
    compiled = lowbit.compile(source, args.recipe, calibration=calibration, overrides=args.set)
    seconds = time.perf_counter() - start
    options = ort.SessionOptions()
    if not args.default_options:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory(prefix="lowbit-sweep-") as tmp:
        path = Path(tmp) / "model.onnx"
        compiled.save(path)
        ppl = perplexity(path, evaluation, session_options=options).ppl
    run = "ORT default options" if args.default_options else "QDQ in float"
    line = (f"{args.recipe} {' '.join(args.set) or '(recipe as is)'}: ppl {ppl:.3f} ({run}), "
            f"{ppl / fp32:.4f} x FP32 {fp32:.4f}, compile {seconds:.1f} s")  # fmt: skip
    passes = ", ".join(f"{e['pass']} {e['seconds']:.1f}" for e in compiled.report["passes"] if e["seconds"] >= 0.05)
    return f"{line}\npass seconds: {passes}"


if __name__ == "__main__":
    sys.exit(main())
