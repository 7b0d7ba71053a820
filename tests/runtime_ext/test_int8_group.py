"""MatMulLowbit act_mode=int8_group: the native op, its ONNX fallback (GroupQuant's ops with qmax 127,
then the float32 variant's) and a numpy reference agree up to float32 summation order.

The reference: lowbit.encode.activations.dynamic_fake_quant (GroupQuant's bit-exact numpy twin,
tests/runtime_ext/test_group_quant.py) times the exactly decoded weights, in float64. Error bound
as test_matmul.py: (K + 4) * 2^-24 * sum_k |a_k w_k|. Special values: the native op gives the
fallback's NaN / +-Inf positions and, elsewhere, its values within the bound (huge finite sums
whose overflow depends on the order are left to tests/adversarial/test_native_special_values.py).
Every kernel set this CPU runs (scalar, avx2, avx512vnni; chosen once per process) runs the module
in a child pytest.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from lowbit import formats
from lowbit import runtime_ext as rx
from lowbit.encode.activations import dynamic_fake_quant
from lowbit.errors import LowbitError
from lowbit.runtime_ext import reference as ref

U = 2.0 ** -24
F32 = np.float32


def _cases() -> list[tuple]:
    """(fmt, block, scale_dtype, G, M, K, N): M = 1..17 and 128, K in whole groups (with and
    without a 32-element tail past the last 64-chunk), N around the GEMV and GEMM task sizes."""
    formats_ = [("dint4", "float32"), ("int4", "float32"), ("nvfp4", "uint8"), ("mxfp4", "uint8"),
                ("nvfp4", "float32")]
    rng = np.random.default_rng(5)
    out = []
    for m in list(range(1, 18)) + [128, 128]:
        fmt, sd = formats_[m % len(formats_)]
        group = int(rng.choice([32, 64, 128]))
        blocks = [b for b in (16, 32, 64, 128) if group % b == 0 and (fmt != "nvfp4" or b == 16)
                  and (fmt != "mxfp4" or b == 32)]
        block = blocks[(m // len(formats_)) % len(blocks)]
        k = group * int(rng.choice([1, 3, 9]))
        n = int(rng.choice([1, 5, 47, 100, 257]))
        out.append((fmt, block, sd, group, m, k, n))
    return out


CASES = _cases()


def _encoded(rng, k: int, n: int, fmt: str, block: int):
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 2.0, (1, n))).astype(F32)
    return formats.encode(w, fmt, axis=0, block_size=block)


def _sessions(lb, packed, group: int, k: int):
    spec = packed.matmul_spec("int8_group", group)
    node = rx.make_matmul_node("A", "codes", "scales", "global_scale", "Y", spec)
    model = lb.one_node_model(node, {"A": (TensorProto.FLOAT, ["M", k])}, ("Y", None), packed.arrays)
    return lb.session(model, True), lb.session(model, False)


def _group_quant(a: np.ndarray, group: int) -> np.ndarray:
    with np.errstate(all="ignore"):
        return dynamic_fake_quant(a, group, np.full(a.shape[-1] // group, 127.0))


def _activations(rng, m: int, k: int, group: int) -> np.ndarray:
    a = (rng.standard_normal((m, k)) * np.exp(rng.uniform(-3, 3, k))).astype(F32)
    a[0, : k // 4] *= F32(30.0)  # outlier channels
    a[m // 2, :group] = 0.0  # an all-zero group
    a[-1, 1::7] = -0.0
    return a


def _bound(aq: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (aq.shape[-1] + 4) * U * (np.abs(aq.astype(np.float64)) @ np.abs(w.astype(np.float64)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_native_and_fallback_equal_the_reference(lb, case):
    fmt, block, sd, group, m, k, n = case
    rng = np.random.default_rng(m * 1000 + k + n)
    enc = _encoded(rng, k, n, fmt, block)
    native, fallback = _sessions(lb, rx.pack_matmul_weight(enc, scale_dtype=sd), group, k)
    a = _activations(rng, m, k, group)
    aq, w = _group_quant(a, group), formats.decode(enc)
    exact = aq.astype(np.float64) @ w.astype(np.float64)
    bound = _bound(aq, w)
    for name, sess in (("native", native), ("fallback", fallback)):
        y = sess.run(None, {"A": a})[0]
        assert y.shape == (m, n) and y.dtype == np.float32
        err = np.abs(y - exact)
        assert np.all(err <= bound), f"{name}: max err / bound {np.max(err / np.maximum(bound, 1e-30)):.3f}"


def _special_rows(rng, k: int, group: int) -> np.ndarray:
    """One row per special kind; the huge values meet small weights (no overflow)."""
    base = lambda: rng.standard_normal(k).astype(F32)  # noqa: E731
    rows = [base() for _ in range(12)]
    rows[0][3] = np.nan
    rows[1][k - 1] = np.inf
    rows[2][group] = -np.inf
    rows[3][:] = 0.0
    rows[4][:] = -0.0
    rows[5][::3] = -0.0
    rows[6] *= F32(1e-40)  # denormals: the FLT_MIN scale floor
    rows[7] *= F32(1e-31)  # normal, below the kernels' 2^-96 group scales
    rows[8] *= F32(2.0 ** 97)
    rows[9][5] = F32(3e38)  # one huge group
    rows[10][: group] *= F32(1e-42)  # one denormal group in a normal row
    rows[11][group:] = 0.0  # all groups but the first zero
    return np.stack(rows)


@pytest.mark.parametrize("m_rows", [(0, 1, 3, 9), tuple(range(12))], ids=["gemv", "gemm"])
def test_special_values_follow_the_fallback(lb, m_rows):
    rng = np.random.default_rng(11)
    k, n, group = 320, 53, 64
    enc = _encoded(rng, k, n, "dint4", 32)
    packed = rx.pack_matmul_weight(enc)
    scales = packed.scales.copy()
    # Weight rows with a NaN, +Inf, zero, denormal and huge-but-harmless block scale.
    for row, value in enumerate([np.nan, np.inf, 0.0, 1e-40, 2.0 ** -100, 1e3]):
        scales[row, 2] = value
    packed = rx.packing.Packed(packed.codes, scales, packed.global_scale, packed.spec)
    native, fallback = _sessions(lb, packed, group, k)
    a = _special_rows(rng, k, group)[list(m_rows)]
    if len(m_rows) < 4:  # the GEMV path: one row at a time
        got = np.concatenate([native.run(None, {"A": r[None]})[0] for r in a])
    else:
        got = native.run(None, {"A": a})[0]
    want = fallback.run(None, {"A": a})[0]
    assert np.isnan(want[:2]).all()  # a NaN or an Inf makes GroupQuant's group, so the row, NaN
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    with np.errstate(all="ignore"):
        w = ref.decode_weight(packed.codes, scales, packed.global_scale, "dint4", 32).T
        bound = _bound(_group_quant(a, group), np.where(np.isfinite(w), w, 0))
    fin = np.isfinite(want)
    assert np.all(np.abs(got[fin].astype(np.float64) - want[fin]) <= 2 * bound[fin] + 2.0 ** -140)


def test_spec_overload_and_refusals():
    spec = rx.MatMulSpec("dint4", 32, "float32", "int8_group", act_group=64)
    assert spec.overload == "dint4_b32_float32_int8_group_g64"
    assert rx.MatMulSpec.from_overload(spec.overload) == spec
    assert rx.MatMulSpec.from_overload("nvfp4_b16_uint8_int8_group_g32").act_group == 32
    for group, block in ((48, 32), (16, 16), (0, 32), (None, 32), (96, 64), (192, 96), (64.0, 32)):
        with pytest.raises(LowbitError, match=r"act_mode=int8_group needs act_group a positive multiple "
                                              r"of 32 and of a power-of-two block_size") as e:
            rx.MatMulSpec("dint4", block, "float32", "int8_group", act_group=group)
        assert "\n" not in str(e.value)
    with pytest.raises(LowbitError, match="act_group is only used with act_mode=int8_group, not float32"):
        rx.MatMulSpec("dint4", 32, act_group=64)
    for bad in ("dint4_b32_float32_int8_group", "dint4_b32_float32_int8_group_g", "dint4_b32_float32_int8_group_gx"):
        with pytest.raises(LowbitError, match="malformed lowbit overload"):
            rx.MatMulSpec.from_overload(bad)


def test_fallback_is_group_quant_then_the_float32_variant(lb):
    """The int8_group fallback equals GroupQuant's own fallback feeding the float32 fallback, bit
    for bit (the same standard ops in the same order)."""
    from onnx import helper

    rng = np.random.default_rng(2)
    k, n, group = 192, 24, 64
    packed = rx.pack_matmul_weight(_encoded(rng, k, n, "dint4", 32))
    two = [rx.make_group_quant_node("A", "qmax", "Aq", group),
           rx.make_matmul_node("Aq", "codes", "scales", "global_scale", "Y", packed.matmul_spec())]
    graph = helper.make_graph(two, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [__import__("onnx").numpy_helper.from_array(v, name) for name, v in
                               {**packed.arrays, "qmax": np.full((k // group, 1), 127, F32)}.items()])
    model = rx.attach_functions(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)]))
    a = _activations(rng, 5, k, group)
    want = lb.session(model, False).run(None, {"A": a})[0]
    _, fallback = _sessions(lb, packed, group, k)
    np.testing.assert_array_equal(fallback.run(None, {"A": a})[0], want)


def test_offset_tables_stay_unsigned_and_unsaturated():
    """The kernels add 12 to every code value (unsigned bytes for vpdpbusd / vpmaddubsw): every
    format's integer table must lie in [-12, 12] (int16 pair sums <= 2 * 24 * 127, no saturation)."""
    for fmt in ref.FORMATS:
        assert np.abs(ref.INT_TABLES[fmt].astype(int)).max() <= 12


def _kernel_set() -> str:
    lib = ctypes.CDLL(str(rx.library_path()))
    lib.LowbitKernelSet.restype = ctypes.c_char_p
    return lib.LowbitKernelSet().decode()


def _cpu_kernel_sets() -> list[str]:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    avx2 = {"avx2", "fma"} <= flags
    vnni = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"} <= flags
    return (["avx512vnni"] if vnni else []) + (["avx2"] if avx2 else []) + ["scalar"]


def test_this_process_runs_the_kernel_set_it_should(lb):
    """The best set the CPU has, or the one LOWBIT_ORT_ISA caps the choice at (a child run below)."""
    cap = os.environ.get("LOWBIT_ORT_ISA")
    available = _cpu_kernel_sets()
    assert _kernel_set() == (cap if cap in available else available[0])


@pytest.mark.parametrize("kernels", _cpu_kernel_sets()[1:])
def test_every_capped_kernel_set_passes_in_a_child(native_lib, kernels):
    """This module again with LOWBIT_ORT_ISA capping the kernel set (chosen once per process); the
    child leaves out this test (it would recurse)."""
    env = dict(os.environ, LOWBIT_ORT_ISA=kernels)
    here = Path(__file__)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here), "-k", "not capped_kernel_set"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=here.parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout
