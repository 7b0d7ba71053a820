"""Target npu on the tiny decoder: standard ops and integer types only, per-tensor activation QDQ,
symmetric per-channel weights, RPTQ clusters as split MatMuls that equal the qdq target's
per-channel-scale graph, power-of-two scales, int4 storage, Gemm sites, recipe validation, and
integer execution in ONNX Runtime (optimized graph) and OpenVINO (runtime model)."""

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import lowbit
from lowbit.core.recipe import load_recipe
from lowbit.errors import LowbitError
from lowbit.models.synthetic import tiny_decoder
from lowbit.emit.npu import power_of_two

INTEGER_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits")
STANDARD_OPS = {"QuantizeLinear", "DequantizeLinear", "MatMul", "Split", "Gather", "Sum", "Transpose", "Reshape",
                "Mul", "Add", "RMSNormalization", "Softmax", "Sigmoid"}  # fmt: skip
# int7 weights: |code| <= 63 keeps uint8 x int8 pair sums inside int16 (255 * 63 * 2 < 32767), so
# CPUs without VNNI run the fused kernels exactly (the test below says what a VNNI CPU gives); see the README.
# static per-cluster activations and round-to-nearest weights, as npu-w8a8 (w8a8-rptq's activations
# are dynamic and its weights OPTQ-rounded since the tuning texts chose them)
STATIC = ["activations.granularity=per_tensor", "activations.symmetric=false", "activations.group_size=0",
          "rounding.method=rtn"]
NPU = ["weights.format=int7", "reorder.clusters=8", *STATIC]  # the npu-w8a8 recipe's grid and clusters


def _compile(windows, target="npu", overrides=(), recipe="w8a8-rptq"):
    return lowbit.compile(tiny_decoder(), recipe, target=target, calibration=windows, overrides=[*NPU, *overrides])


@pytest.fixture(scope="module")
def npu(token_windows):
    return _compile(token_windows)


def _run(model: ir.Model, ids, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, optimized_path=None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    opts.log_severity_level = 3
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts).run(None, {"input_ids": ids[None]})[0]


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_only_standard_integer_qdq(npu):
    result = npu
    graph = result.model.graph
    assert {n.domain for n in graph} == {""} and {n.op_type for n in graph} <= STANDARD_OPS
    for n in graph:
        if n.op_type == "QuantizeLinear":
            assert n.outputs[0].dtype == ir.DataType.UINT8
            assert n.inputs[1].const_value.shape == () and n.inputs[2].const_value.shape == ()  # per tensor
        if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None:  # a weight
            codes = n.inputs[0].const_value.numpy()
            assert codes.dtype == np.int8 and np.abs(codes).max() <= 63
            assert not n.inputs[2].const_value.numpy().any() and n.attributes.get_int("axis") == 1
    quantized = [n for n in graph if n.op_type == "MatMul" and n.inputs[1].producer().op_type == "DequantizeLinear"]
    for n in quantized:  # every weight DQ meets a per-tensor activation DQ of its own
        act = n.inputs[0].producer()
        assert act.op_type == "DequantizeLinear" and len(act.outputs[0].uses()) == 1
        assert act.inputs[1].const_value.shape == ()
    assert len(quantized) == result.report["npu"]["partial_matmuls"]


def test_split_matmuls_equal_the_qdq_target(npu, token_windows):
    qdq = _compile(token_windows, target="qdq")
    ids = token_windows[1]
    # same weights, same per-cluster ranges; only the float32 summation order differs
    assert _rel(_run(npu.model, ids), _run(qdq.model, ids)) < 1e-5
    report = npu.report["npu"]
    # reordered inputs (norm-fed, down_proj) -> one Split each; o_proj inputs (attention_v, never
    # permuted) -> one Gather per cluster
    assert (report["split_inputs"], report["gathered_inputs"]) == (7, 2)
    partials = [s["npu_partials"] for s in npu.report["sites"].values() if s.get("quantized")]
    assert len(partials) == 15 and report["partial_matmuls"] == sum(partials) > 15


