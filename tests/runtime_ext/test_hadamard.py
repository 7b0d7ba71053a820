"""Hadamard matrices and the ``Hadamard`` op: exact constructions, an orthogonal rotation, and a
fallback function that equals numpy within float32 rounding on fuzzed shapes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from lowbit.errors import LowbitError
from lowbit.runtime_ext import HadamardSpec, attach_functions, make_hadamard_node, session_options
from lowbit.runtime_ext.hadamard import hadamard, hadamard_base, hadamard_factors, rotation
from lowbit.runtime_ext.reference import hadamard_transform

# widths of the models lowbit meets (hidden, intermediate, head sizes) and every Paley base below 100
ORDERS = [1, 2, 12, 20, 24, 28, 32, 36, 44, 48, 60, 64, 72, 76, 84, 96, 192, 384, 576, 768, 896, 960, 1536, 2048, 3072]


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_is_exact(n):
    h = hadamard(n)
    assert h.shape == (n, n) and set(np.unique(h)) <= {-1, 1}
    # float64 products of +-1 entries are exact integers at these sizes
    np.testing.assert_array_equal(h.astype(np.float64) @ h.T.astype(np.float64), n * np.eye(n))


def test_factorisations_of_model_widths():
    assert hadamard_factors(576) == (36, 16)  # SmolLM2 hidden: Paley II over GF(17) x Sylvester
    assert hadamard_factors(1536) == (12, 128)  # SmolLM2 intermediate
    assert hadamard_factors(14336) == (28, 512)  # Llama-3-8B intermediate
    assert hadamard_factors(4096) == (1, 4096)
    assert hadamard_factors(5) is None and hadamard_factors(10) is None
    with pytest.raises(ValueError, match="order 10"):
        hadamard(10)


@pytest.mark.parametrize("n", [64, 576, 10])
def test_rotation_is_orthogonal(n):
    rot = rotation(n, seed=3)
    np.testing.assert_allclose(rot.matrix @ rot.matrix.T, np.eye(n), atol=1e-12)
    assert rot.kind == ("random orthogonal" if n == 10 else f"hadamard {hadamard_factors(n)[0]} x {hadamard_factors(n)[1]}")
    assert not np.array_equal(rotation(n, seed=4).matrix, rot.matrix)  # the seed draws the signs


def _model(n: int, shape: list[int]) -> bytes:
    node = make_hadamard_node("x", "base", "y", n)
    io = [helper.make_tensor_value_info(v, TensorProto.FLOAT, shape) for v in ("x", "y")]
    base = onnx.numpy_helper.from_array(hadamard_base(n), "base")
    model = helper.make_model(helper.make_graph([node], "h", io[:1], io[1:], initializer=[base]),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def test_kernel_and_fallback_equal_numpy_on_fuzzed_shapes():
    rng = np.random.default_rng(0)
    # every factorisation: base only, powers of two split into H_a (x) H_b, both, and n = 1
    for n in [12, 16, 64, 576, 1536, 96, 1, 2, 8192, 28 * 512, *rng.choice([12, 64, 576, 96], 4)]:
        n = int(n)
        shape = [int(d) for d in rng.integers(1, 5, size=int(rng.integers(0, 4)))] + [n]
        x = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32)
        model = _model(n, shape)
        fallback = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        native = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
        ref = hadamard_transform(x)
        # float32 accumulation over n terms in another order: a few ulps of the largest output
        bound = 4 * np.sqrt(n) * np.finfo(np.float32).eps * np.abs(ref).max()
        for session in (fallback, native):
            y = session.run(None, {"x": x})[0]
            assert y.shape == x.shape and np.abs(y - ref).max() <= bound


def test_kernel_is_registered_and_checks_its_inputs():
    model = _model(96, ["rows", "width"])  # symbolic: the kernel's own check answers
    native = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
    assert native.run(None, {"x": np.ones((2, 96), np.float32)})[0].shape == (2, 96)
    with pytest.raises(Exception, match="last dimension must be size = 96"):
        native.run(None, {"x": np.ones((2, 95), np.float32)})


def test_spec_refuses_orders_without_a_matrix():
    assert HadamardSpec.from_overload("n576") == HadamardSpec(576)
    with pytest.raises(LowbitError, match="order 10"):
        HadamardSpec(10)
    with pytest.raises(LowbitError, match="malformed"):
        HadamardSpec.from_overload("576")


_CHILD = """
import sys, numpy as np, onnxruntime as ort
from lowbit.runtime_ext import session_options
data = np.load(sys.argv[1])
out = {}
for key in data.files:
    n = data[key].shape[-1]
    model = open(sys.argv[2] + f"/{n}.onnx", "rb").read()
    out[key] = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"]).run(None, {"x": data[key]})[0]
np.savez(sys.argv[3], **out)
"""


def test_every_kernel_set_gives_the_same_bits(tmp_path):
    """The AVX2 rows (vector butterflies, the base mix 8 lanes at a time) perform the scalar set's
    float32 operations: the outputs are bit-identical, at every width the models use and for
    chunks below one vector (Hadamard of 12 = 12 x 1)."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    inputs = {f"x{n}": (rng.standard_normal((3, n)) * 7).astype(np.float32) for n in (12, 16, 24, 64, 576, 1536, 2048)}
    best = {}
    for key, x in inputs.items():
        n = x.shape[-1]
        model = _model(n, ["rows", n])
        (tmp_path / f"{n}.onnx").write_bytes(model)
        best[key] = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.savez(tmp_path / "in.npz", **inputs)
    env = dict(os.environ, LOWBIT_ORT_ISA="scalar")
    subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "in.npz"), str(tmp_path), str(tmp_path / "out.npz")],
                   check=True, env=env, timeout=300)
    scalar = np.load(tmp_path / "out.npz")
    for key in inputs:
        assert np.array_equal(best[key].view(np.uint32), scalar[key].view(np.uint32)), key
