"""Mixed NVFP4/FP8 (FGMP) weights through MatMulLowbit's FP8 block mask."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from lowbit import runtime_ext as rx

U = 2.0 ** -24


def _setup(k: int, n: int, seed: int, frac: float = 0.3):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 3, (1, n))).astype(np.float32)
    mask = rng.random((k // 16, n)) < frac
    mask[:, 0] = True  # an all-FP8 row
    mask[:, 1] = False  # an all-NVFP4 row
    return w, mask, rx.pack_mixed_matmul_weight(w, mask)


def _model(lb, packed, k: int):
    node = rx.make_matmul_node("A", "codes", "scales", "global_scale", "Y", packed.matmul_spec(),
                               fp8=("fp8_mask", "fp8_codes", "fp8_scales"))
    return lb.one_node_model(node, {"A": (TensorProto.FLOAT, ["M", k])}, ("Y", None),
                             packed.arrays)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("k", [64, 80])  # 80: K % 32 == 16, a trailing single block
def test_mixed_decode_is_exact(lb, native, k):
    w, mask, packed = _setup(k, 24, 0)
    sess = lb.session(_model(lb, packed, k), native)
    y = sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0]
    np.testing.assert_array_equal(y, rx.decode_mixed(w, mask))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("m,k", [(1, 256), (1, 80), (20, 256), (5, 48)])
def test_mixed_matmul_within_float32_bound(lb, native, m, k):
    w, mask, packed = _setup(k, 37, 1)
    wq = rx.decode_mixed(w, mask).astype(np.float64)
    a = np.random.default_rng(2).standard_normal((m, k)).astype(np.float32)
    y = lb.session(_model(lb, packed, k), native).run(None, {"A": a})[0]
    exact = a.astype(np.float64) @ wq
    bound = (k + 4) * U * (np.abs(a.astype(np.float64)) @ np.abs(wq))
    assert np.all(np.abs(y - exact) <= bound)


def test_mixed_spec_rules():
    with pytest.raises(ValueError, match="need nvfp4, block_size 16"):
        rx.MatMulSpec("dint4", 32, fp8_blocks=True)
    spec = rx.MatMulSpec("nvfp4", 16, "uint8", fp8_blocks=True)
    assert rx.MatMulSpec.from_overload(spec.overload) == spec


def test_mixed_mask_count_mismatch_is_a_clear_error(lb):
    import onnxruntime as ort

    w, mask, packed = _setup(64, 8, 3)
    arrays = dict(packed.arrays)
    arrays["fp8_scales"] = arrays["fp8_scales"][:-1]
    node = rx.make_matmul_node("A", "codes", "scales", "global_scale", "Y", packed.matmul_spec(),
                               fp8=("fp8_mask", "fp8_codes", "fp8_scales"))
    model = lb.one_node_model(node, {"A": (TensorProto.FLOAT, ["M", 64])}, ("Y", None), arrays)
    sess = lb.session(model, True)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                       match="fp8_mask marks .* FP8 blocks, so fp8_codes must be"):
        sess.run(None, {"A": np.ones((1, 64), np.float32)})
