"""KV quantization: static Q/DQ on every attention K/V input at each granularity, exact against
numpy, ranges from the shared calibration run (V's kept exact through smoothing); on tiny graphs
and on both real SmolLM2-135M graphs (fused opset-23 ``Attention``; decomposed opset-18 with a
KV cache, ``past_key_values`` in, ``present`` out)."""

from collections import Counter

import numpy as np
import pytest

from lowbit.core.context import CalibrationData, CompileContext
from lowbit.compiler.api import load_onnx
from lowbit.ort.feeds import build_feeds, make_feed
from lowbit.ort.session import ort_session, run_on_tokens
from lowbit.compiler.pipeline import run_pipeline
from lowbit.core.recipe import load_recipe
from lowbit.models.synthetic import tiny_decoder
from lowbit.ort.observe import ObservePass
from lowbit.passes.calibrate import CalibrationAccumulator
from lowbit.passes.capture import CaptureAccumulator
from lowbit.core.initializers import SCALE_FLOOR
from lowbit.passes.canonicalize import canonicalize_passes
from lowbit.emit.kv import kv_qparams, kv_range
from lowbit.core.kv_sites import kv_inputs, to_channels
from lowbit.core.linear_sites import find_linear_sites
from lowbit.passes.smooth import SmoothPass
from lowbit.core.analyses import Key
from lowbit.core.statistics import ACTIVATION_STATS

IDS = np.arange(20, dtype=np.int64) * 7 % 64
_QMAX = {"int8": 127, "int4": 7}
KV_LAYOUTS: Key[dict] = Key("test_kv_layouts", "K/V layouts of the float graph, kept for the checks")


def compile_ctx(model, recipe: str, overrides: list[str], windows) -> CompileContext:
    ctx = CompileContext(model, load_recipe(recipe, overrides), CalibrationData([np.asarray(w) for w in windows]))
    # K/V layouts from the float graph (after emission the attentions read Q/DQ outputs)
    ctx.analyses.put(KV_LAYOUTS, {kv.value.name: kv for kv in kv_inputs(find_linear_sites(model.graph))})
    run_pipeline(ctx)
    return ctx


def fake_quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, fmt: str) -> np.ndarray:
    """The numpy reference of the emitted Q/DQ: float32 x / s, round half to even, saturate."""
    if zero is None:
        return (np.clip(np.rint(x / scale), -_QMAX[fmt] - 1, _QMAX[fmt]) * scale).astype(np.float32)
    zero = zero.astype(np.float32)
    return ((np.clip(np.rint(x / scale + zero), 0, 2 * _QMAX[fmt] + 1) - zero) * scale).astype(np.float32)


def fake_quantize_dynamic(x: np.ndarray, kv, scale: np.ndarray, fmt: str) -> np.ndarray:
    """Reference of dynamic K or V: normalise by the static scale, one scale per token and head."""
    normed = to_channels(x, kv) / scale  # [tokens, heads * head_dim]
    tokens, heads = normed.shape[0], kv.heads(x.shape)
    per_head = normed.reshape(tokens, heads, -1)
    token_scale = np.maximum(np.abs(per_head).max(axis=-1, keepdims=True) / np.float32(_QMAX[fmt]), SCALE_FLOOR)
    q = np.clip(np.rint(per_head / token_scale), -_QMAX[fmt] - 1, _QMAX[fmt])
    return ((q * token_scale).reshape(tokens, -1) * scale).astype(np.float32)