def test_ort_fuses_every_partial_matmul_into_an_integer_kernel(npu, token_windows, tmp_path):
    ids = token_windows[1]
    fused = _run(npu.model, ids, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, tmp_path / "optimized.onnx")
    kernels = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert sum(kernels[k] for k in INTEGER_KERNELS) == kernels["MatMulIntegerToFloat"] == npu.report["npu"]["partial_matmuls"]
    assert _rel(fused, _run(npu.model, ids)) < 1e-5  # the integer kernels compute the graph as written


def test_openvino_runs_every_partial_matmul_in_int8(npu, token_windows, tmp_path):
    from lowbit.models.openvino_session import OpenVinoSession, integer_matmuls

    path = npu.save(tmp_path / "npu.onnx")
    session = OpenVinoSession(path)
    assert integer_matmuls(session) == npu.report["npu"]["partial_matmuls"]
    ids = token_windows[1]
    logits = session.run(None, {"input_ids": ids[None]})[0]
    gap = _rel(logits, _run(npu.model, ids))
    if _x86_without_vnni():  # AVX2 EPYC: OpenVINO's u8 kernels reproduce the QDQ graph
        assert gap < 1e-5
    else:  # AVX-512 VNNI EPYC (2026-12-04): measured 1.13e-2 on this tiny model, cause not yet found
        assert gap < 2e-2


def _x86_without_vnni() -> bool:
    import platform
    from pathlib import Path

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    flags = Path("/proc/cpuinfo").read_text().split()
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def test_full_range_int8_weights_saturate_without_vnni(token_windows):
    """Why the npu recipes store int7: measured, not assumed. ORT's uint8 x int8 kernel on x86
    without VNNI (VPMADDUBSW) saturates int16 pair sums with full-range int8 weights."""
    ids = token_windows[1]
    full = lowbit.compile(tiny_decoder(), "w8a8-rptq", target="npu", calibration=token_windows, overrides=STATIC).model
    assert np.abs(full.graph.initializers["layers.0.mlp.down_proj.q0"].const_value.numpy()).max() == 127
    gap = _rel(_run(full, ids, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), _run(full, ids))
    if _x86_without_vnni():  # this machine type (AVX2 EPYC): measured 0.61
        assert gap > 1e-2
    else:  # VNNI or ARM dot-product kernels sum in int32: exact
        assert gap < 1e-5


