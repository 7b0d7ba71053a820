"""FGMP: block impact scores, the global threshold, bit accounting, sensitivity orientation and
the two-branch emission (bit for bit, in ORT and in onnx.reference for qdq-fp4)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

from lowbit import formats
from lowbit.core.context import CalibrationData, CompileContext
from lowbit.ort.session import ort_session
from lowbit.compiler.pipeline import run_pipeline
from lowbit.core.recipe import load_recipe
from lowbit.errors import LowbitError
from lowbit.models.fisher import save_fisher
from lowbit.models.synthetic import tiny_decoder
from lowbit.emit.mixed import BITMAP_KEY, decode_bitmap
from lowbit.passes.fisher import fisher_for_site, proxy_for_site
from lowbit.core.linear_sites import find_linear_sites
from lowbit.passes.precision import (
    PRECISION_ASSIGNMENT,
    block_impact, candidates, choose_blocks, fraction_for_bits, mixed_weight, n_fp8_blocks, top_k_masks,
)  # fmt: skip


def _two_block_tensor() -> tuple[np.ndarray, np.ndarray]:
    """A [32, 1] weight (reduction axis 0): two blocks of 16 with hand-checked quantizations."""
    w = np.zeros((32, 1), np.float32)
    w[[0, 1, 2], 0] = [6.0, 3.0, 1.5]  # block 0: exact in NVFP4 (block scale 1) and in FP8
    w[[16, 17], 0] = [2.5, 1.1]
    g2 = np.ones_like(w)
    g2[17, 0] = 2.0
    return w, g2


def test_impact_scores_on_a_hand_made_two_block_tensor():
    w, g2 = _two_block_tensor()
    q4, q8 = candidates(w, g2, axis=0, clip="absmax")
    d4, d8 = formats.decode(q4), formats.decode(q8)
    # channel amax 6: NVFP4 global 6/2688; block 1 amax 2.5 -> E4M3(186.7) = 192, element step
    # 192/448 = 3/7: 1.1 / (3/7) = 2.57 -> E2M1 3 -> 9/7. FP8 per channel, scale 6/448:
    # 1.1 * 448/6 = 82.1 -> E4M3 80 -> 15/14. 2.5 -> 6 * 3/7 = 18/7 in NVFP4, 192 * 6/448 in FP8.
    assert d4[17, 0] == pytest.approx(9 / 7, rel=1e-6) and d8[17, 0] == pytest.approx(15 / 14, rel=1e-6)
    assert d4[16, 0] == pytest.approx(18 / 7, rel=1e-6) and d8[16, 0] == pytest.approx(18 / 7, rel=1e-6)
    np.testing.assert_array_equal(d4[:3, 0], [6, 3, 1.5])
    np.testing.assert_array_equal(d8[:3, 0], [6, 3, 1.5])
    impact = block_impact(d4, d8, g2, axis=0)
    assert impact.shape == (2, 1)
    assert impact[0, 0] == 0.0
    d16, d17 = float(d4[16, 0]) - float(d8[16, 0]), float(d4[17, 0]) - float(d8[17, 0])
    assert impact[1, 0] == d16 * d16 + 2.0 * d17 * d17  # float64 sum of the float32 differences
    assert impact[1, 0] == pytest.approx(18 / 196, rel=1e-5)  # 2 * (3/14)^2 up to float32 scales


def test_impact_is_blocked_along_the_reduction_axis():
    rng = np.random.default_rng(0)
    q4, q8, g2 = (rng.standard_normal((8, 48)).astype(np.float32) for _ in range(3))
    impact = block_impact(q4, q8, g2, axis=1)  # [8, 48] with blocks along axis 1: [8, 3]
    d = q4.astype(np.float64) - q8
    expected = (g2.astype(np.float64) * d * d).reshape(8, 3, 16).sum(-1)
    np.testing.assert_allclose(impact, expected, rtol=1e-12)


def test_global_threshold_hits_the_fraction_exactly_with_ties_by_position():
    a = np.array([[5.0, 1.0], [3.0, 3.0]])
    b = np.array([3.0, 3.0, 0.0, 7.0])
    masks, threshold = top_k_masks([a, b], 4)
    # sorted: 7 (b[3]), 5 (a[0,0]), then four 3s in position order: a[1,0], a[1,1], b[0], b[1]
    assert sum(int(m.sum()) for m in masks) == 4
    np.testing.assert_array_equal(masks[0], [[True, False], [True, True]])
    np.testing.assert_array_equal(masks[1], [False, False, False, True])
    assert threshold == 3.0
    for k in range(0, 9):
        masks, _ = top_k_masks([a, b], k)
        assert sum(int(m.sum()) for m in masks) == k
    assert n_fp8_blocks(1216, 0.3) == 365  # 364.8 -> 365
    assert n_fp8_blocks(10, 0.25) == 3  # 2.5 rounds half up
    with pytest.raises(LowbitError):
        top_k_masks([a], 5)


def test_baselines_choose_the_same_count_or_whole_sites():
    rng = np.random.default_rng(1)
    scores = [rng.random((4, 3)), rng.random((10,)) * 5, rng.random((2, 2))]
    masks, thr = choose_blocks("random", scores, 9, seed=3)
    assert sum(int(m.sum()) for m in masks) == 9 and np.isnan(thr)
    masks, _ = choose_blocks("per_layer", scores, 14)
    # densest site (mean ~2.5, 10 blocks) first, then the 4-block site fits, the 12-block one does not
    assert [bool(m.all()) for m in masks] == [False, True, True]
    assert [bool(m.any()) for m in masks] == [False, True, True]


def test_average_bits_accounting():
    assert fraction_for_bits(4.5) == 0.0
    assert fraction_for_bits(8.0) == 1.0
    assert fraction_for_bits(5.55) == pytest.approx(0.3)
    with pytest.raises(LowbitError):
        fraction_for_bits(9.0)


def _sites(model: ir.Model):
    from lowbit.passes.canonicalize import canonicalize_passes

    for p in canonicalize_passes():
        p(model)
    return list(find_linear_sites(model.graph))


def test_sensitivity_orientation_and_proxy():
    sites = _sites(tiny_decoder())
    site = next(s for s in sites if s.reduction_axis == 0)
    k, n = site.weight.const_value.shape
    torch_layout = np.arange(n * k, dtype=np.float32).reshape(n, k)  # [out, in]
    got = fisher_for_site({f"weight/{site.name}": torch_layout}, site)
    np.testing.assert_array_equal(got, torch_layout.T)
    with pytest.raises(LowbitError, match="no entry"):
        fisher_for_site({}, site)
    with pytest.raises(LowbitError, match="shape"):
        fisher_for_site({f"weight/{site.name}": torch_layout.T[:, :-1]}, site)
    sq = np.arange(k, dtype=np.float32)
    proxy = proxy_for_site(sq, site)
    assert proxy.shape == (k, n) and np.all(proxy == sq[:, None])


def _compile(tmp_path, target: str, fraction: float, windows):
    model = tiny_decoder()
    sites = _sites(tiny_decoder())
    rng = np.random.default_rng(5)
    fisher = {}
    for s in sites:
        shape = s.weight.const_value.shape
        out_in = shape if s.reduction_axis == 1 else shape[::-1]
        fisher[f"weight/{s.name}"] = rng.random(out_in).astype(np.float32) ** 4  # skewed like real g^2
    path = save_fisher(fisher, tmp_path / "fisher.npz", source="test")
    recipe = load_recipe("fgmp-nvfp4-fp8", [f"target={target}", "activations.format=none",
                                            f"precision.fisher_file={path}", f"precision.fp8_fraction={fraction}"])
    ctx = CompileContext(model, recipe, CalibrationData(windows))
    run_pipeline(ctx)
    return ctx


def _weight_inputs(ctx):
    """{site name: the value each quantized site now multiplies by} (its DQ/Add output)."""
    assignment = ctx.analyses.get(PRECISION_ASSIGNMENT)
    values = {}
    for node in ctx.model.graph:
        for v in node.outputs:
            for name in assignment.sites:
                if v.name in (f"{name}.mixed_weight", f"{name}.dequantized", f"{name}.fp8.dequantized"):
                    values.setdefault(name, []).append(v)
    # the consumer-facing value: the Add when both branches exist, else the single DQ
    return {n: next((v for v in vs if v.name.endswith("mixed_weight")), vs[0]) for n, vs in values.items()}


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_two_branch_emission_decodes_to_the_mixed_weight_bit_for_bit(tmp_path, token_windows, fraction):
    ctx = _compile(tmp_path, "qdq", fraction, token_windows)
    assignment = ctx.analyses.get(PRECISION_ASSIGNMENT)
    assert assignment.fp8_blocks == n_fp8_blocks(assignment.total_blocks, fraction)
    values = _weight_inputs(ctx)
    assert set(values) == set(assignment.sites)
    names = list(values)
    session = ort_session(ctx.model, [values[n] for n in names])
    outs = session.run([values[n].name for n in names], {"input_ids": token_windows[0][None, :]})
    for name, got in zip(names, outs):
        expected = mixed_weight(assignment.sites[name])
        assert np.array_equal(got, expected), name  # -0 == +0: the only allowed difference
        np.testing.assert_array_equal(decode_bitmap(ctx.model.metadata_props[f"{BITMAP_KEY}{name}"]),
                                      assignment.sites[name].fp8)
    ops = [n.op_type for n in ctx.model.graph]
    mixed = sum(0 < c.fp8.sum() < c.n_blocks for c in assignment.sites.values())
    assert mixed == (0 if fraction in (0.0, 1.0) else mixed) and (fraction != 0.3 or mixed > 0)
    assert ops.count("Add") - 4 == mixed  # the tiny model has 4 residual Adds; one Add per mixed site


def test_qdq_fp4_emission_matches_in_onnx_reference(tmp_path, token_windows):
    ctx = _compile(tmp_path, "qdq-fp4", 0.3, token_windows)
    assignment = ctx.analyses.get(PRECISION_ASSIGNMENT)
    values = _weight_inputs(ctx)
    graph = ctx.model.graph
    graph.outputs.extend(values.values())
    proto = ir.serde.serialize_model(ctx.model)
    assert any(i.data_type == onnx.TensorProto.FLOAT4E2M1 for i in proto.graph.initializer)
    outs = ReferenceEvaluator(proto).run(None, {"input_ids": token_windows[0][None, :].astype(np.int64)})
    for name, got in zip(values, outs[-len(values):]):
        assert np.array_equal(got, mixed_weight(assignment.sites[name])), name


def test_fgmp_needs_nvfp4_weights():
    """Refused when the recipe is loaded, before any model or calibration."""
    with pytest.raises(LowbitError, match="recipe key 'weights.format': precision.enabled mixes NVFP4"):
        load_recipe("fgmp-nvfp4-fp8", ["weights.format=int4", "precision.sensitivity=proxy"])


def test_proxy_sensitivity_end_to_end(token_windows):
    recipe = load_recipe("fgmp-nvfp4-fp8", ["precision.sensitivity=proxy", "precision.fp8_fraction=0.2"])
    ctx = CompileContext(tiny_decoder(), recipe, CalibrationData(token_windows))
    run_pipeline(ctx)
    rep = ctx.report["precision"]
    assert rep["sensitivity"] == "proxy" and "diag(X^T X)" in rep["sensitivity_source"]
    assert rep["fp8_blocks"] == n_fp8_blocks(rep["total_blocks"], 0.2)
    assert rep["avg_bits"] == pytest.approx(4.5 + 3.5 * rep["fp8_blocks"] / rep["total_blocks"])
