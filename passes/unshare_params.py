"""Give every norm scale / shift and every bias its own initializer.

Exporters and constant deduplication merge equal constants: a freshly initialised (or a tiny
random) model's norm weights are all ones and its biases all zeros, so one initializer ends up
read by every norm or every bias ``Add`` of the model (measured: torch dynamo's export of a tiny
Llama reads one gamma in all 5 norms; a tiny Qwen2's q/k/v biases are one initializer). Scale
folding, reordering and R1 rewrite a norm's gamma or a bias per layer, so they refuse a shared one
(``folding.fold_target``: "not private initializers") and the model would go unsmoothed and
unrotated.

Assumes a canonicalized graph (norms fused). Guarantees, function-preserving and exact: each use
of a shared float initializer of at most :data:`MAX_ELEMENTS` elements by a norm's scale or bias
input, or by an ``Add`` (a bias after a linear layer), reads a copy of its own with the same
values; other uses, and initializers that are graph inputs or outputs, are left as they are.
``report["unshared_params"]`` counts the copies.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from lowbit.core.initializers import add_initializer
from lowbit.core.linear_sites import NORM_OPS

__all__ = ["MAX_ELEMENTS", "UnshareParamsPass"]

logger = logging.getLogger(__name__)

MAX_ELEMENTS = 1 << 16  # per-channel vectors (a hidden or intermediate size), never a weight matrix


def _per_layer_use(node: ir.Node, index: int) -> bool:
    if (node.domain, node.op_type) in NORM_OPS:
        return index in (1, 2)
    return node.op_type == "Add" and node.domain == ""


class UnshareParamsPass(ir.passes.InPlacePass):
    """Shared norm parameters and biases -> one initializer per use (module doc)."""

    def __init__(self, report: dict | None = None) -> None:
        super().__init__()
        self.report = report

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        copies = 0
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if (tensor is None or value.is_graph_input() or value.is_graph_output() or tensor.size > MAX_ELEMENTS
                    or tensor.dtype != ir.DataType.FLOAT or len(value.uses()) < 2):  # fmt: skip
                continue
            uses = [(node, index) for node, index in value.uses() if _per_layer_use(node, index)]
            for node, index in uses[1:] if len(uses) == len(value.uses()) else uses:
                name = f"{value.name}.{node.name or 'use'}"
                while name in graph.initializers:
                    name += "_"
                copy = add_initializer(graph, tensor.numpy().copy(), name)
                node.replace_input_with(index, copy)
                copies += 1
        if self.report is not None:
            self.report["unshared_params"] = copies
        if copies:
            logger.info("unshared %d norm parameters and biases", copies)
        return ir.passes.PassResult(model, modified=bool(copies))
