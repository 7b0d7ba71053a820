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


def test_tied_embedding_shares_one_packed_table(lb):
    """GatherLowbit's table [V, H/2] is MatMulLowbit's weight layout for W = E^T (lm_head):
    one set of packed initializers serves the embedding lookup and the tied output projection."""
    from onnx import helper

    rng = np.random.default_rng(5)
    v, h = 40, 64
    table = rng.standard_normal((v, h)).astype(np.float32)
    enc = formats.encode(table, "nvfp4", axis=1, block_size=16)
    packed = rx.pack_gather_table(enc, scale_dtype="uint8")
    gather = rx.make_gather_node("codes", "scales", "global_scale", "ids", "x", packed.spec)
    head = rx.make_matmul_node("x", "codes", "scales", "global_scale", "Y", packed.matmul_spec())
    graph = helper.make_graph(
        [gather, head], "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, v])],
        [onnx_array(a, n) for n, a in packed.arrays.items()])
    model = rx.attach_functions(helper.make_model(
        graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)]))
    ids = np.array([1, 7, 39], np.int64)
    e = formats.decode(enc).astype(np.float64)
    want = e[ids] @ e.T
    for native in (True, False):
        y = lb.session(model, native).run(None, {"ids": ids})[0]
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def onnx_array(a, name):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(a), name)
