"""Recipe variants on SmolLM2-135M, measured on the **tuning** texts: the only text on which a
recipe setting may be chosen -- pydoc's tuning split and the wiki text, a kind of text that is
neither calibrated on nor reported, so a setting that only fits the calibration text's kind shows
(the evaluation split and the news domain are for reporting).

One variant: ``python -m lowbit.bench.recipe_sweep w4a8-dint4 --set reorder.clusters=8``.
The sweep behind the recipes' settings: ``lowbit-bench tuning`` (:mod:`lowbit.bench.tuning`) runs
:data:`SWEEPS` and writes ``bench/TUNING.md`` (each recipe's candidates, their tuning perplexity, the setting chosen).

Same FP32 export and calibration split (the recipe's ``calibration.windows`` windows) as
``lowbit-bench run``; perplexity, KL and top-1 to FP32 on 8 x 512 windows of each tuning text at ORT_ENABLE_BASIC ("QDQ in float": the
quantization the graph describes) unless ``--default-options``.
"""

from __future__ import annotations

__all__ = ["candidate_overrides", "main", "measure", "SWEEPS"]

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FP32_MODEL = "smollm2-135m"
TUNING_TEXTS = ("pydoc", "wiki")  # models.data domains with a tuning split

# Run-time int8 scales per token and group of contiguous channels (after the RPTQ reorder).
_DYNAMIC_INT8 = [f"granularity=per_token_group,symmetric=true,group_size={g}" for g in (32, 64)]

# No rotation; R1 (residual stream) alone; R1 + R2 (heads) + the online Hadamard before down_proj.
_ROTATIONS = ["residual=false,heads=false,online=[]", "residual=true,heads=false,online=[]",
              'residual=true,heads=true,online=["gated_linear"]']

# recipe -> (the key swept, its candidate values); every other key stays as the recipe file has it.
# A key that names a whole section (no dot) takes candidates of one or more "field=value" joined by
# "," -- settings that only make sense together (e.g. dynamic activation groups need symmetric codes).
SWEEPS: dict[str, list[tuple[str, list[str]]]] = {
    "w4a8-dint4": [("rotate", _ROTATIONS), ("reorder.clusters", ["0", "8", "16", "32"]), ("calibration.windows", ["8", "16", "32"]),
                   ("activations", ["granularity=per_tensor,symmetric=false,group_size=0", *_DYNAMIC_INT8]),
                   ("rounding.damp", ["0.01", "0.1", "0.3"]), ("rounding.refit_scales", ["true", "false"]),
                   ("sites.exclude", ["[]", '["lm_head"]']), ("sites.int8_weights", ["[]", '["lm_head"]']),
                   ("sites.embeddings", ["float", "int8"]), ("calibration.sequential", ["false", "true"])],
    "w8a8-rptq": [("reorder.clusters", ["8", "16", "32"]), ("calibration.windows", ["8", "16", "32"]),
                  ("activations", ["granularity=per_tensor,symmetric=false,group_size=0", *_DYNAMIC_INT8]),
                  ("rounding.method", ["rtn", "optq"]), ("calibration.sequential", ["false", "true"])],
    "npu-w8a8": [("reorder.clusters", ["8", "16"]), ("smooth.method", ["none", "smoothquant"])],
    "w4a8-rot-kv4": [("kv", ["granularity=per_channel,range=percentile,dynamic_k=false,dynamic_v=false",
                             "granularity=per_channel,range=percentile,dynamic_k=true,dynamic_v=false",
                             "granularity=per_channel,range=percentile,dynamic_k=true,dynamic_v=true",
                             "granularity=per_head,range=percentile,dynamic_k=true,dynamic_v=true"])],
    "w4a4-rptq": [("activations.group_size", ["16", "32"]), ("reorder.clusters", ["16", "32"]), ("rotate", _ROTATIONS)],
}


def candidate_overrides(key: str, value: str) -> list[str]:
    """The ``--set`` overrides of one sweep candidate (a group's "f=v" items are split at the
    commas outside brackets, so a list value may hold commas)."""
    if "." in key:
        return [f"{key}={value}"]
    items, depth, start = [], 0, 0
    for i, ch in enumerate(value):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(value[start:i])
            start = i + 1
    return [f"{key}.{item}" for item in [*items, value[start:]]]


