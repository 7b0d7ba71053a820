"""Static FGMP activations: per-channel FP8 / E2M1 choice in whole blocks of 16 hitting the budget
exactly, the clip search, and the standard-op emission equal to the numpy reference -- in ORT on
the tiny decoder and on a real SmolLM2 site (slow), in onnx.reference for qdq-fp4."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

from lowbit.core.context import CalibrationData, CompileContext
from lowbit.ort.feeds import make_feed
from lowbit.ort.session import ort_session
from lowbit.compiler.pipeline import run_pipeline
from lowbit.core.recipe import load_recipe
from lowbit.errors import LowbitError
from lowbit.formats.minifloat import FP4_E2M1
from lowbit.models.synthetic import tiny_decoder
from lowbit.emit.mixed import decode_bitmap
from lowbit.emit.fgmp_static_act import (
    ACT_BITMAP_KEY, CLIP_RATIOS, ChannelPlan, ChannelStatsAccumulator, choose_channels, static_act_nodes, static_act_quant,
)  # fmt: skip
from lowbit.passes.precision import activation_fp8_fraction, n_fp8_blocks
from lowbit.emit.fgmp_static_act import ACTIVATION_PLANS

STATIC = ["precision.sensitivity=proxy", "precision.activations=static", "activations.format=none"]


def test_channels_are_chosen_in_sorted_blocks_of_16_to_the_exact_budget():
    rng = np.random.default_rng(0)
    impacts = [rng.exponential(size=48), rng.exponential(size=32) * 10, np.zeros(16)]
    for fraction in (0.0, 1 / 6, 0.3, 0.5, 1.0):
        masks, _ = choose_channels(impacts, fraction)
        blocks = [int(m.sum()) // 16 for m in masks]
        assert all(int(m.sum()) % 16 == 0 for m in masks)
        assert sum(blocks) == n_fp8_blocks(6, fraction)  # 6 blocks of 16 in all
        for imp, m in zip(impacts, masks):  # FP8 channels are the input's most sensitive ones
            if m.any() and not m.all():
                assert imp[m].min() >= imp[~m].max()
    masks, threshold = choose_channels(impacts, 1 / 6)  # one block: the scaled-up input's top 16
    assert [int(m.sum()) for m in masks] == [0, 16, 0]
    assert threshold == pytest.approx(np.sort(impacts[1])[::-1][:16].sum())


def test_act_budget_defaults_to_the_weights():
    spec = load_recipe("fgmp-nvfp4-fp8", ["precision.fp8_fraction=0.2"]).precision
    assert activation_fp8_fraction(spec) == 0.2
    spec = load_recipe("fgmp-nvfp4-fp8", ["precision.avg_bits=6.25"]).precision
    assert activation_fp8_fraction(spec) == pytest.approx(0.5)
    spec = load_recipe("fgmp-nvfp4-fp8", ["precision.act_fp8_fraction=0.1"]).precision
    assert activation_fp8_fraction(spec) == 0.1


def test_reference_rounds_e2m1_to_nearest_even_and_saturates():
    x = np.array([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -5.0, 1.3]], np.float32)
    y = static_act_quant(x, np.zeros(10, bool), np.ones(10, np.float32), np.ones(10, np.float32))
    np.testing.assert_array_equal(y[0], [0, 1, 1, 2, 2, 4, 4, 6, -4, 1.5])


def test_clip_search_picks_the_least_4bit_error_of_the_grid():
    x = np.random.default_rng(0).standard_normal((4096, 2)).astype(np.float32)  # Gaussian tails
    amax = np.abs(x).max(0)
    acc = ChannelStatsAccumulator(amax)
    acc.update(x)
    s4, gap = acc.best()
    errors = [np.square(static_act_quant(x, np.zeros(2, bool), acc.s8, amax * r / 6) - x).sum(0) for r in CLIP_RATIOS]
    np.testing.assert_allclose(np.square(static_act_quant(x, np.zeros(2, bool), acc.s8, s4) - x).sum(0),
                               np.min(errors, axis=0), rtol=1e-5)  # fmt: skip
    assert (s4 < amax / 6).all()  # for Gaussian data clipping below absmax pays
    q8 = static_act_quant(x, np.ones(2, bool), acc.s8, s4)
    q4 = static_act_quant(x, np.zeros(2, bool), acc.s8, s4)
    np.testing.assert_allclose(gap, np.square(q4.astype(np.float64) - q8).sum(0), rtol=1e-5)


def _taps(ctx: CompileContext, plans: list[ChannelPlan]) -> list[ir.Value]:
    """(input, quantized output) value of every planned input, in plan order."""
    values = {v.name: v for n in ctx.model.graph for v in n.outputs}
    values.update({v.name: v for v in ctx.model.graph.inputs})
    taps = []
    for p in plans:
        out = next(values[f"{p.name}{s}"] for s in (".fgmp_static", ".fgmp_fp4", ".fgmp_fp8") if f"{p.name}{s}" in values)
        taps += [values[p.name], out]
    return taps


def _assert_matches_reference(ctx: CompileContext, windows: list[np.ndarray]) -> None:
    plans = ctx.analyses.get(ACTIVATION_PLANS)
    taps = _taps(ctx, plans)
    session = ort_session(ctx.model, taps)  # ORT's default optimization level
    for ids in windows:
        outs = session.run([t.name for t in taps], make_feed(session.get_inputs(), ids))
        for plan, x, y in zip(plans, outs[0::2], outs[1::2]):
            assert np.array_equal(y, static_act_quant(x, plan.fp8, plan.s8, plan.s4)), plan.name


def test_static_activations_match_the_reference_in_ort(token_windows):
    recipe = load_recipe("fgmp-nvfp4-fp8", [*STATIC, "precision.act_fp8_fraction=0.25"])
    ctx = CompileContext(tiny_decoder(), recipe, CalibrationData(token_windows))
    run_pipeline(ctx)
    rep = ctx.report["precision"]["activations"]
    plans = ctx.analyses.get(ACTIVATION_PLANS)
    assert rep["inputs"] == len(plans) > 0
    assert rep["fp8_channels"] == 16 * n_fp8_blocks(rep["channels"] // 16, 0.25)
    assert rep["sensitivity"].startswith("proxy")
    assert {n.op_type for n in ctx.model.graph} >= {"QuantizeLinear", "Round", "Where"}
    assert not any(n.domain for n in ctx.model.graph)  # standard ops only
    for p in plans:
        np.testing.assert_array_equal(decode_bitmap(ctx.model.metadata_props[f"{ACT_BITMAP_KEY}{p.name}"]), p.fp8)
    _assert_matches_reference(ctx, token_windows)


def test_qdq_fp4_emission_is_standard_fp4_qdq_matching_the_reference():
    rng = np.random.default_rng(1)
    channels = 32
    x = (rng.standard_normal((2, 40, channels)) * np.exp(rng.uniform(-3, 3, channels))).astype(np.float32)
    amax = np.abs(x).max((0, 1))
    plan = ChannelPlan("x", rng.random(channels) < 0.5, (amax / 448).astype(np.float32),
                       (amax * 0.6 / 6).astype(np.float32), np.zeros(channels))  # fmt: skip
    inp = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 40, channels]))
    graph = ir.Graph([inp], [], nodes=[], opset_imports={"": 23}, name="g")
    nodes, out = static_act_nodes(graph, inp, plan, "qdq-fp4")
    graph.extend(nodes)
    graph.outputs.append(out)
    assert ir.DataType.FLOAT4E2M1 in {n.outputs[0].dtype for n in nodes}
    model = ir.serde.serialize_model(ir.Model(graph, ir_version=11))
    (y,) = ReferenceEvaluator(model).run(None, {"x": x})
    assert np.array_equal(y, static_act_quant(x, plan.fp8, plan.s8, plan.s4))
    assert not np.array_equal(y, FP4_E2M1.round(x / plan.s4) * plan.s4)  # the FP8 channels differ


def test_static_activations_refuse_activation_qdq(token_windows):
    with pytest.raises(LowbitError, match="recipe key 'activations.format'"):  # at load, before any model
        load_recipe("fgmp-nvfp4-fp8", ["precision.sensitivity=proxy", "precision.activations=static"])


@pytest.mark.slow
def test_static_activations_on_a_real_smollm2_site(smollm2_export, calib_windows):
    """The first decoder layer's four inputs (others excluded), 2 x 64 calibration tokens."""
    from lowbit.compiler.api import load_onnx

    windows = [w[:64] for w in calib_windows[:2]]
    recipe = load_recipe("fgmp-nvfp4-fp8", [*STATIC, "precision.fp8_fraction=0.3",
                                            'sites.exclude=["model.layers.[1-9]*", "lm_head"]'])  # fmt: skip
    ctx = CompileContext(load_onnx(smollm2_export / "model.onnx"), recipe, CalibrationData(windows))
    run_pipeline(ctx)
    rep = ctx.report["precision"]["activations"]
    assert (rep["inputs"], rep["channels"]) == (4, 3 * 576 + 1536)
    assert rep["fp8_channels"] == 16 * n_fp8_blocks(rep["channels"] // 16, 0.3)
    _assert_matches_reference(ctx, windows)
