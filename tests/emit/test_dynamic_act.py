"""Dynamic per-token-group activation quantization: the emitted standard-op graph equals its numpy
reference bit for bit in ONNX Runtime (as written and at ORT's default optimization level), on a
hand-built graph and at every site of a compiled decoder."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import lowbit
from lowbit.errors import LowbitError
from lowbit.models.synthetic import tiny_decoder
from lowbit.emit.dynamic_act import dynamic_group_nodes, fake_quant, group_qmax
from lowbit.core.initializers import SCALE_FLOOR

_DYNAMIC = ["activations.granularity=per_token_group", "activations.group_size=16", "activations.outlier_format=none",
            "rounding.method=rtn"]


def _sessions(proto: bytes) -> list[ort.InferenceSession]:
    basic = ort.SessionOptions()
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return [ort.InferenceSession(proto, basic), ort.InferenceSession(proto)]  # as written, default (ALL)


def test_group_graph_equals_numpy_reference_bit_exact():
    channels, group = 96, 32
    x = ir.Value(name="x", shape=ir.Shape(["batch", "seq", channels]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="g")
    qmax = group_qmax("int4", channels, group, np.array([70]))  # channel 70 -> group 2 in int8
    assert qmax.tolist() == [7.0, 7.0, 127.0]
    nodes, out = dynamic_group_nodes(graph, x, channels, group, qmax, "x")
    graph.extend(nodes)
    graph.outputs.append(out)
    proto = ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString()
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((2, 5, channels)) * np.exp(2 * rng.standard_normal(channels))).astype(np.float32)
    a[0, 0, :group] = 0.0  # an all-zero group stays zero (no 0/0)
    a[1, 0, :group] = 0.0
    a[1, 0, :4] = [7.0, 2.5, -3.5, 0.5]  # scale 1: ties must round half to even -> 2, -4, 0
    want = fake_quant(a, group, qmax)
    assert want[1, 0, :4].tolist() == [7.0, 2.0, -4.0, 0.0] and not want[0, 0, :group].any()
    for session in _sessions(proto):
        np.testing.assert_array_equal(session.run(None, {"x": a})[0], want)
    grouped = a.reshape(2, 5, 3, group)
    codes = np.rint(grouped / np.maximum(np.abs(grouped).max(-1, keepdims=True) / qmax[:, None], SCALE_FLOOR))
    assert np.abs(codes[..., :2, :]).max() <= 7 and np.abs(codes[..., 2, :]).max() <= 127


@pytest.fixture(scope="module")
def dynamic_decoder(token_windows):
    return lowbit.compile(tiny_decoder(norm="rms", norm_form="fused"), "w4a4-rptq", calibration=token_windows,
                          overrides=_DYNAMIC + ["reorder.clusters=4"])  # fmt: skip


def test_every_site_input_is_quantized_exactly_in_ort(dynamic_decoder, token_windows):
    graph = dynamic_decoder.model.graph
    rounds = [n for n in graph if n.op_type == "Round"]
    assert len(rounds) == 9  # one per distinct site input: qkv, o, gate/up, down x 2 layers + lm_head
    assert not any(n.op_type in ("QuantizeLinear",) for n in graph)
    pairs = []  # (site input, its dequantized value) for every dynamic quantizer
    for r in rounds:
        base = r.name.removesuffix(".codes")
        group = next(n for n in graph if n.name == f"{base}.group")
        out = next(n for n in graph if n.name == f"{base}.ungroup").outputs[0]
        qmax = graph.initializers[f"{base}.group_qmax"].const_value.numpy().reshape(-1)
        pairs.append((group.inputs[0], out, qmax))
    graph.outputs.extend(v for p in pairs for v in p[:2] if v not in graph.outputs)
    proto = ir.to_proto(dynamic_decoder.model).SerializeToString()
    names = [v.name for v in graph.outputs]
    feed = {"input_ids": token_windows[0][None]}
    for session in _sessions(proto):
        outs = dict(zip(names, session.run(None, feed)))
        for x, out, qmax in pairs:
            assert len(qmax) * 16 == outs[x.name].shape[-1]
            np.testing.assert_array_equal(outs[out.name], fake_quant(outs[x.name], 16, qmax), err_msg=x.name)


def test_report_gives_bits_per_activation(dynamic_decoder):
    site = dynamic_decoder.report["sites"]["layers.0.mlp.down_proj"]
    assert site["activation_groups"] == 3 and site["activation_int8_groups"] == 0
    assert site["bits_per_activation"] == pytest.approx(4 + 32 / 16)


def test_outlier_cluster_groups_use_int8(token_windows):
    result = lowbit.compile(tiny_decoder(norm="rms", norm_form="fused"), "w4a4-rptq", calibration=token_windows,
                            overrides=_DYNAMIC + ["reorder.clusters=4", "activations.outlier_format=int8"])  # fmt: skip
    sites = result.report["sites"]
    int8_groups = [s["activation_int8_groups"] for s in sites.values() if s.get("quantized")]
    assert all(1 <= g for g in int8_groups)  # the widest cluster always exists
    qkv = sites["layers.0.self_attn.q_proj"]
    want = 4 + 4 * qkv["activation_int8_groups"] / qkv["activation_groups"] + 32 / 16
    assert qkv["bits_per_activation"] == pytest.approx(want)


def test_group_size_falls_back_to_a_divisor_and_refuses_none_before_calibration(token_windows, monkeypatch):
    from lowbit.encode.activations import dynamic_group_size
    from lowbit.ort import observe

    assert [dynamic_group_size(32, g) for g in (0, 64, 32, 24, 16, 8)] == [32, 32, 32, 16, 16, 8]
    assert dynamic_group_size(576, 64) == 64 and dynamic_group_size(576, 128) == 96
    out = lowbit.compile(tiny_decoder(norm="rms", norm_form="fused"), "w4a4-rptq", calibration=token_windows,
                         overrides=["activations.granularity=per_token_group", "activations.group_size=24"])
    sizes = {(e["in_features"], e["activation_group_size"]) for e in out.report["sites"].values() if "activation_group_size" in e}
    assert (32, 16) in sizes and all(size == dynamic_group_size(width, 24) for width, size in sizes)

    def not_before_the_check(*args, **kwargs):
        raise AssertionError("the model was run before the group size was checked")

    monkeypatch.setattr(observe, "default_runner", not_before_the_check)
    with pytest.raises(LowbitError, match="group_size 7: no group of 7 to 7 channels divides the 32 channels"):
        lowbit.compile(tiny_decoder(norm="rms", norm_form="fused"), "w4a4-rptq", calibration=token_windows,
                       overrides=["activations.granularity=per_token_group", "activations.group_size=7"])  # fmt: skip
