"""lowbit.formats agrees bit for bit with ONNX's own Q/DQ semantics (onnx.reference evaluator).

Not graph code in formats/: this test only checks that the contract "decode = what an ONNX
DequantizeLinear (chain) computes from the codes and scales" holds for the emitters' layouts.
"""

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from lowbit.formats import decode, encode

X = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32) * 3


def _run(op: str, arrays: list[np.ndarray], opset: int = 23, **attrs) -> np.ndarray:
    names = [f"in{i}" for i in range(len(arrays))]
    inits = [numpy_helper.from_array(a, n) for a, n in zip(arrays, names)]
    node = helper.make_node(op, names, ["y"], **attrs)
    out = helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)
    graph = helper.make_graph([node], "g", [], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, {})[0]


def _same_bits(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_array_equal(np.asarray(a, np.float32).view(np.uint32),
                                  np.asarray(b, np.float32).view(np.uint32))


def test_int4_blocked_along_axis_0():
    enc = encode(X, "int4", 0, 16)
    q = enc.values().astype(np.int8).astype(ml_dtypes.int4)
    _same_bits(_run("DequantizeLinear", [q, enc.scale], axis=0, block_size=16), decode(enc))
    # and ONNX's QuantizeLinear with our scales yields our codes
    onnx_q = _run("QuantizeLinear", [X, enc.scale, np.zeros(enc.scale.shape, ml_dtypes.int4)],
                  axis=0, block_size=16)
    np.testing.assert_array_equal(onnx_q.astype(np.int8), enc.values().astype(np.int8))


def test_uint4_asymmetric_with_zero_point():
    enc = encode(X, "int4", 0, 16, symmetric=False)
    zp = enc.zero_point.astype(ml_dtypes.uint4)
    y = _run("DequantizeLinear", [enc.codes.astype(ml_dtypes.uint4), enc.scale, zp],
             axis=0, block_size=16)
    _same_bits(y, decode(enc))
    onnx_q = _run("QuantizeLinear", [X, enc.scale, zp], axis=0, block_size=16)
    np.testing.assert_array_equal(onnx_q.astype(np.uint8), enc.codes)


def test_int8_per_channel():
    enc = encode(X, "int8", 0)  # one scale per output column of W[K, N]
    y = _run("DequantizeLinear", [enc.values().astype(np.int8), enc.scale.reshape(-1)], axis=1)
    _same_bits(y, decode(enc))


def test_fp8_e4m3_per_channel_codes_are_onnx_bits():
    enc = encode(X, "fp8_e4m3", -1)
    q = enc.codes.view(ml_dtypes.float8_e4m3fn)
    _same_bits(_run("DequantizeLinear", [q, enc.scale.reshape(-1)], axis=0), decode(enc))


@pytest.mark.parametrize("axis", [0, 1])
def test_nvfp4_two_level_dq_chain(axis):
    enc = encode(X, "nvfp4", axis)
    f8 = enc.scale_codes().view(ml_dtypes.float8_e4m3fn)
    scale = _run("DequantizeLinear", [f8, np.array(enc.global_scale, np.float32)])
    codes = enc.codes.view(ml_dtypes.float4_e2m1fn)  # raw E2M1 bit patterns
    y = _run("DequantizeLinear", [codes, scale], axis=axis, block_size=16)
    _same_bits(y, decode(enc))


def test_mxfp4_e8m0_scales():
    enc = encode(X, "mxfp4", 0)  # blocks of 32 along K
    e8m0 = enc.scale_codes().view(ml_dtypes.float8_e8m0fnu)
    # The output type defaults to the scale's type (E8M0 here), so ask for float32 explicitly.
    y = _run("DequantizeLinear", [enc.codes.view(ml_dtypes.float4_e2m1fn), e8m0], opset=24,
             axis=0, block_size=32, output_dtype=TensorProto.FLOAT)
    _same_bits(y, decode(enc))
