"""QDQ emission: the weights ONNX decodes equal lowbit.formats fake-quantization bit for bit.

`qdq` graphs are decoded by ONNX Runtime; `qdq-fp4` graphs (FLOAT4E2M1 + FP8 scale chains, which
ORT CPU cannot run) by onnx.reference.
"""

from collections import Counter

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lowbit import formats
from lowbit.core.context import CompileContext
from lowbit.core.recipe import load_recipe
from lowbit.models.synthetic import tiny_decoder
from lowbit.emit.qdq import EmitQDQPass, ensure_opset
from lowbit.encode.weights import EncodeWeightsPass

CASES = [  # (format, block_size, symmetric)
    ("int8", 0, True), ("int8", 0, False), ("int4", 16, True), ("int4", 0, True), ("int4", 16, False),
    ("int3", 8, True), ("dint4", 16, True), ("dint4", 0, True), ("fp8_e4m3", 0, True),
    ("fp4_e2m1", 16, True), ("nvfp4", 16, True), ("mxfp4", 32, True), ("mxfp8", 32, True),
]  # fmt: skip


def _weights_only(fmt: str, block: int, symmetric: bool, target: str = "qdq"):
    model = tiny_decoder(norm="rms", norm_form="fused")
    originals = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    recipe = load_recipe("w8", [f"weights.format={fmt}", f"weights.block_size={block}",
                                f"weights.symmetric={'true' if symmetric else 'false'}", f"target={target}"])  # fmt: skip
    ctx = CompileContext(model, recipe)
    sites = list(ctx.sites)
    EncodeWeightsPass(ctx)(model)
    EmitQDQPass(ctx)(model)
    return model, sites, originals


def _decoded_weights(model: ir.Model, sites, runner: str) -> dict[str, np.ndarray]:
    """Expose every site's dequantized weight as a graph output and run the graph."""
    by_name = {f"{s.name}.dequantized": s for s in sites}
    values = [v for n in model.graph for v in n.outputs if v.name in by_name]
    model.graph.outputs.extend(values)
    proto = ir.to_proto(model)
    ids = np.arange(5, dtype=np.int64)[None]
    if runner == "ort":
        outs = ort.InferenceSession(proto.SerializeToString()).run([v.name for v in values], {"input_ids": ids})
    else:
        outs = onnx.reference.ReferenceEvaluator(proto).run([v.name for v in values], {"input_ids": ids})
    return {by_name[v.name].name: o for v, o in zip(values, outs)}


def _bits(x: np.ndarray) -> np.ndarray:
    # +0.0 turns -0.0 into +0.0: int8 codes have no negative zero (E2M1's -0 code decodes to +0
    # in the `qdq` target); every other bit must match.
    return (x + np.float32(0.0)).view(np.uint32)


def _expected(site, w: np.ndarray, fmt: str, block: int, symmetric: bool) -> np.ndarray:
    default = {"nvfp4": 16, "mxfp4": 32, "mxfp8": 32}.get(fmt)
    return formats.fake_quantize(w, fmt, axis=site.reduction_axis, block_size=block or default, symmetric=symmetric)


@pytest.mark.parametrize("fmt,block,symmetric", CASES)
def test_qdq_weights_decode_bit_exact_in_ort(fmt, block, symmetric):
    model, sites, originals = _weights_only(fmt, block, symmetric)
    decoded = _decoded_weights(model, sites, "ort")
    assert len(decoded) == len(sites) == 15
    for site in sites:
        want = _expected(site, originals[site.weight.name], fmt, block, symmetric)
        np.testing.assert_array_equal(_bits(decoded[site.name]), _bits(want), err_msg=site.name)


@pytest.mark.parametrize("fmt,block", [("nvfp4", 16), ("fp4_e2m1", 16), ("mxfp4", 32)])
def test_qdq_fp4_target_uses_float4_and_decodes_bit_exact_with_reference(fmt, block):
    model, sites, originals = _weights_only(fmt, block, True, target="qdq-fp4")
    f4 = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT4E2M1]
    assert len(f4) == len(sites)
    if fmt == "nvfp4":  # block scales are FP8 codes dequantized by the FP32 global scale
        f8 = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT8E4M3FN]
        assert len(f8) == len(sites)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    decoded = _decoded_weights(model, sites, "reference")
    for site in sites[:5] + sites[-1:]:  # the reference evaluator is slow; a representative subset
        want = _expected(site, originals[site.weight.name], fmt, block, True)
        np.testing.assert_array_equal(_bits(decoded[site.name]), _bits(want), err_msg=site.name)


def test_int4_weights_are_stored_as_real_4bit_tensors():
    model, sites, _ = _weights_only("int4", 32, True)
    types = Counter(v.const_value.dtype for v in model.graph.initializers.values() if v.name.endswith(".q"))
    assert types == {ir.DataType.INT4: len(sites)}


