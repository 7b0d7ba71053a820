"""RPTQ reorder: function-preserving on every norm form, Gathers only at norms, contiguous
clusters, per-cluster activation scales in the emitted QDQ, and the range plot."""

import base64
from types import SimpleNamespace
from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest

from lowbit.core.context import CalibrationData, CompileContext
from lowbit.ort.feeds import make_feed
from lowbit.ort.session import ort_session, run_on_tokens
from lowbit.core.recipe import load_recipe
from lowbit.models.synthetic import tiny_decoder
from lowbit.ort.observe import ObservePass
from lowbit.passes.calibrate import CalibrationAccumulator
from lowbit.passes.canonicalize import canonicalize_passes
from lowbit.emit.qdq import EmitQDQPass
from lowbit.encode.weights import EncodeWeightsPass
from lowbit.core.folding import FoldTarget, producer_permutation
from lowbit.passes.reorder import ReorderPass, cluster_channels, head_local_order
from lowbit.passes.reorder import ACT_CLUSTERS
from lowbit.core.statistics import ACTIVATION_STATS

IDS = np.arange(20, dtype=np.int64) * 5 % 64


FEEDERS = 'reorder.feeders=["norm", "gated_linear", "attention_v"]'  # attention_v is opt-in


def _reordered(norm, form, windows, clusters=4):
    model = tiny_decoder(norm=norm, norm_form=form)
    reference = run_on_tokens(model, IDS)[0]
    ctx = CompileContext(model, load_recipe("w8a8", [f"reorder.clusters={clusters}", FEEDERS]), CalibrationData(windows))
    for p in canonicalize_passes():
        p(model)
    ObservePass(ctx, [CalibrationAccumulator()])(model)
    before = {k: (v.min.copy(), v.max.copy()) for k, v in ctx.analyses.get(ACTIVATION_STATS).by_value.items()}
    ctx.analyses.graph_edited()
    assert ReorderPass(ctx)(model).modified
    ctx.analyses.graph_edited()
    return model, ctx, reference, before


@pytest.mark.parametrize("norm,form", [("rms", "fused"), ("rms", "decomposed"), ("layer", "fused"), ("layer", "decomposed")])
def test_reorder_preserves_function(norm, form, token_windows):
    model, ctx, reference, _ = _reordered(norm, form, token_windows)
    out = run_on_tokens(model, IDS)[0]
    assert np.abs(out - reference).max() / np.abs(reference).max() < 2e-6  # norm sums reordered
    ops = Counter(n.op_type for n in model.graph)
    assert ops["Gather"] == 1 + 5  # the embedding + one per norm (2 layers x 2 + final norm)
    report = ctx.report["reorder"]
    # 5 norm inputs (a Gather each), 2 down_proj inputs, 2 o_proj inputs (inside heads)
    assert (report["gathers"], report["permuted_groups"], report["clustered_groups"]) == (5, 9, 9)


def test_clusters_are_contiguous_and_stats_follow_the_permutation(token_windows):
    model, ctx, _, before = _reordered("rms", "fused", token_windows)
    clusters = ctx.analyses.get(ACT_CLUSTERS)
    stats = ctx.analyses.get(ACTIVATION_STATS)
    for group in ctx.sites.input_groups():
        name = group[0].input.name
        labels = clusters[name]
        if group[0].feeder.kind == "attention_v":  # sorted inside each head of 8 channels
            assert np.all(np.diff(labels.reshape(-1, 8), axis=1) >= 0), group[0].name
        else:
            assert np.all(np.diff(labels) >= 0), group[0].name  # contiguous after the permutation
        lo_before = np.sort(before[name][0])
        np.testing.assert_array_equal(np.sort(stats[name].min), lo_before)  # a permutation of it
    # the fresh calibration of the reordered model agrees with the permuted statistics
    fresh = CompileContext(model, ctx.recipe, ctx.calibration)
    ObservePass(fresh, [CalibrationAccumulator()])(model)
    for name, s in fresh.analyses.get(ACTIVATION_STATS).by_value.items():
        if name in clusters:
            np.testing.assert_allclose(s.max, stats[name].max, rtol=1e-5, atol=1e-6)


