"""MatMulLowbit: native kernel and ONNX fallback against lowbit.formats and float64 references.

Error bound tested (float32 kernels): |y - y_exact| <= (K + 4) * 2^-24 * sum_k |a_k| |w_k|,
the classic gamma_n bound for a length-K dot product with a few extra roundings (block scale,
block accumulation, activation scale), valid for every summation order. y_exact is computed in
float64 from the exact decoded float32 weights (and, for int8 modes, the exactly quantized
activations).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from lowbit import formats
from lowbit import runtime_ext as rx
from lowbit.runtime_ext import reference as ref

U = 2.0 ** -24


def _encoded(rng, k: int, n: int, fmt: str, block: int):
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 2.0, (1, n))).astype(np.float32)
    return formats.encode(w, fmt, axis=0, block_size=block)


def _model(lb, packed: rx.packing.Packed, spec: rx.MatMulSpec, k: int, act_scale=None):
    inits = dict(packed.arrays)
    extra = {}
    if act_scale is not None:
        inits["act_scale"] = np.float32(act_scale)
        extra["act_scale"] = "act_scale"
    node = rx.make_matmul_node("A", "codes", "scales", "global_scale", "Y", spec, **extra)
    return lb.one_node_model(node, {"A": (TensorProto.FLOAT, ["B", "M", k])}, ("Y", None), inits)


def _bound(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    k = a.shape[-1]
    return (k + 4) * U * (np.abs(a.astype(np.float64)) @ np.abs(w.astype(np.float64)).T)


@pytest.mark.parametrize("fmt", ref.FORMATS)
def test_code_tables_equal_lowbit_formats(fmt):
    np.testing.assert_array_equal(ref.value_table(fmt), formats.code_table(fmt))
    # The int8 (W4A8) tables are exact integer multiples of the same values.
    np.testing.assert_array_equal(ref.INT_TABLES[fmt] * np.float32(ref.INT_MULTIPLIER[fmt]),
                                  formats.code_table(fmt))


@pytest.mark.parametrize("fmt,block,scale_dtype", [
    ("dint4", 32, "float32"), ("nvfp4", 16, "uint8"), ("nvfp4", 16, "float32"),
    ("int4", 64, "float32"), ("mxfp4", 32, "uint8"), ("dint4", 16, "float32"),
])
@pytest.mark.parametrize("native", [True, False])
def test_decode_is_bit_exact(lb, fmt, block, scale_dtype, native):
    """A = identity makes Y = decode(W): the op must reproduce lowbit.formats.decode exactly."""
    rng = np.random.default_rng(1)
    k, n = 96 if block != 64 else 128, 24
    enc = _encoded(rng, k, n, fmt, block)
    packed = rx.pack_matmul_weight(enc, scale_dtype=scale_dtype)
    spec = packed.matmul_spec()
    sess = lb.session(_model(lb, packed, spec, k), native)
    y = sess.run(None, {"A": np.eye(k, dtype=np.float32)[None]})[0][0]
    np.testing.assert_array_equal(y, formats.decode(enc))


CASES = [  # (fmt, block, scale_dtype, act_mode, M, K, N)
    ("dint4", 32, "float32", "float32", 1, 576, 40),
    ("dint4", 32, "float32", "float32", 5, 576, 40),
    ("dint4", 32, "float32", "float32", 48, 64, 20),  # 3 row panels: GEMM tasks on pool threads
    ("nvfp4", 16, "uint8", "float32", 1, 80, 33),  # K % 32 == 16: scalar tail chunk
    ("nvfp4", 16, "uint8", "float32", 17, 80, 33),
    ("int4", 96, "float32", "float32", 2, 192, 7),
    ("mxfp4", 32, "uint8", "float32", 1, 256, 64),
    ("dint4", 128, "float32", "int8_dynamic", 1, 384, 50),
    ("dint4", 16, "float32", "int8_dynamic", 1, 112, 50),
    ("nvfp4", 16, "uint8", "int8_dynamic", 6, 64, 19),
    ("int4", 32, "float32", "int8_static", 1, 160, 12),
    ("mxfp4", 32, "uint8", "int8_static", 9, 160, 12),
]


def _check_case(lb, case, native: bool, rng):
    fmt, block, scale_dtype, act_mode, m, k, n = case
    enc = _encoded(rng, k, n, fmt, block)
    packed = rx.pack_matmul_weight(enc, scale_dtype=scale_dtype)
    act_scale = 0.03 if act_mode == "int8_static" else None
    sess = lb.session(_model(lb, packed, packed.matmul_spec(act_mode), k, act_scale), native)
    a = rng.standard_normal((2, m, k)).astype(np.float32)
    a[0, 0, : k // 3] *= 20.0  # an outlier row segment
    y = sess.run(None, {"A": a})[0]
    w = formats.decode(enc).T  # [N, K] float32, exact
    if act_mode == "float32":
        a_eff = a
    else:
        q, s = ref.quantize_rows_int8(a, act_scale)
        a_eff = (q.astype(np.float64) * s)
    exact = a_eff.astype(np.float64) @ w.astype(np.float64).T
    assert y.shape == (2, m, n) and y.dtype == np.float32
    err = np.abs(y - exact)
    bound = _bound(a_eff, w)
    assert np.all(err <= bound), f"max err/bound {np.max(err / np.maximum(bound, 1e-30)):.3f}"
    return y, bound


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matmul_within_float32_bound_native_and_fallback(lb, case):
    (y_nat, bound), (y_fb, _) = [_check_case(lb, case, native, np.random.default_rng(7))
                                 for native in (True, False)]
    # Same seed, same inputs: both lie within the bound of one exact value.
    assert np.all(np.abs(y_nat - y_fb) <= 2 * bound)


def test_native_kernel_replaces_function(lb, tmp_path):
    rng = np.random.default_rng(0)
    packed = rx.pack_matmul_weight(_encoded(rng, 64, 8, "dint4", 32))
    model = _model(lb, packed, packed.matmul_spec(), 64)
    assert lb.optimized_op_types(model, True, tmp_path) == ["MatMulLowbit"]
    assert "MatMulLowbit" not in lb.optimized_op_types(model, False, tmp_path)


def test_empty_batch_gives_empty_output(lb):
    rng = np.random.default_rng(0)
    packed = rx.pack_matmul_weight(_encoded(rng, 64, 8, "dint4", 32))
    sess = lb.session(_model(lb, packed, packed.matmul_spec(), 64), True)
    assert sess.run(None, {"A": np.zeros((0, 3, 64), np.float32)})[0].shape == (0, 3, 8)


@pytest.mark.parametrize("opset", [18, 23])
def test_fallback_runs_at_other_opsets(lb, opset):
    """Functions import the model's own default opset (ONNX requires it); 18 = optimum exports."""
    rng = np.random.default_rng(0)
    enc = _encoded(rng, 64, 8, "dint4", 32)
    packed = rx.pack_matmul_weight(enc)
    node = rx.make_matmul_node("A", "codes", "scales", "global_scale", "Y",
                               packed.matmul_spec("int8_dynamic"))
    model = lb.one_node_model(node, {"A": (TensorProto.FLOAT, ["M", 64])}, ("Y", None),
                              packed.arrays, opset=opset)
    a = rng.standard_normal((3, 64)).astype(np.float32)
    q, s = ref.quantize_rows_int8(a)
    want = (q.astype(np.float64) * s) @ formats.decode(enc).astype(np.float64)
    for native in (True, False):
        y = lb.session(model, native).run(None, {"A": a})[0]
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
