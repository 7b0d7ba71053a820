"""ONNX FunctionProto fallbacks of the lowbit ops (standard ONNX ops only).

A model that carries these functions runs in any ONNX runtime: ORT inlines model-local functions
at session creation (and, with constant weights, folds the whole decode into a float weight);
when the native library is registered its kernels take precedence. One function per variant,
keyed by the node's ``overload`` (see :mod:`lowbit.runtime_ext.specs`).

Guarantees: decode = value_table[code] * fl(scale * global_scale), element for element the same
float32 operations as :func:`lowbit.runtime_ext.reference.decode_weight` (bit-exact; FP8 blocks of
mixed weights: E4M3 table * fp8_scale); FgmpActQuant's fallback is bit-exact too (FP8 rounding via
QuantizeLinear to FLOAT8E4M3FN, E2M1 rounding by Round on its three grid spacings, NaN-propagating
block maxima, the perturbation in float64 as the reference); MatMulLowbit's int8_group variant
runs GroupQuant's function body (qmax 127) on A, then the float32 variant's ops; matmul and norm
results differ from the native kernels only by summation order, NaN/Inf included (the kernels
follow these functions' float32 operations, overflow and NaN propagation included).
Assumes: the model's default-domain opset is >= 18 (ReduceMax/ReduceMean take axes as an input,
BitwiseAnd exists; FgmpActQuant needs >= 19 for FP8); the functions import exactly that opset, as
the ONNX checker requires.
"""

from __future__ import annotations

__all__ = ["DOMAIN", "matmul_function", "gather_function", "reorder_norm_function",
           "fgmp_function", "hadamard_function", "group_quant_function"]

import numpy as np
import onnx
from onnx import TensorProto, helper

from lowbit.errors import LowbitError
from lowbit.runtime_ext.reference import e4m3_to_float, e8m0_to_float, value_table
from lowbit.runtime_ext.hadamard import hadamard, hadamard_factors
from lowbit.runtime_ext.specs import FgmpSpec, GatherSpec, GroupQuantSpec, HadamardSpec, MatMulSpec, NormSpec

DOMAIN = "lowbit"
MIN_OPSET = 18


class _Body:
    """Accumulates function-body nodes with unique local names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._n += 1
        out = f"_{op_type.lower()}{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, array: np.ndarray) -> str:
        return self.op("Constant", value=onnx.numpy_helper.from_array(np.asarray(array)))

    def rename_last(self, name: str) -> str:
        self.nodes[-1].output[0] = name
        return name


def _decode(b: _Body, spec: GatherSpec, codes: str, scales: str, gscale: str) -> str:
    """Packed [R, D/2] codes -> float32 [R, D] weights."""
    lo = b.op("BitwiseAnd", codes, b.const(np.uint8(0x0F)))
    hi = b.op("BitShift", codes, b.const(np.uint8(4)), direction="RIGHT")
    last = b.const(np.array([-1], np.int64))
    pairs = b.op("Concat", b.op("Unsqueeze", lo, last), b.op("Unsqueeze", hi, last), axis=-1)
    flat = b.const(np.array([0, -1], np.int64))  # [R, D/2, 2] -> [R, D]: low nibble first
    idx = b.op("Cast", b.op("Reshape", pairs, flat), to=TensorProto.INT32)
    values = b.op("Gather", b.const(value_table(spec.fmt)), idx, axis=0)
    if spec.scale_dtype == "uint8":
        table = (e4m3_to_float if spec.fmt == "nvfp4" else e8m0_to_float)(np.arange(256))
        scales = b.op("Gather", b.const(table.astype(np.float32)),
                      b.op("Cast", scales, to=TensorProto.INT32), axis=0)
    eff = b.op("Mul", scales, gscale)  # fl(scale * global), as lowbit.formats.decode
    blocked = b.op("Reshape", values, b.const(np.array([0, -1, spec.block_size], np.int64)))
    weighted = b.op("Mul", blocked, b.op("Unsqueeze", eff, last))
    return b.op("Reshape", weighted, flat)


def _function(name: str, overload: str, inputs: list[str], b: _Body, attrs: list[str],
              opset: int) -> onnx.FunctionProto:
    if opset < MIN_OPSET:
        raise LowbitError(f"lowbit fallback functions need default-domain opset >= {MIN_OPSET}, "
                          f"the model has {opset}")
    return helper.make_function(DOMAIN, name, inputs, ["Y"], b.nodes,
                                [helper.make_opsetid("", opset)], attributes=attrs,
                                overload=overload)


def matmul_function(spec: MatMulSpec, opset: int) -> onnx.FunctionProto:
    """MatMulLowbit(A, codes, scales, global_scale[, act_scale]) -> Y; int8_group: GroupQuant's
    ops (qmax 127, groups of ``spec.act_group``) on A, then the float32 variant's."""
    b = _Body()
    w = _decode(b, spec, "codes", "scales", "global_scale")
    a = "A"
    inputs = ["A", "codes", "scales", "global_scale"]
    attrs = ["format", "block_size", "act_mode"]
    if spec.act_mode == "int8_group":
        a = _group_quant(b, "A", spec.act_group, b.const(np.float32(127)))  # GroupQuant, then float
        attrs.append("act_group")
    elif spec.act_mode != "float32":
        if spec.act_mode == "int8_static":
            inputs.append("act_scale")
            s = "act_scale"
        else:
            amax = b.op("ReduceMax", b.op("Abs", "A"), b.const(np.array([-1], np.int64)),
                        keepdims=1)
            s = b.op("Where", b.op("Greater", amax, b.const(np.float32(0))),
                     b.op("Div", amax, b.const(np.float32(127))), b.const(np.float32(1)))
        q = b.op("Clip", b.op("Round", b.op("Div", "A", s)), b.const(np.float32(-127)),
                 b.const(np.float32(127)))
        a = b.op("Mul", q, s)
    if spec.fp8_blocks:
        inputs += ["act_scale", "fp8_mask", "fp8_codes", "fp8_scales"]  # act_scale unused
        w = _scatter_fp8_blocks(b, w)
    b.op("MatMul", a, b.op("Transpose", w, perm=[1, 0]))
    b.rename_last("Y")
    return _function("MatMulLowbit", spec.overload, inputs, b, attrs, opset)


