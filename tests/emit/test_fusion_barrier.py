"""Every shipped recipe, on every target it accepts, runs in ONNX Runtime at the default session
options and computes the graph as written (FusionBarrierPass, lowbit.emit.fusion_barrier).

"As written" is the graph run with every ORT graph optimization off. Float32 accumulation order
may differ where ORT fuses an int8 x int8 pair into its integer kernel; everything else is
expected to agree bit for bit. The ``npu`` target's integer pattern is meant for ORT's integer
kernel, which saturates on x86 without VNNI: there its outputs run with the session option their
report names (README, target npu).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import lowbit
from lowbit.core.context import CompileContext
from lowbit.core.recipe import TARGETS, available_recipes, load_recipe
from lowbit.emit.fusion_barrier import FusionBarrierPass, weight_dequantize
from lowbit.emit.npu import ORT_DISABLE_QDQ_FUSION
from lowbit.errors import LowbitError
from lowbit.models.synthetic import tiny_decoder
from lowbit.runtime_ext.library import session_options

ORT_TARGETS = [t for t in TARGETS if t != "qdq-fp4"]  # qdq-fp4: FP4 runtimes (test_qdq checks it)


def _accepted(recipe: str, target: str) -> bool:
    try:
        load_recipe(recipe, [f"target={target}"])
    except LowbitError:
        return False
    return True


CASES = [(r, t) for t in ORT_TARGETS for r in sorted(available_recipes()) if _accepted(r, t)]


def _exact_int8_kernels() -> bool:
    """Whether ONNX Runtime's fused int8 MatMul kernels are exact on this CPU: x86 with VNNI
    (vpdpbusd), or not x86 at all. Without VNNI its u8 x s8 kernel saturates int16 pair sums."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return True
    flags = open("/proc/cpuinfo").read().split()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _run(model: ir.Model, ids: np.ndarray, level: ort.GraphOptimizationLevel, *, config=()) -> np.ndarray:
    options = session_options()
    options.graph_optimization_level = level
    for key, value in config:
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids})[0]


def _fused_ops(model: ir.Model, tmp_path) -> Counter:
    import onnx

    options = session_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_every_recipe_target_pair_is_covered():
    assert len(CASES) >= 25 and {t for _, t in CASES} == set(ORT_TARGETS)