def test_activation_qdq_is_shared_by_sibling_sites(token_windows):
    import lowbit

    result = lowbit.compile(tiny_decoder(norm="rms", norm_form="fused"), "w8a8", calibration=token_windows)
    graph = result.model.graph
    q_nodes = [n for n in graph if n.op_type == "QuantizeLinear"]
    # one Q per distinct site input: per layer qkv, o, gate/up, down (4 x 2 layers) + lm_head input
    assert len(q_nodes) == 9
    assert all(n.outputs[0].dtype == ir.DataType.UINT8 for n in q_nodes)
    qkv = [n for n in graph if n.op_type == "MatMul" and n.inputs[1].name and "self_attn" in n.inputs[1].name][:3]
    assert len({id(n.inputs[0]) for n in qkv}) == 1
    report = result.report["sites"]["layers.0.mlp.down_proj"]
    assert report["quantized"] and report["weights"] == "int8"
    assert report["bits_per_weight"] == pytest.approx(8 + 32 / 48)


def test_ensure_opset_raises_model_and_functions():
    model = tiny_decoder(norm="rms", norm_form="decomposed")
    from lowbit.passes.norm_fusion import FuseNormsPass

    FuseNormsPass()(model)
    ensure_opset(model, 21)
    assert model.opset_imports[""] == 21 and model.ir_version == 10
    assert all(f.opset_imports[""] == 21 for f in model.functions.values())
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_int8_weights_become_uint8_with_zero_point_128_beside_uint8_activations(token_windows):
    import lowbit

    model = tiny_decoder(norm="rms", norm_form="fused")
    originals = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    result = lowbit.compile(model, "w8a8", calibration=token_windows)
    graph = result.model.graph
    site = "layers.0.mlp.up_proj"
    codes = graph.initializers[f"{site}.q"].const_value
    zero_point = graph.initializers[f"{site}.zero_point"].const_value.numpy()
    scale = graph.initializers[f"{site}.scale"].const_value.numpy()
    assert codes.dtype == ir.DataType.UINT8 and set(np.unique(zero_point)) == {128}
    decoded = (codes.numpy().astype(np.float32) - 128) * scale
    want = formats.fake_quantize(originals[f"{site}.weight"], "int8", axis=0)
    np.testing.assert_array_equal(decoded, want)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_activation_scales_run_at_ort_default_options(symmetric, token_windows):
    import lowbit

    result = lowbit.compile(tiny_decoder(norm="rms", norm_form="fused"), "w8a8", calibration=token_windows,
                            overrides=["activations.granularity=per_channel", f"activations.symmetric={str(symmetric).lower()}"])  # fmt: skip
    proto = ir.to_proto(result.model).SerializeToString()
    feed = {"input_ids": token_windows[0][None]}
    basic = ort.SessionOptions()
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    as_written = ort.InferenceSession(proto, basic).run(None, feed)[0]
    assert np.isfinite(ort.InferenceSession(proto).run(None, feed)[0]).all()  # default options: used to fail
    # At default options ORT fuses the weight DQ into MatMulNBits, which re-quantizes activations
    # to int8 (accuracy_level 4); at accuracy level 0 the fused graph is the graph as written.
    exact = ort.SessionOptions()
    exact.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    fused = ort.InferenceSession(proto, exact).run(None, feed)[0]
    np.testing.assert_allclose(fused, as_written, rtol=1e-5, atol=1e-5 * np.abs(as_written).max())
    assert sum(n.op_type == "Mul" and n.name.endswith(".dq_scale") for n in result.model.graph) == 9


@pytest.mark.parametrize("fmt,block,symmetric", CASES)
@pytest.mark.parametrize("target", ["qdq", "qdq-fp4"])
def test_stored_codes_of_a_large_weight_are_written_a_slice_at_a_time(fmt, block, symmetric, target, monkeypatch):
    """A vocabulary-sized head's codes are decoded a slice of rows at a time: the stored array is
    byte for byte the one decoded whole."""
    from lowbit.emit import qdq

    x = np.random.default_rng(7).standard_normal((203, 64)).astype(np.float32)
    enc = formats.encode(x, fmt, 1, block or None, symmetric=symmetric)
    whole = [qdq.stored_codes(enc, fmt, target, unsigned_int8=u) for u in (False, True)]
    monkeypatch.setattr(qdq, "_STORE_SLICE", 64 * 5)  # slices of 5 rows, the last one shorter
    sliced = [qdq.stored_codes(enc, fmt, target, unsigned_int8=u) for u in (False, True)]
    for (a, *_), (b, *_) in zip(whole, sliced):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
