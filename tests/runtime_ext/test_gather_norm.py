"""GatherLowbit (bit-exact embedding decode) and ReorderNorm (fused permutation + norm)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from lowbit import formats
from lowbit import runtime_ext as rx
from lowbit.runtime_ext import reference as ref


@pytest.mark.parametrize("fmt,block,scale_dtype", [
    ("dint4", 32, "float32"), ("nvfp4", 16, "uint8"), ("mxfp4", 32, "uint8"), ("int4", 64, "float32"),
])
@pytest.mark.parametrize("native", [True, False])
def test_gather_rows_equal_formats_decode(lb, fmt, block, scale_dtype, native):
    rng = np.random.default_rng(2)
    table = rng.standard_normal((50, 192)).astype(np.float32)
    enc = formats.encode(table, fmt, axis=1, block_size=block)
    packed = rx.pack_gather_table(enc, scale_dtype=scale_dtype)
    node = rx.make_gather_node("codes", "scales", "global_scale", "ids", "Y", packed.spec)
    model = lb.one_node_model(node, {"ids": (TensorProto.INT64, ["B", "S"])}, ("Y", None),
                              packed.arrays)
    ids = np.array([[0, 49, 7, -1], [3, 3, 12, -50]], np.int64)
    y = lb.session(model, native).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(y, formats.decode(enc)[ids])


def _norm_model(lb, c: int, kind: str, eps: float, beta: bool, perm, gamma, b):
    inits = {"perm": perm, "gamma": gamma}
    if beta:
        inits["beta"] = b
    node = rx.make_reorder_norm_node("x", "perm", "gamma", "Y", kind=kind, epsilon=eps,
                                     beta="beta" if beta else None)
    return lb.one_node_model(node, {"x": (TensorProto.FLOAT, ["B", "S", c])}, ("Y", None), inits)


@pytest.mark.parametrize("kind,beta", [("rms", False), ("rms", True), ("layer", True),
                                       ("layer", False)])
@pytest.mark.parametrize("native", [True, False])
def test_reorder_norm_matches_reference(lb, kind, beta, native):
    rng = np.random.default_rng(3)
    c = 96
    perm = rng.permutation(c).astype(np.int64)
    gamma = rng.uniform(0.5, 2, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    x = (rng.standard_normal((2, 5, c)) * 3 + 1).astype(np.float32)
    x[..., 4] *= 50  # outlier channel
    model = _norm_model(lb, c, kind, 1e-6, beta, perm, gamma, b)
    y = lb.session(model, native).run(None, {"x": x})[0]
    want = ref.reorder_norm(x, perm, gamma, b if beta else None, kind, 1e-6)
    np.testing.assert_allclose(y, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


def test_reorder_norm_equals_norm_then_gather(lb):
    """Semantics: gamma is given permuted; equal to normalizing then gathering channels."""
    rng = np.random.default_rng(4)
    c = 32
    perm = rng.permutation(c).astype(np.int64)
    gamma = rng.uniform(0.5, 2, c).astype(np.float32)
    x = rng.standard_normal((3, c)).astype(np.float32)
    model = _norm_model(lb, c, "rms", 1e-5, False, perm, gamma[perm], None)
    y = lb.session(model, True).run(None, {"x": x[None]})[0][0]
    normed = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * gamma
    np.testing.assert_allclose(y, normed[:, perm], rtol=2e-6, atol=1e-6)
