"""Online Hadamard rotations: inputs that no weight can rotate ahead of time -- the SwiGLU
product act(gate) * up that down_proj reads is elementwise in its channels, so a rotation cannot
be folded into gate/up -- are rotated at run time by a ``lowbit.Hadamard`` op, and the inverse
is folded into the weights that read them (QuaRot's online R4).

Assumes the linear-site map. ``rotate.online`` names what is rotated:

- ``gated_linear``: for each input group fed by act(gate) * up (down_proj), x -> Hadamard(x) =
  x H / sqrt(n) feeds the group's sites, whose weights become ``H^T W / sqrt(n)``; x's other
  readers (shape ops) keep reading x;
- ``attention_qk``: Q and K where attention reads them (after the rotary embedding, which a
  weight cannot absorb) -> Q H and K H over the head size, so Q K^T is unchanged and a K-cache
  quantizer sees K with its outlier channels spread (QuaRot's online K rotation). Fused
  ``Attention`` and decomposed ``softmax(Q K^T) V`` (K^T is transposed around the op) with 4-D
  inputs; the KV cache itself keeps unrotated K (lowbit quantizes K where attention reads it).

The op's ONNX function fallback is attached (:mod:`lowbit.runtime_ext.functions`: two small MatMuls over the
``c x 2^k`` factorisation, never the n x n matrix; the native kernel does a fast Walsh-Hadamard
transform), so every runtime runs the model. The op's [c, c] base matrix is one initializer per
width.

Guarantees: function-preserving up to float32 rounding (tested on SmolLM2); an input whose width
has no Hadamard matrix here is skipped and listed in ``report["rotate"]["online"]["skipped"]``.
Refused by the recipe for ``target = npu`` (a standard-ops-only target).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from lowbit.core.folding import rewrite_weight_kn
from lowbit.core.initializers import add_initializer
from lowbit.core.kv_sites import kv_inputs
from lowbit.core.pass_base import LowbitPass
from lowbit.runtime_ext.hadamard import hadamard_base, hadamard_factors, rotation
from lowbit.runtime_ext.ir_support import attach_functions_ir, hadamard_node_ir

__all__ = ["RotateOnlinePass"]

logger = logging.getLogger(__name__)


def _base(graph: ir.Graph, n: int) -> ir.Value:
    """The op's [c, c] base matrix for width n, one initializer per width."""
    name = f"lowbit_hadamard_base_{n}"
    if name not in graph.initializers:
        return add_initializer(graph, hadamard_base(n), name)
    return graph.initializers[name]


def _insert(graph: ir.Graph, node: ir.Node, after: ir.Value) -> None:
    if after.producer() is not None:
        graph.insert_after(after.producer(), node)
    else:
        graph.insert_before(graph[0], node)


def _rotated(graph: ir.Graph, x: ir.Value, n: int, name: str) -> ir.Value:
    """A new value Hadamard(x) over x's last axis (of width n), inserted after x's producer."""
    node = hadamard_node_ir(x, _base(graph, n), n, name=name)
    node.outputs[0].name = f"{x.name}_hadamard"
    node.outputs[0].type, node.outputs[0].shape = x.type, x.shape
    _insert(graph, node, x)
    return node.outputs[0]


def _rotated_k_transposed(graph: ir.Graph, kt: ir.Value, n: int, name: str) -> ir.Value:
    """K^T [..., head_dim, seq] -> (Hadamard(K))^T: the op works on the last axis, so K^T is
    transposed around it."""
    rank = len(kt.shape)
    swap = [*range(rank - 2), rank - 1, rank - 2]
    to_k = ir.Node("", "Transpose", [kt], [ir.AttrInt64s("perm", swap)], name=f"{name}.to_k")
    _insert(graph, to_k, kt)
    k = to_k.outputs[0]
    k.name, k.type = f"{kt.name}_k", kt.type
    rotated = _rotated(graph, k, n, name)
    back = ir.Node("", "Transpose", [rotated], [ir.AttrInt64s("perm", swap)], name=f"{name}.to_kt")
    graph.insert_after(rotated.producer(), back)
    back.outputs[0].name, back.outputs[0].type, back.outputs[0].shape = f"{kt.name}_hadamard", kt.type, kt.shape
    return back.outputs[0]


def _head_dim(value: ir.Value, axis: int) -> int | None:
    dims = tuple(value.shape) if value.shape is not None else ()
    return dims[axis] if len(dims) == 4 and isinstance(dims[axis], int) else None


class RotateOnlinePass(LowbitPass):
    """Online Hadamard before the inputs ``rotate.online`` names (module doc)."""

    PRESERVES_FUNCTION = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        kinds = self.ctx.recipe.rotate.online
        rotated, skipped = [], {}
        if "gated_linear" in kinds:
            self._linear_inputs(model.graph, rotated, skipped)
        if "attention_qk" in kinds:
            self._queries_and_keys(model.graph, rotated, skipped)
        if rotated:
            attach_functions_ir(model)
        self.ctx.report.setdefault("rotate", {})["online"] = {"kinds": list(kinds), "rotated": rotated, "skipped": skipped}
        logger.info("online Hadamard before %d inputs (%s)", len(rotated), ", ".join(kinds))
        return ir.passes.PassResult(model, modified=bool(rotated))

    def _linear_inputs(self, graph: ir.Graph, rotated: list[str], skipped: dict[str, str]) -> None:
        """x -> Hadamard(x) before down_proj; its weight takes H^T."""
        for group in self.ctx.sites.input_groups():
            feeder = group[0].feeder
            if feeder is None or feeder.kind != "gated_linear":
                continue
            n = group[0].in_features
            if hadamard_factors(n) is None:
                skipped[group[0].name] = f"no Hadamard matrix of order {n}"
                continue
            y = _rotated(graph, group[0].input, n, f"{group[0].name}.hadamard")
            h = rotation(n, seed=None)  # H / sqrt(n), the op's transform; its products are fast
            for site in group:
                site.node.replace_input_with(0, y)
                rewrite_weight_kn(site, h.left_t, defer=self.ctx.defer_rewrites)
            rotated.append(group[0].name)
            self.ctx.release_rewritten()

    def _queries_and_keys(self, graph: ir.Graph, rotated: list[str], skipped: dict[str, str]) -> None:
        """Q and K after the rotary embedding -> Q H, K H: the scores Q K^T do not change, and
        K (what a K-cache quantizer sees) has its outliers spread over the head."""
        for kv in kv_inputs(self.ctx.sites):
            if kv.role != "k":
                continue
            node, where = kv.consumer, kv.attention.name
            transposed = node.op_type == "MatMul"  # softmax(Q K^T): K arrives as K^T [.., hd, seq]
            hd = _head_dim(node.inputs[0], -1)
            if hd is None or _head_dim(node.inputs[1], -2 if transposed else -1) != hd:
                skipped[where] = "Q/K are not 4-D [batch, heads, seq, head_dim] with a known head size"
                continue
            if hadamard_factors(hd) is None:
                skipped[where] = f"no Hadamard matrix of order {hd}"
                continue
            q = _rotated(graph, node.inputs[0], hd, f"{where}.q_hadamard")
            k = (_rotated_k_transposed if transposed else _rotated)(graph, node.inputs[1], hd, f"{where}.k_hadamard")
            node.replace_input_with(0, q)
            node.replace_input_with(1, k)
            rotated.append(where)
