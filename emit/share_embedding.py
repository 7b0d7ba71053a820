"""One copy of a tied table: the int8 embedding lookup reads the LM head's stored codes.

Assumes :class:`lowbit.passes.quantize_embedding.QuantizeEmbeddingPass` quantized the lookups
(``int8_embeddings``) and every emitter ran, so the head's weight is in its final form:

- ``DequantizeLinear(codes int8 [vocab, hidden], scale [vocab], axis=0)`` (targets ``qdq``,
  ``qdq-fp4``, and ``ort-cpu`` sites its kernels refuse);
- ``com.microsoft.MatMulNBits`` with bits=8 and no zero-point input (``ort-cpu``): B is uint8
  [vocab, hidden / block, block] holding ``code + 128``.

Function-preserving, exactly: a lookup is pointed at the head's array only when those codes equal
its own, element for element (the head's scales are then equal too: both are the row absmax /
127 of one matrix, checked). With the DequantizeLinear form the lookup's Gather simply reads the
head's codes. With MatMulNBits it reads B and becomes ``Reshape(Sub(Cast(Gather(B, ids)), 128),
[..., hidden])``: ``float(code + 128) - 128`` is the code exactly, so every looked-up value is the
same ``fl(code * scale)``. Lookups whose codes match no head keep their own (the report says so:
e.g. a head the reorder or smoothing rescaled, or an untied table). The unused copy is removed
by the pipeline's final dead-code pass. ``report["embedding_codes_shared_with"]`` maps each table
to the node whose codes it reads, or None.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from lowbit.core.initializers import add_initializer
from lowbit.core.pass_base import LowbitPass
from lowbit.passes.quantize_embedding import INT8_EMBEDDINGS, ROWS_PER_CHUNK, Int8Lookup

__all__ = ["ShareEmbeddingCodesPass"]

logger = logging.getLogger(__name__)

NBITS_OFFSET = 128  # MatMulNBits' default zero point for bits=8


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()


def _dq_codes(node: ir.Node, codes: np.ndarray, scale: np.ndarray) -> ir.Value | None:
    """The DQ's codes initializer when it stores exactly ``codes`` with per-row ``scale``."""
    if node.op_type != "DequantizeLinear" or node.domain != "" or node.attributes.get_int("axis", 1) != 0:
        return None
    if node.attributes.get_int("block_size", 0):
        return None
    q, s = _const(node.inputs[0]), _const(node.inputs[1])
    zp = _const(node.inputs[2]) if len(node.inputs) > 2 else None
    if q is None or s is None or q.dtype != np.int8 or q.shape != codes.shape or s.shape != scale.shape[:1]:
        return None
    if (zp is not None and zp.any()) or not np.array_equal(s, scale[:, 0]) or not _rows_equal(q, codes):
        return None
    return node.inputs[0]


def _nbits_codes(node: ir.Node, codes: np.ndarray, scale: np.ndarray) -> ir.Value | None:
    """MatMulNBits' B when it stores ``codes + 128`` with every block of a row at ``scale``."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or node.attributes.get_int("bits", 4) != 8:
        return None
    if len(node.inputs) > 3 and node.inputs[3] is not None:  # an explicit zero point
        return None
    b, s = _const(node.inputs[1]), _const(node.inputs[2])
    rows, hidden = codes.shape
    if b is None or s is None or b.dtype != np.uint8 or b.ndim != 3 or b.shape[0] != rows:
        return None
    if b.shape[1] * b.shape[2] != hidden or s.size != rows * b.shape[1]:
        return None
    if not np.array_equal(s.reshape(rows, -1), np.broadcast_to(scale, (rows, b.shape[1]))):
        return None
    # code + 128 in uint8 is the int8 code with its top bit flipped
    if not _rows_equal(b.reshape(rows, hidden), codes, lambda rows_: (rows_ ^ np.uint8(0x80)).view(np.int8)):
        return None
    return node.inputs[1]


def _rows_equal(stored: np.ndarray, codes: np.ndarray, as_codes=lambda rows: rows) -> bool:
    """``as_codes(stored) == codes`` everywhere, a chunk of rows at a time (no table-sized temporary)."""
    return all(np.array_equal(as_codes(stored[r:r + ROWS_PER_CHUNK]), codes[r:r + ROWS_PER_CHUNK])
               for r in range(0, len(codes), ROWS_PER_CHUNK))


class ShareEmbeddingCodesPass(LowbitPass):
    """int8 lookups of a tied table read the LM head's stored codes (module doc)."""

    REQUIRES = (INT8_EMBEDDINGS,)
    PRESERVES_FUNCTION = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        sharing = {lookup.table: self._share(graph, lookup) for lookup in self.ctx.analyses.get(INT8_EMBEDDINGS)}
        self.ctx.report["embedding_codes_shared_with"] = sharing
        shared = sum(how is not None for how in sharing.values())
        logger.info("embeddings: %d lookups read their LM head's codes", shared)
        return ir.passes.PassResult(model, modified=bool(shared))

    def _share(self, graph: ir.Graph, lookup: Int8Lookup) -> str | None:
        take = lookup.codes_gather
        codes = _const(take.inputs[0])
        scale = _const(lookup.scale_gather.inputs[0])
        if codes is None or scale is None:
            return None
        for node in graph:
            found = _dq_codes(node, codes, scale)
            if found is not None:
                take.replace_input_with(0, found)
                return f"{node.name} (DequantizeLinear codes)"
            found = _nbits_codes(node, codes, scale)
            if found is not None and self._read_nbits(graph, lookup, found):
                return f"{node.name} (MatMulNBits B)"
        return None

    @staticmethod
    def _read_nbits(graph: ir.Graph, lookup: Int8Lookup, b: ir.Value) -> bool:
        take, cast = lookup.codes_gather, lookup.cast
        ids = take.inputs[1]
        if ids.shape is None:  # the Reshape back to [..., hidden] needs the ids' rank
            return False
        rows, blocks, block = b.const_value.shape
        name = lookup.table
        offset = add_initializer(graph, np.array(NBITS_OFFSET, np.float32), f"{name}.nbits_offset")
        shape = add_initializer(graph, np.array([0] * len(ids.shape) + [blocks * block], np.int64),
                                f"{name}.lookup_shape")  # fmt: skip
        new_take = ir.node("Gather", [b, ids], {"axis": 0}, name=f"{name}.nbits_lookup")
        new_cast = ir.node("Cast", [new_take.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}.nbits_cast")
        sub = ir.node("Sub", [new_cast.outputs[0], offset], name=f"{name}.nbits_unoffset")
        flat = ir.node("Reshape", [sub.outputs[0], shape], name=f"{name}.nbits_rows")
        ir.convenience.replace_nodes_and_values(graph, cast, [take, cast], [new_take, new_cast, sub, flat],
                                                [cast.outputs[0]], [flat.outputs[0]])  # fmt: skip
        return True