@pytest.mark.parametrize("mode", ["ceil", "nearest"])
def test_power_of_two_scales(mode, npu, token_windows):
    result = _compile(token_windows, overrides=[f"npu.power_of_two_scales={mode}"])
    scales = [n.inputs[1].const_value.numpy() for n in result.model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(scales) > 30
    for s in scales:
        mantissa, _ = np.frexp(s)
        assert np.all(mantissa == 0.5)
    w, w2 = (r.model.graph.initializers["layers.0.mlp.down_proj.scale"].const_value.numpy() for r in (npu, result))
    if mode == "ceil":
        assert np.all(w2 >= w) and np.all(w2 < 2 * w)
    else:
        assert np.all(w2 >= w / np.sqrt(2) * 0.999) and np.all(w2 <= w * np.sqrt(2) * 1.001)


def test_power_of_two_rounding():
    s = np.array([0.3, 0.25, 0.7, 1.0, 3.0], np.float32)
    assert power_of_two(s, "ceil").tolist() == [0.5, 0.25, 1.0, 1.0, 4.0]
    assert power_of_two(s, "nearest").tolist() == [0.25, 0.25, 0.5, 1.0, 4.0]
    assert power_of_two(s, "none") is s


@pytest.mark.parametrize("storage,dtype", [("int8", ir.DataType.INT8), ("int4", ir.DataType.INT4)])
def test_int4_weight_storage(storage, dtype, token_windows):
    result = _compile(token_windows, overrides=["weights.format=int4", f"npu.int4_storage={storage}"])
    codes = [v.const_value for n, v in result.model.graph.initializers.items() if n.endswith((".q0", ".q1"))]
    assert codes and {c.dtype for c in codes} == {dtype}
    if storage == "int8":
        assert max(np.abs(c.numpy()).max() for c in codes) <= 7
    # same values either way: the graphs agree as written
    other = _compile(token_windows, overrides=["weights.format=int4", "npu.int4_storage=" + ("int4" if storage == "int8" else "int8")])
    assert _rel(_run(result.model, token_windows[1]), _run(other.model, token_windows[1])) < 1e-6


def test_int16_activations(npu, token_windows):
    result = _compile(token_windows, overrides=["activations.format=int16"])
    q_types = {n.outputs[0].dtype for n in result.model.graph if n.op_type == "QuantizeLinear"}
    assert q_types == {ir.DataType.UINT16}
    float_run = lowbit.compile(tiny_decoder(), "w8a8-rptq", calibration=token_windows,
                               overrides=[*NPU, "activations.format=none", "reorder.clusters=0"]).model  # fmt: skip
    # 16-bit activations are close to float activations; 8-bit ones are not as close
    ids = token_windows[1]
    assert _rel(_run(result.model, ids), _run(float_run, ids)) < 0.25 * _rel(_run(npu.model, ids), _run(float_run, ids))


def test_weight_only_npu_keeps_matmuls_on_dequantized_weights(token_windows):
    result = _compile(token_windows, overrides=["activations.format=none", "reorder.clusters=0"])
    assert not any(n.op_type == "QuantizeLinear" for n in result.model.graph)
    assert result.report["npu"]["partial_matmuls"] == 15  # no activation clusters without activations


def _gemm_model() -> ir.Model:
    """input_ids -> embedding -> Reshape [T, 16] -> Gemm(transB, alpha, beta, bias) -> logits."""
    rng = np.random.default_rng(3)
    tape = ir.tape.Tape()
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, "T"]))
    emb = tape.initializer(ir.tensor(rng.standard_normal((64, 16)).astype(np.float32), name="emb"))
    w = tape.initializer(ir.tensor(rng.standard_normal((24, 16)).astype(np.float32), name="proj.weight"))
    bias = tape.initializer(ir.tensor(rng.standard_normal(24).astype(np.float32), name="proj.bias"))
    shape = tape.initializer(ir.tensor(np.array([-1, 16], np.int64), name="shape"))
    x = tape.op("Reshape", [tape.op("Gather", [emb, ids]), shape])
    y = tape.op("Gemm", [x, w, bias], {"transB": 1, "alpha": 0.5, "beta": 2.0})
    y.name = "logits"
    graph = ir.Graph([ids], [y], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 21}, name="gemm")
    return ir.Model(graph, ir_version=10)


def test_gemm_site_keeps_alpha_beta_and_bias(token_windows):
    results = {t: lowbit.compile(_gemm_model(), "w8a8-rptq", target=t, calibration=token_windows,
                                 overrides=[*NPU, "reorder.clusters=3"]) for t in ("npu", "qdq")}  # fmt: skip
    assert not any(n.op_type == "Gemm" for n in results["npu"].model.graph)
    assert results["npu"].report["npu"]["partial_matmuls"] == 3
    ids = token_windows[0]
    assert _rel(_run(results["npu"].model, ids), _run(results["qdq"].model, ids)) < 1e-5


@pytest.mark.parametrize("override,key", [
    ("weights.format=fp8_e4m3", "weights.format"),
    ("weights.format=dint4", "weights.format"),
    ("weights.block_size=32", "weights.block_size"),
    ("activations.format=fp8_e4m3", "activations.format"),
    ("activations.granularity=per_channel", "activations.granularity"),
    ("npu.power_of_two_scales=up", "npu.power_of_two_scales"),
    ("npu.int4_storage=int2", "npu.int4_storage"),
])
def test_recipe_refuses_what_npu_cannot_express(override, key):
    with pytest.raises(LowbitError, match=key.replace(".", r"\.")):
        load_recipe("w8a8", ["target=npu", override])


def test_power_of_two_needs_rtn():
    with pytest.raises(LowbitError, match="rounding.method = rtn"):
        load_recipe("w4a8-int4", ["target=npu", "weights.block_size=0", "npu.power_of_two_scales=ceil"])
