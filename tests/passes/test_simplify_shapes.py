"""SimplifyShapesPass: Reshape / Expand targets computed from Shape ops become constants where the
symbolic shapes say what they are; the model computes the same outputs for inputs of any size."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from lowbit.passes.simplify_shapes import SimplifyShapesPass, symbolic_value


def _attention_like() -> onnx.ModelProto:
    """x [batch, seq, 64] -> heads [batch, seq, 4, 16] (target from Shape ops) -> repeat_kv-style
    Expand (Where(Equal(shape, -1), 1, shape)) -> merge back with a target from Shape ops."""
    c = lambda name, v: helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(v, np.int64)))  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        c("i0", 0), c("i1", 1), c("ax", [0]), c("minus1", [-1]), c("sixteen", [16]), c("four", [4]), c("two", [2]),
        helper.make_node("Gather", ["shape", "i0"], ["b"]), helper.make_node("Gather", ["shape", "i1"], ["s"]),
        helper.make_node("Unsqueeze", ["b", "ax"], ["b1"]), helper.make_node("Unsqueeze", ["s", "ax"], ["s1"]),
        helper.make_node("Concat", ["b1", "s1", "minus1", "sixteen"], ["t_heads"], axis=0),
        helper.make_node("Reshape", ["x", "t_heads"], ["heads"]),
        helper.make_node("Unsqueeze", ["heads", "two"], ["h5"]),  # [b, s, 1, 4, 16]
        helper.make_node("Concat", ["b1", "s1", "two", "four", "sixteen"], ["want"], axis=0),
        helper.make_node("Shape", ["want"], ["want_len"]),
        helper.make_node("ConstantOfShape", ["want_len"], ["ones"], value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
        helper.make_node("Mul", ["ones", "minus1"], ["neg"]),
        helper.make_node("Equal", ["want", "neg"], ["is_neg"]),
        helper.make_node("Where", ["is_neg", "ones", "want"], ["t_expand"]),
        helper.make_node("Expand", ["h5", "t_expand"], ["rep"]),
        helper.make_node("Concat", ["b1", "s1", "minus1"], ["t_merge"], axis=0),
        helper.make_node("Reshape", ["rep", "t_merge"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 128])])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_targets_become_constants_and_the_shape_chains_die():
    proto = _attention_like()
    model = ir.from_proto(proto)
    ShapeInferencePass(strict_mode=False)(model)
    assert SimplifyShapesPass()(model).modified
    RemoveUnusedNodesPass()(model)
    ops = Counter(n.op_type for n in model.graph)
    assert ops["Shape"] == 0 and ops["Gather"] == 0 and ops["Where"] == 0, ops
    targets = {n.op_type + str(i): n.inputs[1].const_value.numpy().tolist()
               for i, n in enumerate(n for n in model.graph if n.op_type in ("Reshape", "Expand"))}
    assert sorted(targets.values()) == [[0, 0, -1], [0, 0, -1, 16], [1, 1, 2, 4, 16]]
    simplified = ir.to_proto(model)
    rng = np.random.default_rng(0)
    for shape in ((1, 5, 64), (3, 2, 64), (2, 1, 64)):
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(_run(simplified, x), _run(proto, x))


def test_symbolic_value_reads_shape_arithmetic():
    model = ir.from_proto(_attention_like())
    ShapeInferencePass(strict_mode=False)(model)
    values = {v.name: v for n in model.graph for v in n.outputs}
    assert symbolic_value(values["t_heads"]) == ["batch", "seq", -1, 16]
    assert symbolic_value(values["t_expand"]) == ["batch", "seq", 2, 4, 16]
    assert symbolic_value(values["is_neg"]) == [0, 0, 0, 0, 0]
    assert symbolic_value(values["heads"]) is None  # float data, not a shape computation


def test_unknown_dimensions_are_left_alone():
    """A target element with no symbol to match (onnx's fresh unk__ names) keeps the node as is."""
    proto = _attention_like()
    proto.graph.input[0].type.tensor_type.shape.dim[1].ClearField("dim_param")  # seq: unknown
    model = ir.from_proto(proto)
    ShapeInferencePass(strict_mode=False)(model)
    SimplifyShapesPass()(model)
    heads = next(n for n in model.graph if n.outputs[0].name == "heads")
    assert heads.inputs[1].producer() is not None and heads.inputs[1].producer().op_type == "Concat"


@pytest.mark.slow
def test_optimum_llama_loses_most_shape_nodes_and_none_of_its_function(smollm2_with_past_export):
    from lowbit.ort.feeds import build_feeds
    from lowbit.ort.session import ort_session
    from lowbit.passes.canonicalize import canonicalize_passes

    original = ir.load(smollm2_with_past_export / "model.onnx")
    model = ir.load(smollm2_with_past_export / "model.onnx")
    for p in canonicalize_passes():
        p(model)
    ops = Counter(n.op_type for n in model.graph if n.op_type != "Constant")
    assert ops["Shape"] <= 220 and sum(ops.values()) < 2600, ops  # 397 Shape / 4031 nodes without the pass
    ids = (np.arange(9) * 37 % 1000 + 5)[None]
    for m in (original, model):
        s = ort_session(m)
        names = [o.name for o in s.get_outputs()]
        outs = dict(zip(names, s.run(None, build_feeds(s, ids))))
        past = {n.replace("present.", "past_key_values.", 1): outs[n] for n in names if n.startswith("present.")}
        step = s.run(None, build_feeds(s, ids[:, -1:], past=past))[0]
        if m is original:
            want, want_step = outs["logits"], step
    np.testing.assert_allclose(outs["logits"], want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(step, want_step, rtol=0, atol=1e-5 * np.abs(want_step).max())
