"""onnx_ir counterparts of the node builders, for compiler passes that edit ``ir.Model``s.

``matmul_node_ir`` / ``gather_node_ir`` / ``reorder_norm_node_ir`` / ``hadamard_node_ir`` build ``ir.Node``s (attributes and ``overload`` exactly as
the onnx.helper builders in :mod:`lowbit.runtime_ext.nodes` write them); ``attach_functions_ir``
adds the fallback functions of every lowbit node of the main graph and the ``lowbit`` opset.
Guarantees: a model built either way serializes to the same nodes and functions.
"""

from __future__ import annotations

__all__ = ["matmul_node_ir", "gather_node_ir", "reorder_norm_node_ir", "hadamard_node_ir", "group_quant_node_ir",
           "attach_functions_ir"]

import onnx_ir as ir

from lowbit.errors import LowbitError
from lowbit.runtime_ext import nodes
from lowbit.runtime_ext.specs import GatherSpec, MatMulSpec


def matmul_node_ir(a: ir.Value, codes: ir.Value, scales: ir.Value, global_scale: ir.Value,
                   spec: MatMulSpec, *, act_scale: ir.Value | None = None,
                   fp8: tuple[ir.Value, ir.Value, ir.Value] | None = None,
                   name: str | None = None) -> ir.Node:
    """``MatMulLowbit``; its output is ``node.outputs[0]`` (see nodes.make_matmul_node)."""
    proto = nodes.make_matmul_node("a", "c", "s", "g", "y", spec,
                                   act_scale="x" if act_scale is not None else None,
                                   fp8=("m", "fc", "fs") if fp8 is not None else None)
    inputs: list[ir.Value | None] = [a, codes, scales, global_scale]
    if act_scale is not None:
        inputs.append(act_scale)
    if fp8 is not None:
        inputs += [None, *fp8]
    return _node(proto, inputs, name)


def gather_node_ir(table: ir.Value, scales: ir.Value, global_scale: ir.Value,
                   indices: ir.Value, spec: GatherSpec, *, name: str | None = None) -> ir.Node:
    """``GatherLowbit``; its output is ``node.outputs[0]``."""
    proto = nodes.make_gather_node("t", "s", "g", "i", "y", spec)
    return _node(proto, [table, scales, global_scale, indices], name)


def reorder_norm_node_ir(x: ir.Value, perm: ir.Value, gamma: ir.Value, *, kind: str,
                         epsilon: float, beta: ir.Value | None = None,
                         name: str | None = None) -> ir.Node:
    """``ReorderNorm``: ``norm(x)[..., perm] * gamma (+ beta)``, gamma/beta already permuted."""
    proto = nodes.make_reorder_norm_node("x", "p", "g", "y", kind=kind, epsilon=epsilon,
                                         beta="b" if beta is not None else None)
    return _node(proto, [x, perm, gamma] + ([beta] if beta is not None else []), name)


def hadamard_node_ir(x: ir.Value, base: ir.Value, size: int, *, name: str | None = None) -> ir.Node:
    """``Hadamard``: ``x @ H_size / sqrt(size)`` over the last axis (``base``: see make_hadamard_node)."""
    return _node(nodes.make_hadamard_node("x", "b", "y", size), [x, base], name)


def group_quant_node_ir(x: ir.Value, qmax: ir.Value, group_size: int, *, name: str | None = None) -> ir.Node:
    """``GroupQuant``: ``x`` fake-quantized per row and group (see make_group_quant_node)."""
    return _node(nodes.make_group_quant_node("x", "q", "y", group_size), [x, qmax], name)


def _node(proto, inputs, name: str | None) -> ir.Node:
    attrs = [ir.serde.deserialize_attribute(a) for a in proto.attribute]
    return ir.Node(proto.domain, proto.op_type, inputs, attrs, overload=proto.overload,
                   num_outputs=1, name=name)


def attach_functions_ir(model: ir.Model) -> ir.Model:
    """Add fallbacks for the main graph's lowbit nodes that have none yet, and the ``lowbit``
    opset (in place)."""
    opset = model.opset_imports.get("")
    if opset is None:
        raise LowbitError("model has no default-domain opset import")
    # a lowbit node whose function the model already has (e.g. norm fusion's lowbit.RMSNormalization
    # on older opsets) keeps it: fallbacks are a function of the overload, nothing to rebuild
    lowbit_nodes = [ir.serde.serialize_node(n) for n in model.graph
                    if n.domain == nodes.DOMAIN and (n.domain, n.op_type, n.overload) not in model.functions]
    for proto in nodes.function_protos(lowbit_nodes, opset):
        fn = ir.serde.deserialize_function(proto)
        model.functions[fn.identifier()] = fn
    model.opset_imports.setdefault(nodes.DOMAIN, 1)
    return model