def check_kv_exact(ctx: CompileContext, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every K/V consumer reads the numpy fake-quantization (calibrated scales) of the float K/V;
    returns the observed float and dequantized tensors by name."""
    spec, stats, model = ctx.recipe.kv, ctx.analyses.get(ACTIVATION_STATS), ctx.model
    layouts = ctx.analyses.get(KV_LAYOUTS)
    names = list(stats.kv_shapes)
    assert set(names) == set(layouts)
    values = {v.name: v for n in model.graph for v in n.outputs}
    for name, kv in layouts.items():  # every K/V consumer reads the DQ, nothing else reads the float
        assert values[f"{name}.kv_dequantized"] in kv.consumer.inputs and kv.value not in kv.consumer.inputs
    wanted = [values[n] for n in names] + [values[f"{n}.kv_dequantized"] for n in names]
    session = ort_session(model, wanted)
    outs = dict(zip([v.name for v in wanted], session.run([v.name for v in wanted], build_feeds(session, ids[None]))))
    for name in names:
        kv = layouts[name]
        heads = kv.heads(stats.kv_shapes[name])
        scale, zero = kv_qparams(*kv_range(stats[name], spec), heads, spec)
        if (spec.dynamic_k and kv.role == "k") or (spec.dynamic_v and kv.role == "v"):
            want = fake_quantize_dynamic(outs[name], kv, scale, spec.format)
        else:
            want = fake_quantize(to_channels(outs[name], kv), scale, zero, spec.format)
        np.testing.assert_array_equal(to_channels(outs[f"{name}.kv_dequantized"], kv), want)
    return outs


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_head", "per_channel"])
@pytest.mark.parametrize("form", ["fused", "decomposed"])
def test_kv_qdq_is_exact(fmt, granularity, form, token_windows):
    reference = run_on_tokens(tiny_decoder(norm_form=form), IDS)[0]
    ctx = compile_ctx(tiny_decoder(norm_form=form), "w8", ["weights.format=none", f"kv.format={fmt}",
                      f"kv.granularity={granularity}"], token_windows)  # fmt: skip
    ops = Counter(n.op_type for n in ctx.model.graph)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 2 * 2  # K and V of 2 layers
    form_used = {"per_tensor": "per_tensor", "per_head": "per_axis", "per_channel": "broadcast"}[granularity]
    assert ctx.report["kv"]["forms"] == {form_used: 4}
    for q in (n for n in ctx.model.graph if n.op_type == "QuantizeLinear"):
        assert q.outputs[0].type.dtype.name == ("INT8" if fmt == "int8" else "INT4")
        if granularity == "per_head":
            assert q.inputs[1].const_value.numpy().shape == (4,) and q.attributes.get_int("axis") == 1
    check_kv_exact(ctx, IDS)
    out = run_on_tokens(ctx.model, IDS)[0]
    rel = np.abs(out - reference).max() / np.abs(reference).max()
    assert 0 < rel < (0.02 if fmt == "int8" else 0.3)


@pytest.mark.parametrize("form", ["fused", "decomposed"])
def test_kv_asymmetric_per_channel_is_exact(form, token_windows):
    ctx = compile_ctx(tiny_decoder(norm_form=form), "w8", ["weights.format=none", "kv.format=int4",
                      "kv.granularity=per_channel", "kv.symmetric=false"], token_windows)  # fmt: skip
    assert {n.outputs[0].type.dtype.name for n in ctx.model.graph if n.op_type == "QuantizeLinear"} == {"UINT4"}
    check_kv_exact(ctx, IDS)


@pytest.mark.parametrize("form", ["fused", "decomposed"])
def test_kv_dynamic_k_is_exact(form, token_windows):
    ctx = compile_ctx(tiny_decoder(norm_form=form), "w8", ["weights.format=none", "kv.format=int4",
                      "kv.granularity=per_channel", "kv.dynamic_k=true"], token_windows)  # fmt: skip
    assert ctx.report["kv"]["forms"] == {"dynamic": 2, "broadcast": 2}
    check_kv_exact(ctx, IDS)


@pytest.mark.parametrize("form", ["fused", "decomposed"])
def test_kv_dynamic_k_and_v_are_exact(form, token_windows):
    ctx = compile_ctx(tiny_decoder(norm_form=form), "w8", ["weights.format=none", "kv.format=int4",
                      "kv.granularity=per_channel", "kv.dynamic_k=true", "kv.dynamic_v=true"], token_windows)  # fmt: skip
    assert ctx.report["kv"]["forms"] == {"dynamic": 4}
    check_kv_exact(ctx, IDS)


@pytest.mark.parametrize("form", ["fused", "decomposed"])
def test_kv_percentile_clipped_ranges_are_exact(form, token_windows):
    ctx = compile_ctx(tiny_decoder(norm_form=form), "w8", ["weights.format=none", "kv.format=int4",
                      "kv.granularity=per_channel", "kv.range=percentile", "kv.percentile=90"], token_windows)  # fmt: skip
    stats = ctx.analyses.get(ACTIVATION_STATS)
    clipped = [np.any(stats[n].percentile < stats[n].absmax) for n in stats.kv_shapes]
    assert all(clipped) and ctx.report["kv"]["range"] == "percentile"
    check_kv_exact(ctx, IDS)


def test_per_channel_ranges_are_finer_than_per_head(token_windows):
    """Per-channel scales never exceed the head's scale, and K/V error shrinks with them."""
    errors = {}
    for granularity in ("per_head", "per_channel"):
        ctx = compile_ctx(tiny_decoder(norm_form="fused"), "w8", ["weights.format=none", "kv.format=int4",
                          f"kv.granularity={granularity}"], token_windows)  # fmt: skip
        outs = check_kv_exact(ctx, IDS)
        errors[granularity] = sum(float(np.sum((outs[f"{n}.kv_dequantized"] - outs[n]) ** 2))
                                  for n in ctx.analyses.get(ACTIVATION_STATS).kv_shapes)  # fmt: skip
    assert errors["per_channel"] < errors["per_head"]


def _calibrated(model, overrides, windows) -> CompileContext:
    ctx = CompileContext(model, load_recipe("w4a8-kv4", overrides), CalibrationData([np.asarray(w) for w in windows]))
    for p in canonicalize_passes():
        p(model)
    ObservePass(ctx, [CalibrationAccumulator(), CaptureAccumulator(64)])(model)
    return ctx


def test_v_ranges_follow_smoothing_exactly(token_windows):
    """V's per-channel range derived through smoothing's scales equals a fresh calibration of the
    smoothed model (which the KV pass would otherwise have to rerun)."""
    model = tiny_decoder(norm_form="fused")
    ctx = _calibrated(model, [], token_windows)
    ctx.analyses.graph_edited()
    SmoothPass(ctx)(model)
    assert any(g["folded"] and g["feeder"] == "attention_v" for g in ctx.report["smooth"]["groups"].values())
    derived, fresh = ctx.analyses.get(ACTIVATION_STATS), _calibrated(model, [], token_windows).analyses.get(ACTIVATION_STATS)
    assert sorted(n for pairs in derived.links.values() for n, _ in pairs) == sorted(
        n for n in derived.kv_shapes if n in {v for pairs in fresh.links.values() for v, _ in pairs})
    assert len(derived.links) == 2  # V of both layers
    for name in derived.kv_shapes:
        for attr in ("min", "max", "absmax"):
            np.testing.assert_allclose(getattr(derived[name], attr), getattr(fresh[name], attr), rtol=1e-5, atol=1e-6)


KV4 = ["weights.format=none", "kv.format=int4", "kv.granularity=per_channel", "kv.range=percentile"]


def _outputs(session, feeds: dict) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@pytest.mark.slow
def test_fused_attention_reads_exact_per_channel_kv(smollm2_export, calib_windows):
    ids = calib_windows[0][:64]
    ctx = compile_ctx(load_onnx(smollm2_export / "model.onnx"), "w8", KV4, [w[:64] for w in calib_windows[:2]])
    assert ctx.report["kv"]["tensors"] == 60 and ctx.report["kv"]["forms"] == {"broadcast": 60}
    layouts = ctx.analyses.get(KV_LAYOUTS)
    assert {kv.consumer.op_type for kv in layouts.values()} == {"Attention"}
    assert {ctx.analyses.get(ACTIVATION_STATS).kv_shapes[n][1:] for n in layouts} == {(9, 64, 64)}  # [B, heads, S, D]
    check_kv_exact(ctx, ids)


@pytest.mark.slow
def test_with_past_export_quantizes_the_cache_read_not_the_present_outputs(smollm2_with_past_export, calib_windows):
    """K (through the QK^T MatMul's transposed, scaled input) and V of all 30 layers read Q/DQ;
    the ``present.*`` outputs stay the float cache; decoding with a past equals the full run."""
    path = smollm2_with_past_export / "model.onnx"
    ids = calib_windows[0][:33]
    ctx = compile_ctx(load_onnx(path), "w8", KV4, [w[:64] for w in calib_windows[:2]])
    layouts = ctx.analyses.get(KV_LAYOUTS)
    roles = sorted(kv.role for kv in layouts.values())
    assert roles == ["k"] * 30 + ["v"] * 30 and {kv.consumer.op_type for kv in layouts.values()} == {"MatMul"}
    check_kv_exact(ctx, ids)
    session, float_session = ort_session(ctx.model), ort_session(load_onnx(path))
    quantized = _outputs(session, build_feeds(session, ids[None]))
    reference = _outputs(float_session, build_feeds(float_session, ids[None]))
    presents = [v for v in ctx.model.graph.outputs if v.name.startswith("present.")]
    assert len(presents) == 60
    # the cache outputs stay the float K/V (the Concat of past and new), never a DQ output; layer
    # 0's are bit-identical to the float model's (later layers see quantized attention upstream)
    assert {v.producer().op_type for v in presents} == {"Concat"}
    for name in ("present.0.key", "present.0.value"):
        np.testing.assert_array_equal(quantized[name], reference[name])
    assert not np.allclose(quantized["logits"], reference["logits"], atol=1e-3)
    # one decode step on the float cache of the first 32 tokens: static Q/DQ is idempotent and
    # elementwise per (head, channel), so it equals the last position of the full 33-token run
    prefix = _outputs(session, build_feeds(session, ids[None, :32]))
    past = {n.replace("present.", "past_key_values."): v for n, v in prefix.items() if n.startswith("present.")}
    step = _outputs(session, make_feed(session.get_inputs(), ids[None, 32:], past=past))
    np.testing.assert_allclose(step["logits"][0, -1], quantized["logits"][0, -1], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_real_v_ranges_after_smoothing_equal_a_rerun(smollm2_export, calib_windows):
    """On SmolLM2 (AQAS folds scales into v_proj): V's derived ranges == a fresh calibration."""
    windows = [w[:64] for w in calib_windows[:2]]
    model = load_onnx(smollm2_export / "model.onnx")
    kv = ["kv.granularity=per_channel", "kv.range=percentile"]
    ctx = _calibrated(model, kv, windows)
    ctx.analyses.graph_edited()
    SmoothPass(ctx)(model)
    folded = [k for k, g in ctx.report["smooth"]["groups"].items() if g["folded"] and g["feeder"] == "attention_v"]
    assert folded  # some o_proj groups were rescaled through v_proj
    derived, fresh = ctx.analyses.get(ACTIVATION_STATS), _calibrated(model, kv, windows).analyses.get(ACTIVATION_STATS)
    assert len(derived.links) == 30
    for pairs in derived.links.values():
        for name, _ in pairs:
            for attr in ("min", "max", "absmax", "percentile"):
                np.testing.assert_allclose(getattr(derived[name], attr), getattr(fresh[name], attr), rtol=1e-4, atol=1e-5)