def main(argv: list[str] | None = None) -> int:
    """Run one variant; bad input (unknown recipe or key, bad value) is one line on stderr, exit 2."""
    from lowbit.errors import LowbitError

    ap = argparse.ArgumentParser(prog="python -m lowbit.bench.recipe_sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    ap.add_argument("--windows", type=int, default=8, help="windows of 512 tokens scored (default 8)")
    ap.add_argument("--split", choices=("tuning", "evaluation"), default="tuning",
                    help="texts scored: tuning = pydoc's tuning split and the wiki text (default); "
                         "evaluation = pydoc's evaluation split and news, only to report, never to choose")
    ap.add_argument("--default-options", action="store_true", help="evaluate with ORT's default session options")
    args = ap.parse_args(argv)
    try:
        r = measure(args.recipe, args.set, split=args.split, windows=args.windows, default_options=args.default_options)
    except LowbitError as e:
        print(f"recipe_sweep: error: {e}", file=sys.stderr)
        return 2
    run = "ORT default options" if args.default_options else "QDQ in float"
    print(f"{args.recipe} {' '.join(args.set) or '(recipe as is)'} ({args.split} split, {run}, compile {r['seconds']:.1f} s):")
    for name, t in r["texts"].items():
        print(f"  {name}: ppl {t['ppl']:.3f}, {t['ratio']:.4f} x FP32 {t['fp32']:.4f}, KL {t['kl']:.4f}, "
              f"top-1 {100 * t['top1']:.1f} %")
    print("pass seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["passes"].items()))
    return 0


def scored_texts(tokenizer: Any, split: str, windows: int) -> list[tuple[str, np.ndarray]]:
    """(text name, windows) scored by a sweep: the tuning split of pydoc and the wiki tuning text,
    or (only to report) the evaluation split of pydoc and news."""
    from lowbit.models.data import evaluation_windows, tuning_windows

    if split == "tuning":
        return [(d, tuning_windows(tokenizer, 512, windows, domain=d)) for d in TUNING_TEXTS]
    return [(d, evaluation_windows(tokenizer, 512, windows, domain=d)) for d in ("pydoc", "news")]


def measure(recipe_name: str, overrides: list[str], *, split: str = "tuning", windows: int = 8,
            default_options: bool = False) -> dict[str, Any]:
    """Compile one variant and score it against FP32 on each text of ``split``:
    ``{texts: {name: {ppl, fp32, ratio, kl, top1}}, ratio (mean over the texts), seconds, passes}``."""
    import onnxruntime as ort

    import lowbit
    from lowbit.core.recipe import load_recipe
    from lowbit.models.data import calibration_windows
    from lowbit.models.evaluate import compare_to_reference, open_session
    from lowbit.models.export import export_model
    from lowbit.models.registry import load_tokenizer

    recipe = load_recipe(recipe_name, overrides)  # bad keys fail before the (first-run) export
    source = export_model(FP32_MODEL)
    tokenizer = load_tokenizer(source)
    calibration = calibration_windows(tokenizer, 512, recipe.calibration.windows)
    start = time.perf_counter()
    compiled = lowbit.compile(source, recipe_name, calibration=calibration, overrides=overrides)
    seconds = time.perf_counter() - start
    options = ort.SessionOptions()
    if not default_options:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    texts = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-sweep-") as tmp:
        path = Path(tmp) / "model.onnx"
        compiled.save(path)
        session, reference = open_session(path, options), open_session(source / "model.onnx")
        for name, scored in scored_texts(tokenizer, split, windows):
            mine, fp32, agreement = compare_to_reference(path, source / "model.onnx", scored,
                                                         session=session, reference_session=reference)
            texts[name] = {"ppl": mine.ppl, "fp32": fp32.ppl, "ratio": mine.ppl / fp32.ppl,
                           "kl": agreement.kl, "top1": agreement.top1}
        del session
    passes = {e["pass"]: e["seconds"] for e in compiled.report["passes"] if e["seconds"] >= 0.05}
    mean_ratio = float(np.mean([t["ratio"] for t in texts.values()]))
    return {"texts": texts, "ratio": mean_ratio, "seconds": seconds, "passes": passes}


if __name__ == "__main__":
    sys.exit(main())
