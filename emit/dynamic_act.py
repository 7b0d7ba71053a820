"""Dynamic per-token-group symmetric activation quantization, in standard ONNX ops.

Each token's channels are split into contiguous groups of ``group_size`` (after the RPTQ reorder,
contiguous channels have similar ranges); every group gets its own scale at run time,
``absmax(group) / qmax``, so a token-specific outlier only coarsens its own group -- the limit of
static per-cluster int4 ranges (Atom-style). ``qmax`` may differ per group (7 = int4, 127 =
int8), which keeps an outlier cluster in int8 at no extra node.

Emitted pattern (9 nodes per quantized input, every op in ONNX Runtime's default CPU kernels)::

    x -> Reshape[..., C/G, G] -> Abs -> ReduceMax(-1, keepdims) -> Div(qmax) -> Max(tiny) = s
    Reshape -> Div(s) -> Round -> Mul(s) -> Reshape[..., C]

No Clip: ``|x| <= absmax`` so ``|x / s|`` exceeds ``qmax`` by at most a rounding error and Round
(half to even, as numpy's ``rint``) never leaves ``[-qmax, qmax]``. The ``tiny`` floor only keeps
an all-zero group at 0 instead of 0/0. No QuantizeLinear: a run-time scale on a blocked QDQ pair
would be fused by ORT's QDQ selectors into integer matmuls that expect constant scales; the plain
float ops compute the same values and :func:`fake_quant`
(:func:`lowbit.encode.activations.dynamic_fake_quant`) is their bit-exact numpy reference.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lowbit.core.initializers import SCALE_FLOOR, add_initializer
from lowbit.encode.activations import dynamic_fake_quant as fake_quant, dynamic_group_qmax as group_qmax

__all__ = ["dynamic_group_nodes", "fake_quant", "group_qmax"]


def dynamic_group_nodes(graph: ir.Graph, x: ir.Value, channels: int, group_size: int, qmax: np.ndarray,
                        base: str) -> tuple[list[ir.Node], ir.Value]:  # fmt: skip
    """Nodes quantizing ``x`` (last axis = ``channels``) per token and group; returns (nodes, output)."""
    rank = len(x.shape) if x.shape is not None else 3
    keep = [0] * (rank - 1)  # Reshape's 0 copies the input dim: batch/sequence stay dynamic
    grouped_shape = add_initializer(graph, np.array(keep + [channels // group_size, group_size], np.int64), f"{base}.group_shape")
    flat_shape = add_initializer(graph, np.array(keep + [channels], np.int64), f"{base}.ungroup_shape")
    qmax_val = add_initializer(graph, qmax.astype(np.float32).reshape(-1, 1), f"{base}.group_qmax")
    tiny = add_initializer(graph, np.array(SCALE_FLOOR, np.float32), f"{base}.scale_floor")
    axes = add_initializer(graph, np.array([-1], np.int64), f"{base}.group_axis")

    grouped = ir.node("Reshape", [x, grouped_shape], name=f"{base}.group")
    absx = ir.node("Abs", [grouped.outputs[0]], name=f"{base}.abs")
    amax = ir.node("ReduceMax", [absx.outputs[0], axes], {"keepdims": 1}, name=f"{base}.absmax")
    raw_scale = ir.node("Div", [amax.outputs[0], qmax_val], name=f"{base}.scale_raw")
    scale = ir.node("Max", [raw_scale.outputs[0], tiny], name=f"{base}.scale")
    scaled = ir.node("Div", [grouped.outputs[0], scale.outputs[0]], name=f"{base}.scaled")
    codes = ir.node("Round", [scaled.outputs[0]], name=f"{base}.codes")
    deq = ir.node("Mul", [codes.outputs[0], scale.outputs[0]], name=f"{base}.dequant")
    out = ir.node("Reshape", [deq.outputs[0], flat_shape], name=f"{base}.ungroup")
    nodes = [grouped, absx, amax, raw_scale, scale, scaled, codes, deq, out]
    for node in nodes:
        node.outputs[0].name = node.name
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    out.outputs[0].name = f"{base}.act_dequantized"
    out.outputs[0].shape = x.shape
    return nodes, out.outputs[0]