def test_emitted_activation_scales_are_constant_within_each_cluster(token_windows):
    model, ctx, reference, _ = _reordered("rms", "fused", token_windows)
    EncodeWeightsPass(ctx)(model)
    EmitQDQPass(ctx)(model)
    clusters = ctx.analyses.get(ACT_CLUSTERS)
    checked = 0
    for name, labels in clusters.items():
        scale = model.graph.initializers[f"{name}.act_scale"].const_value.numpy()
        assert scale.shape == labels.shape
        for c in np.unique(labels):
            assert np.unique(scale[labels == c]).size == 1
        assert np.unique(scale).size == np.unique(labels).size
        checked += 1
    assert checked == 9
    opts = ort.SessionOptions()  # per-channel activation zero points: ORT's int8 fusion refuses them
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort_session(model, session_options=opts)
    out = session.run(None, make_feed(session.get_inputs(), IDS))[0]
    assert np.abs(out - reference).max() / np.abs(reference).max() < 0.05


def test_kmeans_labels_rank_clusters_by_range_and_plot_is_png(token_windows):
    lo = np.array([-1.0, -1.1, -50.0, -0.9, -49.0, -10.0])
    hi = np.array([1.0, 1.2, 60.0, 0.8, 55.0, 11.0])
    labels = cluster_channels(lo, hi, 3)
    assert labels.tolist() == [0, 0, 2, 0, 2, 1]
    _, ctx, _, _ = _reordered("rms", "fused", token_windows)
    png = base64.b64decode(ctx.report["reorder"]["plot"]["png_base64"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_attention_output_order_stays_inside_heads_and_agrees_across_gqa_replicas():
    # 6 query heads of 4 channels reading 2 v heads (3 replicas each): o input channel c reads
    # v channel cmap[c]
    c = np.arange(24)
    cmap = (c // 4 // 3) * 4 + c % 4
    labels = np.random.default_rng(0).integers(0, 5, 24)
    perm = head_local_order(labels, cmap, 4)
    assert sorted(perm.tolist()) == c.tolist() and np.all(perm // 4 == c // 4)
    v_read = cmap[perm].reshape(2, 3, 4)
    assert np.all(v_read == v_read[:, :1])  # every replica of a v head in the same order
    v_labels = np.zeros(8, labels.dtype)
    np.maximum.at(v_labels, cmap, labels)
    assert np.all(np.diff(v_labels[v_read[:, 0]], axis=1) >= 0)  # sorted by the largest replica label

    site = SimpleNamespace(name="o_proj")
    target = FoldTarget("attention_v", [site], producer=SimpleNamespace(out_features=8), channel_map=cmap, head_dim=4)
    pperm = producer_permutation(target, perm)
    assert sorted(pperm.tolist()) == list(range(8))
    np.testing.assert_array_equal(pperm[cmap], cmap[perm])
    with pytest.raises(ValueError, match="across attention heads"):
        producer_permutation(target, np.roll(c, 1))
    skewed = c.copy()
    skewed[[0, 1]] = [1, 0]  # query head 0 swaps two channels, its replicas (heads 1, 2) do not
    with pytest.raises(ValueError, match="differs between query heads"):
        producer_permutation(target, skewed)


def test_modified_only_when_a_permutation_was_applied(token_windows):
    """One cluster per input: every order is already contiguous, so the pass edits nothing and
    says so (cluster labels alone are an analysis, not a graph change)."""
    import onnx_ir as ir

    model = tiny_decoder()
    ctx = CompileContext(model, load_recipe("w8a8", ["reorder.clusters=1", FEEDERS]), CalibrationData(token_windows))
    for p in canonicalize_passes():
        p(model)
    ObservePass(ctx, [CalibrationAccumulator()])(model)
    before = ir.to_proto(model).SerializeToString()
    result = ReorderPass(ctx)(model)
    assert not result.modified and ctx.report["reorder"]["permuted_groups"] == 0
    assert ir.to_proto(model).SerializeToString() == before
    assert ctx.analyses.get(ACT_CLUSTERS)  # the per-cluster ranges are still recorded
