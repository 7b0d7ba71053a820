"""Scale folding: function-preserving on every norm form, exact analysis updates, GQA scales, and
the search never picks a candidate worse than no scaling on its own objective."""

import numpy as np
import pytest

from lowbit.core.context import CalibrationData, CompileContext
from lowbit.ort.session import run_on_tokens
from lowbit.core.recipe import load_recipe
from lowbit.models.synthetic import tiny_decoder
from lowbit.ort.observe import ObservePass
from lowbit.passes.calibrate import CalibrationAccumulator
from lowbit.passes.canonicalize import canonicalize_passes
from lowbit.passes.capture import CaptureAccumulator
from lowbit.core.folding import _gqa_map
from lowbit.passes.smooth import SmoothPass, candidate_scales
from lowbit.core.statistics import ACTIVATION_STATS, SITE_CAPTURE

IDS = np.arange(20, dtype=np.int64) * 3 % 64


def _prepared(model, overrides, windows):
    ctx = CompileContext(model, load_recipe("w4a8-dint4", overrides), CalibrationData(windows))
    for p in canonicalize_passes():
        p(model)
    ObservePass(ctx, [CalibrationAccumulator(), CaptureAccumulator(64)])(model)
    return ctx


@pytest.mark.parametrize("method", ["smoothquant", "awq", "aqas"])
@pytest.mark.parametrize("norm,form", [("rms", "fused"), ("rms", "decomposed"), ("layer", "fused"), ("layer", "decomposed")])
def test_smoothing_preserves_function_and_folds_every_feeder(norm, form, method, token_windows):
    model = tiny_decoder(norm=norm, norm_form=form)
    reference = run_on_tokens(model, IDS)[0]
    ctx = _prepared(model, [f"smooth.method={method}"], token_windows)
    ctx.analyses.graph_edited()
    assert SmoothPass(ctx)(model).modified
    out = run_on_tokens(model, IDS)[0]
    # float32: x/s then s*W reassociates every dot product: a few ulps of the largest logit
    assert np.abs(out - reference).max() / np.abs(reference).max() < 2e-6
    groups = ctx.report["smooth"]["groups"]
    folded = {g["feeder"] for g in groups.values() if g["folded"]}
    assert folded == {"norm", "attention_v", "gated_linear"}
    for g in groups.values():
        if g["folded"]:
            assert g["rel_error_after"] < g["rel_error_before"]


def test_analyses_follow_the_scales_exactly(token_windows):
    """Stats and X^T X transformed in closed form equal a fresh calibration of the new model."""
    model = tiny_decoder(norm="rms", norm_form="fused")
    ctx = _prepared(model, ["smooth.method=aqas"], token_windows)
    ctx.analyses.graph_edited()
    SmoothPass(ctx)(model)
    updated_stats, updated_capture = ctx.analyses.get(ACTIVATION_STATS), ctx.analyses.get(SITE_CAPTURE)
    fresh = _prepared(model, ["smooth.method=aqas"], token_windows)
    for name, cap in fresh.analyses.get(SITE_CAPTURE).items():
        np.testing.assert_allclose(updated_capture[name].hessian, cap.hessian, rtol=1e-4, atol=1e-4 * np.abs(cap.hessian).max())
        np.testing.assert_allclose(updated_stats[name].max, fresh.analyses.get(ACTIVATION_STATS)[name].max, rtol=1e-5, atol=1e-6)


def test_gqa_scale_map_shares_one_scale_per_kv_channel():
    class _Site:  # the number _gqa_map reads
        def __init__(self, fin, fout):
            self.in_features, self.out_features = fin, fout

    mapping = _gqa_map(_Site(24, 8), 8, 4)  # 6 query heads of dim 4, 2 kv heads (8 V channels)
    assert mapping.tolist()[:12] == [0, 1, 2, 3] * 3 and mapping.tolist()[12:] == [4, 5, 6, 7] * 3
    amax = np.arange(1, 25, dtype=np.float64)
    for _, s in candidate_scales("aqas", (0.5,), amax, amax, np.ones(24), mapping):
        assert np.allclose(s.reshape(2, 3, 4), s.reshape(2, 3, 4)[:, :1, :])  # equal on replicas


def test_shared_weights_are_never_rescaled(token_windows):
    model = tiny_decoder(norm="rms", norm_form="fused")
    ctx = CompileContext(model, load_recipe("w4a8-dint4"), CalibrationData(token_windows))
    ObservePass(ctx, [CalibrationAccumulator(), CaptureAccumulator(64)])(model)  # no constant folding: lm_head reads the tied embedding table
    SmoothPass(ctx)(model)
    assert ctx.report["smooth"]["groups"]["embed_tokens"] == {"folded": False, "reason": "a weight initializer is shared (e.g. a tied embedding)"}


def test_dynamic_activation_objective_quantizes_groups_of_like_range_channels():
    """With per_token_group activations the objective uses the run-time group scales; where RPTQ
    will reorder the input, a group holds channels of like range (sorted by calibrated |range|)."""
    from types import SimpleNamespace

    from lowbit.encode.activations import dynamic_fake_quant, dynamic_group_qmax
    from lowbit.passes.smooth import fake_quantize_activations

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 8)) * np.array([1, 50, 1, 50, 1, 50, 1, 50])).astype(np.float32)
    lo, hi = x.min(axis=0), x.max(axis=0)
    aspec = SimpleNamespace(format="int8", granularity="per_token_group", group_size=4)
    qmax = dynamic_group_qmax("int8", 8, 4)
    contiguous = fake_quantize_activations(x, lo, hi, aspec)
    assert np.array_equal(contiguous, dynamic_fake_quant(x, 4, qmax))
    sorted_ = fake_quantize_activations(x, lo, hi, aspec, sorted_groups=True)
    order = np.argsort(np.maximum(-lo, hi), kind="stable")
    assert set(order[:4]) == {0, 2, 4, 6}  # the small channels share a group
    assert np.array_equal(sorted_[:, order], dynamic_fake_quant(x[:, order], 4, qmax))
    small = [0, 2, 4, 6]  # no longer sharing a scale with a channel 50x wider
    assert np.abs(sorted_ - x)[:, small].max() < 0.1 * np.abs(contiguous - x)[:, small].max()