def _scatter_fp8_blocks(b: _Body, w: str) -> str:
    """Overwrite the FP8 blocks of decoded NVFP4 weights [N, K] with E4M3(code) * fp8_scale."""
    last = b.const(np.array([-1], np.int64))
    table = e4m3_to_float(np.arange(256)).astype(np.float32)
    vals = b.op("Gather", b.const(table), b.op("Cast", "fp8_codes", to=TensorProto.INT32), axis=0)
    vals = b.op("Mul", vals, b.op("Unsqueeze", "fp8_scales", last))  # [F, 16]
    # Bit j of mask byte i is block 8 i + j (little-endian bit order).
    bits = b.op("BitwiseAnd", b.op("BitShift", b.op("Unsqueeze", "fp8_mask", last),
                                   b.const(np.arange(8, dtype=np.uint8)), direction="RIGHT"),
                b.const(np.uint8(1)))
    bits = b.op("Reshape", bits, b.const(np.array([0, -1], np.int64)))
    nb = b.op("Slice", b.op("Shape", "scales"), b.const(np.array([1], np.int64)),
              b.const(np.array([2], np.int64)))
    bits = b.op("Slice", bits, b.const(np.array([0], np.int64)), nb,
                b.const(np.array([1], np.int64)))
    idx = b.op("Transpose", b.op("NonZero", bits), perm=[1, 0])  # [F, 2] row-major (n, b)
    blocks = b.op("Reshape", w, b.const(np.array([0, -1, 16], np.int64)))
    merged = b.op("ScatterND", blocks, idx, vals)
    return b.op("Reshape", merged, b.const(np.array([0, -1], np.int64)))


def gather_function(spec: GatherSpec, opset: int) -> onnx.FunctionProto:
    """GatherLowbit(table, scales, global_scale, indices) -> Y[*indices.shape, D]."""
    b = _Body()
    w = _decode(b, spec, "table", "scales", "global_scale")
    b.op("Gather", w, "indices", axis=0)
    b.rename_last("Y")
    return _function("GatherLowbit", spec.overload, ["table", "scales", "global_scale", "indices"],
                     b, ["format", "block_size"], opset)


