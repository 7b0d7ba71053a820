"""Scale folding + RPTQ reordering preserve the real models' function (slow: real exports).

Tolerance: relative max abs difference of the outputs <= 1e-5. Folding x/s into gamma and s*W into
a weight, and permuting a norm's reduction, only reassociate float32 sums; measured on SmolLM2
(30 layers, logits up to ~30) it moves outputs by ~2e-6 of the largest logit, while any wrong
scale or permutation moves them by > 1e-2.
"""

import numpy as np
import pytest

from lowbit.compiler.api import load_onnx
from lowbit.core.context import CalibrationData, CompileContext
from lowbit.ort.session import run_on_tokens
from lowbit.core.recipe import load_recipe
from lowbit.ort.observe import ObservePass
from lowbit.passes.calibrate import CalibrationAccumulator
from lowbit.passes.canonicalize import canonicalize_passes
from lowbit.passes.capture import CaptureAccumulator
from lowbit.passes.reorder import ReorderPass
from lowbit.passes.smooth import SmoothPass

pytestmark = pytest.mark.slow

RTOL = 1e-5


def _model_file(directory):
    return directory / "model.onnx" if (directory / "model.onnx").exists() else directory


def _smooth_and_reorder(path, windows, probe):
    model = load_onnx(_model_file(path))
    reference = run_on_tokens(model, probe)
    recipe = load_recipe("w4a8-dint4", ["smooth.method=aqas", "reorder.clusters=8", "smooth.alpha_grid=[0.3, 0.5, 0.7]",
                                        'reorder.feeders=["norm", "gated_linear", "attention_v"]'])
    ctx = CompileContext(model, recipe, CalibrationData(windows))
    for p in canonicalize_passes():
        p(model)
    ObservePass(ctx, [CalibrationAccumulator(), CaptureAccumulator(64)])(model)
    for p in (SmoothPass(ctx), ReorderPass(ctx)):
        ctx.analyses.graph_edited()
        p(model)
    outputs = run_on_tokens(model, probe)
    worst = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(reference, outputs))
    return worst, ctx.report


@pytest.mark.parametrize("fixture", ["smollm2_export", "smollm2_with_past_export"])
def test_smollm2_function_preserved(fixture, request, calib_windows):
    windows = [np.asarray(w[:128]) for w in calib_windows[:2]]
    worst, report = _smooth_and_reorder(request.getfixturevalue(fixture), windows, np.asarray(calib_windows[2][:48]))
    assert worst < RTOL
    groups = report["smooth"]["groups"]
    folded = {g["feeder"] for g in groups.values() if g["folded"]}
    if fixture == "smollm2_export":
        assert folded == {"norm", "attention_v", "gated_linear"}  # GQA o_proj and down_proj included
    else:  # v_proj also feeds the present.* KV-cache outputs: o_proj is left alone
        assert folded == {"norm", "gated_linear"}
    assert sum(g["folded"] for g in groups.values()) >= 30  # the search may keep s = 1 for a group
    # 30 x (input, post-attention) norms on both exports (optimum's input norms also feed Shape
    # nodes, which a permutation cannot affect); the final norm feeds the tied lm_head: clusters only
    assert report["reorder"]["gathers"] == 60
    reordered = {g["feeder"] for g in report["reorder"]["groups"].values() if g["reordered"]}
    if fixture == "smollm2_export":  # o_proj inputs inside each head, one order per GQA v head
        assert reordered == {"norm", "attention_v", "gated_linear"} and report["reorder"]["permuted_groups"] == 120
    else:
        assert reordered == {"norm", "gated_linear"} and report["reorder"]["permuted_groups"] == 90


def test_minilm_function_preserved(minilm_export):
    rng = np.random.default_rng(0)
    windows = [rng.integers(1000, 20000, (2, 64)) for _ in range(2)]
    worst, report = _smooth_and_reorder(minilm_export, windows, rng.integers(1000, 20000, (1, 40)))
    assert worst < RTOL
    # BERT is post-LN: every LayerNorm output also feeds the residual, so nothing folds into a
    # norm; each layer's attention output folds into v_proj's columns and its bias
    assert report["smooth"]["folded_groups"] == 6 and report["reorder"]["gathers"] == 0
    assert {g["feeder"] for g in report["smooth"]["groups"].values() if g.get("folded")} == {"attention_v"}
    assert report["reorder"]["clustered_groups"] == 6 * 4  # q/k/v, o, intermediate, output per layer