@pytest.mark.parametrize("recipe, target", CASES)
def test_default_session_options_compute_the_graph_as_written(recipe, target, token_windows):
    model = tiny_decoder(hidden=64, ffn=128, vocab=64)
    compiled = lowbit.compile(model, recipe, target=target, calibration=token_windows)
    ids = np.asarray(token_windows[0], np.int64)[None]
    as_written = _run(compiled.model, ids, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    # npu: the integer pattern NPUs take is ORT's MatMulIntegerToFloat; where that kernel is not
    # exact (x86 without VNNI) the report names the option that computes the graph as written
    config = () if target != "npu" or _exact_int8_kernels() else (ORT_DISABLE_QDQ_FUSION,)
    if target == "npu":
        assert ORT_DISABLE_QDQ_FUSION[0] in compiled.report["npu"]["onnxruntime_x86"]
    default = _run(compiled.model, ids, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, config=config)
    assert np.isfinite(as_written).all()
    np.testing.assert_allclose(default, as_written, rtol=0, atol=1e-5 * np.abs(as_written).max())


@pytest.mark.parametrize("recipe", ["w8", "w4a8-dint4", "fp8"])
def test_without_the_barrier_ort_fuses_weights_into_another_computation(recipe, token_windows, tmp_path):
    """The failure the pass prevents, measured: ORT's MatMulNBits (int8 activations) or an FP8
    MatMulIntegerToFloat that does not load."""
    compiled = lowbit.compile(tiny_decoder(hidden=64, ffn=128, vocab=64), recipe, calibration=token_windows)
    assert compiled.report["ort_fusion_barriers"] > 0
    barriers = [n for n in compiled.model.graph if n.name and n.name.endswith(".fusion_barrier")]
    for node in barriers:  # undo them
        node.outputs[0].replace_all_uses_with(node.inputs[0])
        compiled.model.graph.remove(node, safe=True)
    ids = np.asarray(token_windows[0], np.int64)[None]
    as_written = _run(compiled.model, ids, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if recipe == "fp8":
        with pytest.raises(Exception, match="MatMulIntegerToFloat"):
            _run(compiled.model, ids, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        return
    assert _fused_ops(compiled.model, tmp_path)["MatMulNBits"] > 0
    default = _run(compiled.model, ids, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert np.abs(default - as_written).max() > 1e-4 * np.abs(as_written).max()


def test_barrier_keeps_int8_pairs(token_windows, tmp_path):
    """W8A8's int8 x int8 pairs stay fusable: an exact integer product."""
    w8a8 = lowbit.compile(tiny_decoder(hidden=64, ffn=128, vocab=64), "w8a8", calibration=token_windows)
    assert w8a8.report["ort_fusion_barriers"] == 0
    assert _fused_ops(w8a8.model, tmp_path)["MatMulIntegerToFloat"] > 0
    w8 = lowbit.compile(tiny_decoder(hidden=64, ffn=128, vocab=64), "w8", calibration=token_windows)
    assert w8.report["ort_fusion_barriers"] == len(w8.report["sites"])
    assert _fused_ops(w8.model, tmp_path)["MatMulNBits"] == 0


def test_barrier_goes_before_a_transpose(tmp_path):
    """A weight stored [N, K] reaches its MatMul through a Transpose, which ORT's transpose
    optimizer folds into the constant before fusing: the barrier goes before the Transpose."""
    codes = ir.Value(name="w.q", const_value=ir.tensor(np.arange(-8, 8, dtype=np.int8).repeat(12).reshape(6, 32)))
    scale = ir.Value(name="w.scale", const_value=ir.tensor(np.full(6, 0.1, np.float32)))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 32]))
    dq = ir.node("DequantizeLinear", [codes, scale], {"axis": 0})
    transposed = ir.node("Transpose", [dq.outputs[0]], {"perm": [1, 0]})
    matmul = ir.node("MatMul", [x, transposed.outputs[0]], name="mm")
    matmul.outputs[0].name = "y"
    graph = ir.Graph([x], [matmul.outputs[0]], nodes=[dq, transposed, matmul],
                     initializers=[codes, scale], opset_imports={"": 21})  # fmt: skip
    model = ir.Model(graph, ir_version=10)
    assert weight_dequantize(transposed.outputs[0]) is dq
    ctx = CompileContext(model, load_recipe("w8"))
    assert FusionBarrierPass(ctx)(model).modified and ctx.report["ort_fusion_barriers"] == 1
    barrier = transposed.inputs[0].producer()
    assert barrier.op_type == "Reshape" and barrier.inputs[0] is dq.outputs[0]
    assert barrier.inputs[1].const_value.numpy().tolist() == [6, 32]
    assert not FusionBarrierPass(ctx)(model).modified
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)}
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = feeds["x"] @ (codes.const_value.numpy().astype(np.float32) * np.float32(0.1)).T
    np.testing.assert_allclose(session.run(None, feeds)[0], expected, rtol=1e-6)


def test_barrier_pass_is_idempotent_and_preserves_function(token_windows):
    compiled = lowbit.compile(tiny_decoder(hidden=64, ffn=128, vocab=64), "w4a8-dint4", calibration=token_windows)
    ids = np.asarray(token_windows[0], np.int64)[None]
    before = _run(compiled.model, ids, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    ctx = CompileContext(compiled.model, compiled.recipe)
    assert not FusionBarrierPass(ctx)(compiled.model).modified  # nothing left to guard
    np.testing.assert_array_equal(_run(compiled.model, ids, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), before)


def test_report_says_ort_runs_the_graph_as_written(token_windows):
    from lowbit.compiler.report import render_markdown

    compiled = lowbit.compile(tiny_decoder(hidden=64, ffn=128, vocab=64), "w8", calibration=token_windows)
    md = render_markdown(compiled.report)
    assert f"{compiled.report['ort_fusion_barriers']} weight DequantizeLinear nodes carry a same-shape Reshape" in md