def reorder_norm_function(spec: NormSpec, opset: int) -> onnx.FunctionProto:
    """ReorderNorm(x, perm, gamma[, beta]) -> norm(x)[..., perm] * gamma (+ beta)."""
    b = _Body()
    x = b.op("Gather", "x", "perm", axis=-1)  # statistics are permutation invariant
    axes = b.const(np.array([-1], np.int64))
    eps_node = helper.make_node("Constant", [], ["_eps"])
    eps_node.attribute.append(helper.make_attribute_ref(
        "value_float", onnx.AttributeProto.FLOAT, ref_attr_name="epsilon"))
    b.nodes.append(eps_node)
    if spec.kind == "layer":
        x = b.op("Sub", x, b.op("ReduceMean", x, axes, keepdims=1))
    ms = b.op("ReduceMean", b.op("Mul", x, x), axes, keepdims=1)
    y = b.op("Mul", b.op("Div", x, b.op("Sqrt", b.op("Add", ms, "_eps"))), "gamma")
    inputs = ["x", "perm", "gamma"]
    if spec.has_beta:
        inputs.append("beta")
        b.op("Add", y, "beta")
    b.rename_last("Y")
    return _function("ReorderNorm", spec.overload, inputs, b, ["kind", "epsilon"], opset)


def hadamard_function(spec: HadamardSpec, opset: int) -> onnx.FunctionProto:
    """Hadamard(X, base) -> X @ (base (x) H_p / sqrt(p)) over the last axis, n = c * p and base =
    H_c / sqrt(c) [c, c] (runtime_ext.hadamard). H_p is itself split, H_a (x) H_b with a, b ~
    sqrt(p): the last axis viewed as [c, a, b], three small MatMuls contract b, a and c in turn --
    n (a + b + c) multiply-adds per row, and constants of a^2 + b^2 elements, where the n x n
    matrix would be n^2 of each (256 MB of constant and 4 x down_proj's work at n = 8192)."""
    c, p = hadamard_factors(spec.size)
    k = p.bit_length() - 1
    a, bsize = 1 << (k // 2), 1 << (k - k // 2)
    b = _Body()
    shape = b.op("Concat", b.op("Shape", "X", end=-1), b.const(np.array([c, a, bsize], np.int64)), axis=0)
    y = b.op("Reshape", "X", shape)
    if bsize > 1:
        y = b.op("MatMul", y, b.const((hadamard(bsize) / np.sqrt(bsize)).astype(np.float32)))
    if a > 1:  # H_a is symmetric: H_a @ Y over the a axis
        y = b.op("MatMul", b.const((hadamard(a) / np.sqrt(a)).astype(np.float32)), y)
    if c > 1:
        rows = b.op("Concat", b.op("Shape", "X", end=-1), b.const(np.array([c, a * bsize], np.int64)), axis=0)
        y = b.op("MatMul", b.op("Transpose", "base", perm=[1, 0]), b.op("Reshape", y, rows))
    b.op("Reshape", y, b.op("Shape", "X"))
    b.rename_last("Y")
    return _function("Hadamard", spec.overload, ["X", "base"], b, ["size"], opset)


def group_quant_function(spec: GroupQuantSpec, opset: int) -> onnx.FunctionProto:
    """GroupQuant(x, qmax) -> per row and group of ``group_size`` channels, s = max(absmax / qmax,
    FLT_MIN) and Round(x / s) * s: the same ops, in the same order, as lowbit.emit.dynamic_act."""
    b = _Body()
    _group_quant(b, "x", spec.group_size, "qmax")
    b.rename_last("Y")
    return _function("GroupQuant", spec.overload, ["x", "qmax"], b, ["group_size"], opset)


def _group_quant(b: _Body, x: str, group: int, qmax: str) -> str:
    """GroupQuant's ops on ``x``; ``qmax``: [C / group, 1] code limits (or one for every group)."""
    shape = b.op("Concat", b.op("Shape", x, end=-1), b.const(np.array([-1, group], np.int64)), axis=0)
    grouped = b.op("Reshape", x, shape)
    amax = b.op("ReduceMax", b.op("Abs", grouped), b.const(np.array([-1], np.int64)), keepdims=1)
    scale = b.op("Max", b.op("Div", amax, qmax), b.const(np.finfo(np.float32).tiny))
    y = b.op("Mul", b.op("Round", b.op("Div", grouped, scale)), scale)
    return b.op("Reshape", y, b.op("Shape", x))


def _round_e2m1(b: _Body, y: str) -> str:
    """Nearest E2M1 value (ties to the even code, saturating at 6) with standard ops: the grid
    spacing is 0.5 below 2, 1 below 4 and 2 above, and Round is half-to-even on each."""
    f = lambda v: b.const(np.float32(v))  # noqa: E731
    a = b.op("Abs", y)
    fine = b.op("Mul", b.op("Round", b.op("Mul", a, f(2))), f(0.5))
    mid = b.op("Round", a)
    coarse = b.op("Min", b.op("Mul", b.op("Round", b.op("Mul", a, f(0.5))), f(2)), f(6))
    q = b.op("Where", b.op("Less", a, f(2)), fine,
             b.op("Where", b.op("Less", a, f(4)), mid, coarse))
    return b.op("Where", b.op("Less", y, f(0)), b.op("Neg", q), q)


def _round_e4m3(b: _Body, y: str) -> str:
    """Nearest E4M3FN value, saturating: QuantizeLinear to FLOAT8E4M3FN and back (scale 1)."""
    one = b.const(np.float32(1))
    zp = b.op("Constant", value=helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    return b.op("DequantizeLinear", b.op("QuantizeLinear", y, one, zp, saturate=1), one, zp)


def _nan_max_abs(b: _Body, x: str, axes: str | None) -> str:
    """ReduceMax(Abs(x)) that is NaN when x holds a NaN (numpy's max). ORT's ReduceMax keeps or
    drops a NaN depending on where it sits, which would make the result position-dependent."""
    kw = {"keepdims": 1} if axes is not None else {"keepdims": 0}
    args = (axes,) if axes is not None else ()
    amax = b.op("ReduceMax", b.op("Abs", x), *args, **kw)
    nan_only = b.op("Where", b.op("IsNaN", x), x, b.const(np.float32(0)))  # NaN or 0
    return b.op("Add", amax, b.op("ReduceSum", nan_only, *args, **kw))


def fgmp_function(spec: FgmpSpec, opset: int) -> onnx.FunctionProto:
    """FgmpActQuant(x, g2, threshold[, global_scale]) -> Y (see reference.fgmp_act_quant).

    As the reference: amax propagates NaN, the perturbation P is summed in float64, a zero
    result keeps the sign of x."""
    if opset < 19:
        raise LowbitError(f"the FgmpActQuant fallback needs opset >= 19 (FP8), model has {opset}")
    b = _Body()
    f = lambda v: b.const(np.float32(v))  # noqa: E731
    last = b.const(np.array([-1], np.int64))
    shape = b.op("Shape", "x")
    lead = b.op("Slice", shape, b.const(np.array([0], np.int64)), last)
    xb = b.op("Reshape", "x", b.op("Concat", lead, b.const(np.array([-1, 16], np.int64)), axis=0))
    amax = _nan_max_abs(b, xb, last)
    if spec.static_global:
        g = "global_scale"
    else:
        t = b.op("Div", _nan_max_abs(b, "x", None), f(6 * 448))
        g = b.op("Where", b.op("Greater", t, f(0)), t, f(1))
    raw = b.op("Div", amax, b.op("Mul", f(6), g))
    sb = _round_e4m3(b, b.op("Where", b.op("Greater", raw, f(0)), raw, f(1)))
    sb = b.op("Where", b.op("Greater", sb, f(0)), sb, f(2.0 ** -9))
    s4 = b.op("Mul", sb, g)
    q4 = b.op("Mul", _round_e2m1(b, b.op("Div", xb, s4)), s4)
    s8 = b.op("Div", amax, f(448))
    s8 = b.op("Where", b.op("Greater", s8, f(0)), s8, f(1))
    q8 = b.op("Mul", _round_e4m3(b, b.op("Div", xb, s8)), s8)
    f64 = TensorProto.DOUBLE
    d = b.op("Sub", b.op("Cast", q4, to=f64), b.op("Cast", q8, to=f64))
    w = b.op("Cast", b.op("Reshape", "g2", b.const(np.array([-1, 16], np.int64))), to=f64)
    p = b.op("ReduceSum", b.op("Mul", w, b.op("Mul", d, d)), last, keepdims=1)
    y = b.op("Where", b.op("Greater", p, b.op("Cast", "threshold", to=f64)), q8, q4)
    # ORT's Where returns +0.0 for a selected -0.0; both candidates are copysign(.., x) * s with
    # s > 0, so a zero result takes x's sign back (1 / x < 0 for x < 0 and for x = -0.0).
    flip = b.op("And", b.op("Equal", y, f(0)), b.op("Less", b.op("Div", f(1), xb), f(0)))
    y = b.op("Mul", y, b.op("Where", flip, f(-1), f(1)))
    b.op("Reshape", y, shape)
    b.rename_last("Y")
    inputs = ["x", "g2", "threshold"] + (["global_scale"] if spec.static_global else [])
    return _function("FgmpActQuant", spec.overload, inputs, b, [], opset)
