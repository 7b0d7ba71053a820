"""The ``GroupQuant`` op: the native kernel, its ONNX function fallback and the nine standard ops
lowbit.emit.dynamic_act emits for the qdq target give the same float32 bits, and all equal the
numpy reference lowbit.encode.activations.dynamic_fake_quant."""

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from lowbit.emit.dynamic_act import dynamic_group_nodes, fake_quant, group_qmax
from lowbit.errors import LowbitError
from lowbit.runtime_ext import GroupQuantSpec, attach_functions, make_group_quant_node, session_options


def _model(channels: int | str, group: int, qmax: np.ndarray, rank: int) -> bytes:
    shape = [f"d{i}" for i in range(rank - 1)] + [channels]
    node = make_group_quant_node("x", "qmax", "y", group)
    io = [helper.make_tensor_value_info(v, TensorProto.FLOAT, shape) for v in ("x", "y")]
    init = onnx.numpy_helper.from_array(qmax.astype(np.float32).reshape(-1, 1), "qmax")
    model = helper.make_model(helper.make_graph([node], "g", io[:1], io[1:], initializer=[init]),
                              opset_imports=[helper.make_opsetid("", 21)], ir_version=10)  # fmt: skip
    attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _standard_ops(x: np.ndarray, group: int, qmax: np.ndarray) -> np.ndarray:
    """What the qdq target emits (dynamic_group_nodes), run in ONNX Runtime."""
    value = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(x.shape)))
    graph = ir.Graph([value], [], nodes=[], opset_imports={"": 21})
    nodes, out = dynamic_group_nodes(graph, value, x.shape[-1], group, qmax, "x")
    for node in nodes:
        graph.append(node)
    graph.outputs.append(out)
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _bits(y: np.ndarray) -> np.ndarray:
    return y.view(np.uint32)


CASES = [(576, 64, None), (1536, 64, [3, 700]), (96, 32, None), (64, 16, [0]), (60, 12, None)]  # 12: a vector tail


@pytest.mark.parametrize("channels, group, outliers", CASES)
def test_native_fallback_and_standard_ops_agree_bit_for_bit(channels, group, outliers):
    rng = np.random.default_rng(channels + group)
    qmax = group_qmax("int4" if outliers else "int8", channels, group, None if outliers is None else np.array(outliers))
    model = _model(channels, group, qmax, rank=3)
    native = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
    fallback = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    for scale in (1e-30, 1e-3, 1.0, 3e4):
        x = (rng.standard_normal((2, 7, channels)) * scale).astype(np.float32)
        x[0, 0, :group] = 0.0  # an all-zero group: scale floor, zeros out
        x[1, 2, 5] = 0.5 * scale  # exact halves appear after scaling now and then
        want = fake_quant(x, group, qmax)
        for got in (native.run(None, {"x": x})[0], fallback.run(None, {"x": x})[0], _standard_ops(x, group, qmax)):
            np.testing.assert_array_equal(_bits(got), _bits(want))


def test_infinities_and_nans():
    qmax = np.full(2, 127.0)
    model = _model(32, 16, qmax, rank=2)
    native = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
    fallback = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = np.ones((3, 32), np.float32)
    x[0, 3] = np.inf  # an infinite group: every element NaN (x / inf = 0, then 0 * inf), in both
    x[1, 20] = np.nan  # a NaN group: NaN throughout natively
    y_native, y_fallback = native.run(None, {"x": x})[0], fallback.run(None, {"x": x})[0]
    assert np.isnan(y_native[0, :16]).all() and np.isnan(y_fallback[0, :16]).all()
    assert np.isnan(y_native[1, 16:]).all()
    np.testing.assert_array_equal(y_native[2], y_fallback[2])
    np.testing.assert_array_equal(y_native[0, 16:], y_fallback[0, 16:])


def test_kernel_checks_its_inputs_and_spec_its_overload():
    model = _model("width", 16, np.full(4, 127.0), rank=2)  # symbolic: the kernel's own check answers
    native = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="multiple of group_size = 16"):
        native.run(None, {"x": np.ones((2, 60), np.float32)})
    assert GroupQuantSpec.from_overload("g64") == GroupQuantSpec(64)
    for bad in ("64", "gx", ""):
        with pytest.raises(LowbitError, match="malformed GroupQuant overload"):
            GroupQuantSpec.from_overload(bad)
    with pytest.raises(LowbitError, match="group_size must be an integer >= 1"):
        GroupQuantSpec(0)


def test_scalar_kernel_gives_the_same_bits(tmp_path):
    """The scalar loop (LOWBIT_ORT_ISA=scalar, chosen once per process: a child runs it) against
    the numpy reference, on the same cases."""
    import os
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(
        "import sys, numpy as np, onnxruntime as ort\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_group_quant import CASES, _model, fake_quant, group_qmax\n"
        "from lowbit.runtime_ext import session_options\n"
        "for channels, group, outliers in CASES:\n"
        "    qmax = group_qmax('int4' if outliers else 'int8', channels, group, None if outliers is None else np.array(outliers))\n"
        "    s = ort.InferenceSession(_model(channels, group, qmax, 3), session_options(), providers=['CPUExecutionProvider'])\n"
        "    x = (np.random.default_rng(channels).standard_normal((2, 5, channels)) * 3).astype(np.float32)\n"
        "    assert (s.run(None, {'x': x})[0].view(np.uint32) == fake_quant(x, group, qmax).view(np.uint32)).all(), channels\n"
        "print('ok')\n")
    env = {**os.environ, "LOWBIT_ORT_ISA": "scalar"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
