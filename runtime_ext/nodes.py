"""onnx.helper builders for lowbit nodes, and attaching their fallback functions to a model.

The compiler's ort-cpu target calls these: it adds the packed arrays as initializers, one node
per site, then :func:`attach_functions` once. Every node carries its attributes (read by the
native kernel) and an ``overload`` naming its fallback function (see specs.py).
"""

from __future__ import annotations

__all__ = ["make_matmul_node", "make_gather_node", "make_reorder_norm_node", "make_fgmp_node", "make_hadamard_node",
           "make_group_quant_node",
           "function_protos",
           "attach_functions", "DOMAIN"]

from collections.abc import Iterable

import onnx
from onnx import helper

from lowbit.errors import LowbitError
from lowbit.runtime_ext import functions
from lowbit.runtime_ext.specs import FgmpSpec, GatherSpec, GroupQuantSpec, HadamardSpec, MatMulSpec, NormSpec

DOMAIN = functions.DOMAIN


def _node(op_type: str, inputs: list[str], output: str, overload: str, name: str | None,
          **attrs) -> onnx.NodeProto:
    node = helper.make_node(op_type, inputs, [output], name=name, domain=DOMAIN, **attrs)
    node.overload = overload
    return node


def make_matmul_node(a: str, codes: str, scales: str, global_scale: str, output: str,
                     spec: MatMulSpec, *, act_scale: str | None = None,
                     fp8: tuple[str, str, str] | None = None,
                     name: str | None = None) -> onnx.NodeProto:
    """``output = a @ W`` with W packed by :func:`pack_matmul_weight` (inputs are value names).

    ``spec.act_mode == "int8_group"``: ``a`` is quantized per row and group of ``spec.act_group``
    channels inside the op (GroupQuant with qmax 127, then integer dot products).

    ``fp8``: names of (fp8_mask, fp8_codes, fp8_scales) for mixed NVFP4/FP8 weights
    (:func:`pack_mixed_matmul_weight`); required exactly when ``spec.fp8_blocks``.
    """
    inputs = [a, codes, scales, global_scale]
    if spec.act_mode == "int8_static":
        if not act_scale:
            raise LowbitError("act_mode=int8_static needs an act_scale input")
        inputs.append(act_scale)
    elif act_scale:
        raise LowbitError(f"act_scale is only used with act_mode=int8_static, not {spec.act_mode}")
    if spec.fp8_blocks != (fp8 is not None):
        raise LowbitError("pass fp8=(mask, codes, scales) exactly when spec.fp8_blocks is set")
    if fp8 is not None:
        inputs += ["", *fp8]  # input 4 (act_scale) stays empty
    group = {"act_group": spec.act_group} if spec.act_mode == "int8_group" else {}
    return _node("MatMulLowbit", inputs, output, spec.overload, name, format=spec.fmt,
                 block_size=spec.block_size, act_mode=spec.act_mode, **group)


def make_gather_node(table: str, scales: str, global_scale: str, indices: str, output: str,
                     spec: GatherSpec, *, name: str | None = None) -> onnx.NodeProto:
    """Embedding lookup ``output = decode(table)[indices]``."""
    return _node("GatherLowbit", [table, scales, global_scale, indices], output, spec.overload,
                 name, format=spec.fmt, block_size=spec.block_size)


def make_reorder_norm_node(x: str, perm: str, gamma: str, output: str, *, kind: str,
                           epsilon: float, beta: str | None = None,
                           name: str | None = None) -> onnx.NodeProto:
    """``output = norm(x)[..., perm] * gamma (+ beta)``; gamma/beta already permuted."""
    spec = NormSpec(kind, beta is not None)
    inputs = [x, perm, gamma] + ([beta] if beta else [])
    return _node("ReorderNorm", inputs, output, spec.overload, name, kind=kind,
                 epsilon=float(epsilon))


def make_fgmp_node(x: str, g2: str, threshold: str, output: str, *,
                   global_scale: str | None = None, name: str | None = None) -> onnx.NodeProto:
    """``output`` = per-16-block FP8 or NVFP4 fake-quantization of ``x`` (FgmpActQuant).

    ``g2``: per-channel Fisher weights [C]; ``threshold``: a block whose Fisher-weighted
    perturbation exceeds it stays FP8; ``global_scale``: static NVFP4 per-tensor scale (else
    amax(x) / 2688 at run time).
    """
    spec = FgmpSpec(global_scale is not None)
    inputs = [x, g2, threshold] + ([global_scale] if global_scale else [])
    return _node("FgmpActQuant", inputs, output, spec.overload, name)


def make_hadamard_node(x: str, base: str, output: str, size: int, *, name: str | None = None) -> onnx.NodeProto:
    """``output = x @ H_size / sqrt(size)`` over the last axis; ``base`` names the [c, c] matrix
    :func:`lowbit.runtime_ext.hadamard.hadamard_base` gives for ``size``."""
    spec = HadamardSpec(size)
    return _node("Hadamard", [x, base], output, spec.overload, name, size=size)


def make_group_quant_node(x: str, qmax: str, output: str, group_size: int, *, name: str | None = None) -> onnx.NodeProto:
    """``output`` = ``x`` fake-quantized per row and group of ``group_size`` channels with a run-time
    scale absmax / qmax (``qmax`` names the [C / group_size, 1] code limits)."""
    spec = GroupQuantSpec(group_size)
    return _node("GroupQuant", [x, qmax], output, spec.overload, name, group_size=group_size)


_BUILDERS = {
    "GroupQuant": (GroupQuantSpec, functions.group_quant_function),
    "Hadamard": (HadamardSpec, functions.hadamard_function),
    "FgmpActQuant": (FgmpSpec, functions.fgmp_function),
    "MatMulLowbit": (MatMulSpec, functions.matmul_function),
    "GatherLowbit": (GatherSpec, functions.gather_function),
    "ReorderNorm": (NormSpec, functions.reorder_norm_function),
}


def function_protos(nodes: Iterable[onnx.NodeProto], opset: int) -> list[onnx.FunctionProto]:
    """One fallback FunctionProto per distinct (op_type, overload) among lowbit ``nodes``."""
    seen: dict[tuple[str, str], onnx.FunctionProto] = {}
    for node in nodes:
        if node.domain != DOMAIN or (node.op_type, node.overload) in seen:
            continue
        if node.op_type not in _BUILDERS:
            raise LowbitError(f"no fallback function for lowbit op {node.op_type!r}")
        spec_cls, build = _BUILDERS[node.op_type]
        seen[(node.op_type, node.overload)] = build(spec_cls.from_overload(node.overload), opset)
    return list(seen.values())


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the fallbacks for the main graph's lowbit nodes and the ``lowbit`` opset import.

    Modifies ``model`` in place and returns it. Existing lowbit functions are replaced.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise LowbitError("model has no default-domain opset import")
    protos = function_protos(model.graph.node, opset)
    keep = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(keep + protos)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model
