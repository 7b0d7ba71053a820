"""Merge the ``lowbit.MatMulLowbit`` nodes that read one activation into one (target ``ort-cpu``).

A decoder block's q/k/v projections read one normed activation, and so do gate/up. Each
``MatMulLowbit`` node re-reads and (in ``int8_group`` mode) re-quantizes that activation, and
ONNX Runtime pays a custom-op dispatch for each: at a decode step those fixed costs are a good
part of the small k/v products (measured on SmolLM2: 11 us for a 576 x 192 product whose weights
stream in 2.6 us). This pass gives each such set of siblings one node over the weights
concatenated along N, followed by one ``Split`` back to the original outputs.

Assumes: :class:`lowbit.emit.ort_cpu.LowerOrtCpuPass` wrote the nodes (packed codes [N, K/2],
block scales [N, K/block] and a scalar global scale as initializers).
Guarantees: siblings merge when they read the same activation (and static activation scale, if
any), have the same attributes and fallback overload, equal global scales, and carry no FP8
blocks; every output column of the merged node is computed from the same codes, scales and
activation codes as before, so the outputs equal the unmerged ones up to float32 summation order
(bit-identical on the kernels measured; tests/emit/test_merge_siblings.py). The outputs keep
their names and consumers; the separate packed arrays are replaced by the concatenated ones (the
file does not grow). Other nodes are untouched; the report gives the merged groups' sizes.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from lowbit.core.initializers import add_initializer
from lowbit.core.pass_base import LowbitPass
from lowbit.runtime_ext import DOMAIN

__all__ = ["MergeSiblingMatMulsPass"]

logger = logging.getLogger(__name__)

_WEIGHT_INPUTS = 4  # a, codes, scales, global_scale (then the optional static act_scale)


def _key(node: ir.Node) -> tuple | None:
    """What siblings must share to merge, or None for a node this pass leaves alone. Only the
    scalar global scale is read: the packed arrays are compared by shape and type (an external
    tensor stays unread until a merge needs it)."""
    if node.domain != DOMAIN or node.op_type != "MatMulLowbit" or len(node.inputs) > _WEIGHT_INPUTS + 1:
        return None  # FP8 blocks (inputs 5-7) are not concatenated
    codes, scales, global_scale = (v.const_value if v is not None else None for v in node.inputs[1:_WEIGHT_INPUTS])
    if codes is None or scales is None or global_scale is None or global_scale.size != 1:
        return None
    attrs = tuple(sorted((name, repr(attr.value)) for name, attr in node.attributes.items()))
    act_scale = node.inputs[_WEIGHT_INPUTS] if len(node.inputs) > _WEIGHT_INPUTS else None
    return (id(node.inputs[0]), id(act_scale), attrs, node.overload, codes.shape[1], scales.shape[1],
            scales.dtype, global_scale.numpy().item())  # fmt: skip


def _merge(graph: ir.Graph, siblings: list[ir.Node], index: int) -> None:
    """One node over the concatenated weights, a Split to the siblings' outputs; the siblings and
    the weight initializers only they read leave the graph."""
    first = siblings[0]
    replaced = [v for n in siblings for v in n.inputs[1:_WEIGHT_INPUTS]]
    codes = np.concatenate([n.inputs[1].const_value.numpy() for n in siblings], axis=0)
    scales = np.concatenate([n.inputs[2].const_value.numpy() for n in siblings], axis=0)
    widths = [int(n.inputs[1].const_value.shape[0]) for n in siblings]
    base = f"lowbit_merged.{index}"
    inputs = [first.inputs[0], add_initializer(graph, codes, f"{base}.codes4"),
              add_initializer(graph, scales, f"{base}.scales4"), *first.inputs[3:]]  # fmt: skip
    merged = ir.node("MatMulLowbit", inputs, dict(first.attributes), domain=DOMAIN,
                     name=f"{base}/MatMulLowbit", overload=first.overload)  # fmt: skip
    split = ir.node("Split", [merged.outputs[0], add_initializer(graph, np.array(widths, np.int64), f"{base}.widths")],
                    {"axis": -1}, num_outputs=len(siblings), name=f"{base}/Split")  # fmt: skip
    graph.insert_before(first, [merged, split])
    for node, new in zip(siblings, split.outputs):
        old = node.outputs[0]
        new.type, new.shape = old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        name, old.name = old.name, None
        new.name = name
    for node in siblings:
        graph.remove(node, safe=True)
    for value in replaced:
        if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
            graph.initializers.pop(value.name)


class MergeSiblingMatMulsPass(LowbitPass):
    """MatMulLowbit nodes reading one activation -> one node + Split (module docs)."""

    PRESERVES_FUNCTION = True  # the same products, grouped differently

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups: dict[tuple, list[ir.Node]] = defaultdict(list)
        for node in graph:
            key = _key(node)
            if key is not None:
                groups[key].append(node)
        sizes = []
        for siblings in groups.values():
            if len(siblings) > 1:
                _merge(graph, siblings, len(sizes))
                sizes.append(len(siblings))
                self.ctx.release_rewritten()  # a large model's merged arrays go to disk a layer at a time
        self.ctx.report["merged_matmuls"] = {"groups": len(sizes), "nodes_before": sum(sizes),
                                             "sizes": sorted(set(sizes))}  # fmt: skip
        if sizes:
            logger.info("ort-cpu: %d MatMulLowbit nodes merged into %d (one per shared activation)", sum(sizes),
                        len(sizes))  # fmt: skip
        return ir.passes.PassResult(model, modified=bool(sizes))
