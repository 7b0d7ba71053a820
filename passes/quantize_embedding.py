"""Token-embedding tables in int8, looked up by standard ops (recipe ``sites.embeddings = "int8"``).

Assumes a canonicalized graph; runs after every emitter, so the observation run saw the float
table. Measured on the tuning texts (bench/TUNING.md, SmolLM2 ``w4a8-dint4``): quantizing the
lookup after compiling costs 0.1-0.2 % perplexity, while quantizing it before the observation run
moved the statistics OPTQ and AQAS fit (wiki 1.175 -> 1.211 x FP32). Not function-preserving: it
quantizes the table.

Guarantees, for every ``Gather(table, ids, axis=0)`` of a constant float32 2-D table:

- the table is encoded exactly as an int8 LM head in ``sites.int8_weights`` is
  (:func:`lowbit.formats.encode`, int8, one symmetric absmax scale per row, round to nearest);
- the Gather becomes ``Mul(Cast(Gather(codes, ids), float), Gather(row_scale, ids))`` with codes
  int8 [vocab, hidden] and row_scale float32 [vocab, 1]: each looked-up element is
  ``fl(code * scale)``, bit for bit what a DequantizeLinear of those codes gives. Only the looked-up
  rows are dequantized, so the lookup costs a few small nodes per step on any runtime and target;
- the float table stays only while another node still reads it (a tied LM head: its own int8
  encoding of the same matrix has the same codes, and
  :class:`lowbit.emit.share_embedding.ShareEmbeddingCodesPass` later makes the lookup read the
  head's stored codes, one copy in the file);
- ``report["embeddings"]`` lists each table: name, shape, format and bits per weight.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from lowbit import formats
from lowbit.core.analyses import Key
from lowbit.core.initializers import add_initializer
from lowbit.core.pass_base import LowbitPass
from lowbit.errors import LowbitError

__all__ = ["INT8_EMBEDDINGS", "Int8Lookup", "QuantizeEmbeddingPass", "int8_rows"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Int8Lookup:
    """One quantized lookup as this pass wrote it: the Gather of the codes (whose table input a
    later pass may point at another initializer holding the same codes), its Cast, the Gather of
    the row scales, and the table's original name."""

    codes_gather: ir.Node
    cast: ir.Node
    scale_gather: ir.Node
    table: str


INT8_EMBEDDINGS: Key[list[Int8Lookup]] = Key("int8_embeddings", "token-embedding lookups quantized to int8 per row")


ROWS_PER_CHUNK = 4096  # rows are encoded independently: float temporaries of a chunk, not of the table


def int8_rows(table: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [V, K], scales float32 [V, 1]): ``formats.encode(table, "int8", axis=1)`` with one
    absmax scale per row, the encoding of an int8 LM head stored [vocab, hidden]
    (``lowbit.encode.weights``), so a tied head and its table agree code for code. A chunk of rows
    at a time: an 8B model's table is 2 GB in float32, and encoding makes float copies of it."""
    codes = np.empty(table.shape, np.int8)
    scales = np.empty((table.shape[0], 1), np.float32)
    for r in range(0, table.shape[0], ROWS_PER_CHUNK):
        chunk = table[r:r + ROWS_PER_CHUNK]
        bad = int((~np.isfinite(chunk)).sum())
        if bad:
            raise LowbitError(f"embedding table {name} has NaN/Inf values (rows {r}-{r + len(chunk) - 1}: {bad})")
        enc = formats.encode(chunk, "int8", axis=1, symmetric=True, scale_method="absmax")
        codes[r:r + len(chunk)] = enc.values()
        scales[r:r + len(chunk)] = enc.scale
    return codes, scales


def _lookup_tables(graph: ir.Graph) -> list[ir.Node]:
    found = []
    for node in graph:
        if node.domain != "" or node.op_type != "Gather" or node.attributes.get_int("axis", 0):
            continue
        table = node.inputs[0]
        const = table.const_value if table is not None and table.is_initializer() else None
        if const is not None and len(const.shape) == 2 and const.dtype == ir.DataType.FLOAT:
            found.append(node)
    return found


class QuantizeEmbeddingPass(LowbitPass):
    """Embedding tables -> int8 codes per row + standard-op lookups (module doc)."""

    ENSURES = (INT8_EMBEDDINGS,)
    PRESERVES_FUNCTION = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        lookups, entries = [], []
        for gather in _lookup_tables(graph):
            table = gather.inputs[0]
            values = table.const_value.numpy()
            name = table.name or gather.name or "embedding"
            codes_array, scales = int8_rows(values, name)
            codes = add_initializer(graph, codes_array, f"{name}.int8")
            scale = add_initializer(graph, scales, f"{name}.row_scale")
            ids = gather.inputs[1]
            take = ir.node("Gather", [codes, ids], {"axis": 0}, name=f"{name}.int8_lookup")
            cast = ir.node("Cast", [take.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}.int8_cast")
            take_scale = ir.node("Gather", [scale, ids], {"axis": 0}, name=f"{name}.row_scale_lookup")
            mul = ir.node("Mul", [cast.outputs[0], take_scale.outputs[0]], name=f"{name}.dequantize")
            ir.convenience.replace_nodes_and_values(graph, gather, [gather], [take, cast, take_scale, mul],
                                                    [gather.outputs[0]], [mul.outputs[0]])  # fmt: skip
            if not table.uses():
                graph.initializers.pop(table.name, None)
            lookups.append(Int8Lookup(take, cast, take_scale, name))
            entries.append({"table": name, "shape": list(values.shape), "format": "int8 per row",
                            "bits_per_weight": 8 + 32 / values.shape[1]})  # fmt: skip
        self.ctx.analyses.put(INT8_EMBEDDINGS, lookups)
        self.ctx.report["embeddings"] = entries
        logger.info("embeddings: %d tables in int8 per row", len(entries))
        return ir.passes.PassResult(model, modified=bool(entries))
