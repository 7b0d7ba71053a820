"""Fuse RPTQ's channel reorder with the norm it feeds into ``lowbit.ReorderNorm`` (target ``ort-cpu``).

Assumes: :class:`lowbit.passes.reorder.ReorderPass` put a ``Gather(x, perm, axis=-1)`` on the input
of a norm (``RMSNormalization``, ``LayerNormalization`` or canonicalize's
``lowbit.RMSNormalization``) and permuted its gamma/beta. Function-preserving up to float32
rounding inside the norm. Guarantees: every ``Gather -> norm`` pair with a constant 1-D int64
``perm``, a norm over the last axis with float32 statistics, constant 1-D gamma (and beta), only
the norm reading the Gather and only the norm's first output used becomes one
``lowbit.ReorderNorm(x, perm, gamma[, beta])``, which computes the norm's statistics over the
gathered row as the unfused pair does (kernel and ONNX fallback alike); the other pairs stay as
they are, and the pass says why at debug level. Fallback functions are attached for every
lowbit node, so the model runs with or without the native library.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from lowbit.emit.ort_cpu import attach_fallbacks
from lowbit.runtime_ext import reorder_norm_node_ir

__all__ = ["FuseReorderNormPass"]

logger = logging.getLogger(__name__)

_NORMS = {("", "RMSNormalization"): "rms", ("lowbit", "RMSNormalization"): "rms",
          ("", "LayerNormalization"): "layer"}


def _last_axis(node: ir.Node, value: ir.Value) -> bool:
    axis = node.attributes.get_int("axis", -1)
    rank = len(value.shape) if value.shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _const_vector(value: ir.Value | None, length: int | None = None) -> bool:
    const = value.const_value if value is not None else None
    return const is not None and len(const.shape) == 1 and (length is None or const.shape[0] == length)


def _fusable(gather: ir.Node) -> tuple[ir.Node, str] | str:
    """(norm, kind) when ``gather`` feeds a norm the fused op computes exactly, else why not."""
    out = gather.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return "the reordered tensor has other readers"
    norm = uses[0].node
    kind = _NORMS.get((norm.domain, norm.op_type))
    if kind is None or uses[0].idx != 0:
        return "the Gather does not feed a norm's input"
    perm = gather.inputs[1]
    if not _last_axis(gather, out) or not _const_vector(perm) or perm.const_value.dtype != ir.DataType.INT64:
        return "not a constant int64 permutation of the last axis"
    channels = perm.const_value.shape[0]
    if not _last_axis(norm, out) or norm.attributes.get_int("stash_type", 1) != 1:
        return "norm not over the last axis with float32 statistics"
    if any(o.uses() or o.is_graph_output() for o in norm.outputs[1:]):
        return "the norm's mean / inverse std outputs are used"
    beta = norm.inputs[2] if len(norm.inputs) > 2 else None
    if not _const_vector(norm.inputs[1], channels) or (beta is not None and not _const_vector(beta, channels)):
        return "gamma/beta are not constant vectors over the channels"
    return norm, kind


class FuseReorderNormPass(ir.passes.InPlacePass):
    """Gather(perm) -> norm pairs -> ``lowbit.ReorderNorm`` (module docs)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, count = model.graph, 0
        for gather in list(graph):
            if gather.domain != "" or gather.op_type != "Gather" or gather.graph is not graph:
                continue
            found = _fusable(gather)
            if isinstance(found, str):
                logger.debug("ReorderNorm: %s kept: %s", gather.name, found)
                continue
            norm, kind = found
            beta = norm.inputs[2] if len(norm.inputs) > 2 else None
            fused = reorder_norm_node_ir(gather.inputs[0], gather.inputs[1], norm.inputs[1], kind=kind,
                                         epsilon=norm.attributes.get_float("epsilon", 1e-5), beta=beta,
                                         name=f"{norm.name or gather.name}.reorder_norm")  # fmt: skip
            graph.insert_before(gather, fused)
            out, new_out = norm.outputs[0], fused.outputs[0]
            new_out.type, new_out.shape = out.type, out.shape
            out.replace_all_uses_with(new_out, replace_graph_outputs=True)
            graph.remove([norm, gather], safe=True)
            new_out.name = out.name
            count += 1
        if count:
            attach_fallbacks(model)
        logger.info("ReorderNorm: fused %d Gather + norm pairs", count)
        return ir.passes.PassResult(model, modified=bool(count))
