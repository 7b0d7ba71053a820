"""R1: rotate a pre-norm decoder's residual stream by one orthogonal matrix Q (QuaRot's and
SpinQuant's R1), in the weights only -- no new op, so every target keeps it.

Assumes a canonicalized graph (norms fused into single nodes) and the linear-site map. The
residual stream is every value reached from the token embedding's ``Gather`` through residual
``Add``s. With h -> h Q everywhere on it:

- the embedding table E -> E Q;
- every linear that writes into the stream (o_proj, down_proj; weight [K, d]) -> W Q, a bias b
  added to its output -> b Q;
- every norm reading the stream becomes scale-free: RMSNorm(h Q) = RMSNorm(h) Q because an
  orthogonal Q keeps the root mean square, so the norm's gamma is folded into the linears it
  feeds, W [d, N] -> Q^T diag(gamma) W, and gamma becomes 1;
- an LM head tied to the embedding gets its own weight Q^T diag(gamma_final) E^T: the rotated
  table and the head are no longer one matrix (the head is quantized as its own site anyway);
- unless the recipe keeps the table in int8 shared with an int8 head (``sites.embeddings =
  "int8"``, the head in ``sites.int8_weights``): then the head keeps reading the rotated table E Q
  and its input goes through one float MatMul by B = Q^T diag(gamma_final) Q first (z Q B Q^T E^T =
  z diag(gamma_final) E^T), marked to stay float (``linear_sites.FLOAT_SITE_KEY``): hidden^2 more
  float weights (0.3 M on SmolLM2) buy one copy of the vocab x hidden table instead of two.

Q is a randomized Hadamard matrix of the hidden size (:func:`lowbit.runtime_ext.hadamard.rotation`,
``rotate.seed``; a random orthogonal matrix where no Hadamard matrix of that order is built).

A multiplication of the stream by one constant number (Gemma scales the embedding by
sqrt(hidden)) commutes with Q and is walked through.

Guarantees: function-preserving in exact arithmetic (float32: ~1e-6 of the largest logit on
SmolLM2, tested). When the stream is not of this form the model is left untouched and
``report["rotate"]["residual"]["reason"]`` says why: a LayerNorm (mean-centring commutes with Q
only for Q that fixes the all-ones direction), a post-LN model (BERT: the norm's output *is* the
stream), a stream value that is a graph output or read by any other op, shared weights other
than the tied head, a norm with a bias or whose output feeds anything but linear sites.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lowbit.core.float_types import widened_source
from lowbit.core.folding import SHAPE_ONLY_OPS, rewrite_weight_kn
from lowbit.core.initializers import add_initializer
from lowbit.core.linear_sites import FLOAT_SITE_KEY, NORM_OPS, LinearSite, LinearSiteMap, matches_any, private_initializer
from lowbit.core.pass_base import LowbitPass
from lowbit.runtime_ext.hadamard import Rotation, rotation

__all__ = ["TIED_BRIDGE_REASON", "ResidualStream", "RotateResidualPass", "find_residual_stream"]

logger = logging.getLogger(__name__)


@dataclass
class ResidualStream:
    """What R1 rewrites: the embedding table, the stream's writers, and its norms' readers."""

    hidden: int
    table: ir.Value  # the embedding initializer [vocab, hidden]
    writers: list[tuple[LinearSite, ir.Value | None]] = field(default_factory=list)  # site, output bias
    norms: list[tuple[ir.Node, list[LinearSite]]] = field(default_factory=list)  # norm, the sites it feeds
    tied: list[LinearSite] = field(default_factory=list)  # heads whose weight is the table


def _embedding(graph: ir.Graph) -> tuple[ir.Node, ir.Value] | str:
    gathers = [n for n in graph if n.op_type == "Gather" and n.domain == "" and n.inputs[0] is not None
               and n.inputs[0].is_initializer() and n.inputs[0].const_value is not None
               and len(n.inputs[0].const_value.shape) == 2 and _from_graph_input(n.inputs[1])]  # fmt: skip
    if len(gathers) != 1:
        return f"{len(gathers)} embedding lookups (Gather of a 2-D table by a graph input), expected 1"
    return gathers[0], gathers[0].inputs[0]


def _from_graph_input(ids: ir.Value) -> bool:
    """The lookup's indices are a graph input (token ids) up to layout ops and casts -- not indices
    the graph computes, such as T5's relative-position buckets into its attention-bias table."""
    while not ids.is_graph_input():
        node = ids.producer()
        if node is None or node.domain != "" or node.op_type not in _ID_LAYOUT_OPS:
            return False
        ids = node.inputs[0]
    return True


_ID_LAYOUT_OPS = frozenset({"Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"})


def _writer(value: ir.Value, sites: LinearSiteMap, hidden: int) -> tuple[LinearSite, ir.Value | None] | str:
    """The linear site (and constant bias) whose output ``value`` is, when nothing else reads it."""
    node, bias = value.producer(), None
    if node is not None and node.op_type == "Add" and node.domain == "" and len(value.consumers()) == 1:
        consts = [v for v in node.inputs if v is not None and v.const_value is not None]
        if len(consts) == 1 and private_initializer(consts[0]) and consts[0].const_value.shape == (hidden,):
            bias = consts[0]
            value = node.inputs[1] if node.inputs[0] is bias else node.inputs[0]
            node = value.producer()
    site = sites.by_node.get(id(node)) if node is not None else None
    if site is None:
        return f"{node.op_type if node else 'a graph input'} {node.name if node else value.name} adds into the residual stream"
    if site.out_features != hidden or not private_initializer(site.weight) or len(value.consumers()) != 1:
        return f"{site.name} writes into the residual stream but its weight or output is shared"
    return site, bias


def _scalar_scale(node: ir.Node, index: int) -> bool:
    """``node`` multiplies its stream input ``index`` by one constant number."""
    if node.op_type != "Mul" or node.domain != "" or index not in (0, 1):
        return False
    other = node.inputs[1 - index]
    return other is not None and other.const_value is not None and other.const_value.size == 1


def find_residual_stream(graph: ir.Graph, sites: LinearSiteMap) -> ResidualStream | str:
    """The residual stream R1 can rotate, or why not (module doc)."""
    layer_norm = next((n for n in graph if n.op_type == "LayerNormalization"), None)
    if layer_norm is not None:  # GPT-2, BERT (post-LN: the norm's output is the stream itself)
        return f"LayerNorm {layer_norm.name}: mean-centring does not commute with a rotation"
    found = _embedding(graph)
    if isinstance(found, str):
        return found
    gather, table = found
    hidden = int(table.const_value.shape[1])
    stream = ResidualStream(hidden, table)
    frontier, seen = [gather.outputs[0]], set()
    while frontier:
        value = frontier.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_output():
            return f"residual value {value.name} is a graph output"
        for node, index in value.uses():
            if node.op_type in SHAPE_ONLY_OPS:
                continue
            if (node.domain, node.op_type) in NORM_OPS:
                why = _check_norm(node, index, sites, table)
                if isinstance(why, str):
                    return why
                stream.norms.append((node, why))
                continue
            if _scalar_scale(node, index):  # Gemma's embedding times sqrt(hidden): commutes with Q
                frontier.append(node.outputs[0])
                continue
            if node.op_type == "Add" and node.domain == "" and index in (0, 1):
                other = node.inputs[1 - index]
                if other is None or id(other) in seen:
                    return f"Add {node.name} adds two residual values"
                written = _writer(other, sites, hidden)
                if isinstance(written, str):
                    return written
                stream.writers.append(written)
                frontier.append(node.outputs[0])
                continue
            return f"{node.op_type} {node.name} reads the residual stream"
    if not stream.norms or not stream.writers:
        return "no pre-norm residual stream (norms reading it and linears writing into it)"
    stream.tied = [s for _, readers in stream.norms for s in readers if s.weight is table]
    other_uses = [n for n, _ in table.uses() if n is not gather and not any(n in s.weight_path for s in stream.tied)]
    if other_uses:
        return f"the embedding table {table.name} is also read by {other_uses[0].op_type} {other_uses[0].name}"
    return stream


def _check_norm(norm: ir.Node, index: int, sites: LinearSiteMap, table: ir.Value) -> list[LinearSite] | str:
    gamma = norm.inputs[1] if len(norm.inputs) > 1 else None
    has_bias = len(norm.inputs) > 2 and norm.inputs[2] is not None
    if index != 0 or has_bias or not private_initializer(gamma):
        return f"norm {norm.name}: a bias, or a scale that is not a private initializer"
    if norm.attributes.get_int("axis", -1) not in (-1, len(norm.inputs[0].shape or ()) - 1):
        return f"norm {norm.name} does not normalize the last axis"
    readers = []
    for node, i in norm.outputs[0].uses():
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        site = sites.by_node.get(id(node))
        if site is None or i != 0:
            return f"norm {norm.name} feeds {node.op_type} {node.name}, not only linear layers"
        if site.weight is not table and not private_initializer(site.weight):
            return f"{site.name} reads norm {norm.name} through a shared weight"
        readers.append(site)
    if norm.outputs[0].is_graph_output():
        return f"norm {norm.name}'s output is a graph output"
    return readers


TIED_BRIDGE_REASON = "R1's bridge to the tied LM head (Q^T diag(gamma) Q), kept float"


def rotate_stream(graph: ir.Graph, stream: ResidualStream, rot: Rotation, *, keep_tied: bool = False,
                  after_each: Callable[[], None] = lambda: None, defer: bool = False) -> None:
    """Apply h -> h Q to ``stream`` (module doc), Q = ``rot`` (products by Q through its fast
    transform, :class:`lowbit.runtime_ext.hadamard.Rotation`).
    ``keep_tied``: a tied head keeps reading the table, behind the float bridge B (module doc).
    ``after_each`` runs after each norm's readers and after each writer (a large model's compile
    spills the weights rewritten so far: ``CompileContext.release_rewritten``); vocabulary-sized
    products are computed a chunk of rows at a time, so the float64 temporaries are a chunk's.
    ``defer``: the writers' and the block-sized readers' rewrites are deferred to their reads
    (:func:`lowbit.core.folding.rewrite_weight_kn`); the table and a wide head are rotated now."""
    for norm, readers in stream.norms:
        gamma = norm.inputs[1].const_value.numpy().astype(np.float64)
        for site in readers:
            if keep_tied and site.weight is stream.table:
                _bridge(graph, site, np.ascontiguousarray(rot.left_t(gamma[:, None] * rot.matrix), dtype=np.float32),
                        f"{stream.table.name}.tied_head_bridge")  # fmt: skip
            elif site.weight is stream.table:  # the tied head: a weight of its own, [hidden, vocab]
                table = _rows_of(stream.table.const_value)  # never widened whole: 1 GB in float32 at 1B
                head = np.empty(table.shape[::-1], np.float32)
                for rows in _chunks(len(table)):
                    head[:, rows] = rot.right(table[rows] * gamma).T  # (Q^T diag(gamma) E^T)[:, rows]
                site.node.replace_input_with(1, add_initializer(graph, head, f"{stream.table.name}.rotated_head"))
                del table, head  # a large model's maps and copies are released by after_each
            else:
                _rotate_reader(site, gamma, rot, defer)
        norm.inputs[1].const_value = ir.tensor(np.ones_like(gamma, dtype=np.float32), name=norm.inputs[1].name)
        after_each()
    for site, bias in stream.writers:
        rewrite_weight_kn(site, rot.right, defer=defer)
        if bias is not None:
            bias.const_value = ir.tensor(rot.right(bias.const_value.numpy()).astype(np.float32), name=bias.name)
        after_each()
    table = _rows_of(stream.table.const_value)
    rotated = np.empty(table.shape, np.float32)
    for rows in _chunks(len(table)):
        rotated[rows] = rot.right(table[rows])
    del table
    stream.table.const_value = ir.tensor(rotated, name=stream.table.name)
    del rotated
    after_each()


_CHUNK_ROWS = 4096  # vocabulary rows per product: float64 temporaries of 4096 x hidden, not vocab x hidden


def _rows_of(tensor: ir.TensorProtocol) -> np.ndarray:
    """A table's rows, read a chunk at a time without a whole float32 copy: the float16 source of
    a lazily widened table (2 GB in float32 at 8B; each chunk is widened exactly as the whole
    would be), else the tensor's own array (a memory map when it is external data)."""
    source = widened_source(tensor)
    return (source if source is not None else tensor).numpy()


def _chunks(n: int) -> list[slice]:
    return [slice(start, min(start + _CHUNK_ROWS, n)) for start in range(0, n, _CHUNK_ROWS)]


_SLICE_BYTES = 256 << 20  # float64 bytes of one product: an untied 8B head is 4 GB in float64
# A deferred rewrite is recomputed, whole, at every read: weights above this (a vocabulary head)
# are rotated now and spilled once instead
_DEFER_MAX_BYTES = 512 << 20


def _rotate_reader(site: LinearSite, gamma: np.ndarray, rot: Rotation, defer: bool = False) -> None:
    """W -> Q^T diag(gamma) W, written in the weight's stored layout; a wide weight (an 8B
    gate/up_proj, an untied vocabulary head) a slice of output columns at a time, so the float64
    temporaries are a slice's. Columns are independent, and a weight within one slice is computed
    as one product. ``defer``: a weight up to ``_DEFER_MAX_BYTES`` is rewritten at its reads."""
    k, n = site.in_features, site.out_features
    width = max(1, _SLICE_BYTES // (8 * k))
    if n <= width or (defer and 4 * k * n <= _DEFER_MAX_BYTES):
        rewrite_weight_kn(site, lambda w: _rotated_columns(w, gamma, rot, width), defer=defer)
        return
    stored = _rows_of(site.weight.const_value)  # a float16 head is read as stored, not widened whole
    out = np.empty(site.weight.const_value.shape, np.float32)  # written in its stored layout
    axis = site.reduction_axis
    _rotated_columns(stored if axis == 0 else stored.T, gamma, rot, width, out if axis == 0 else out.T)
    del stored
    site.weight.const_value = ir.tensor(out, name=site.weight.name)


def _rotated_columns(w: np.ndarray, gamma: np.ndarray, rot: Rotation, width: int,
                     out: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Q^T diag(gamma) W of a (K, N) ``w``, ``width`` columns per product (one product when they
    fit), into float32 ``out`` (K, N) when given (a transposed view writes the stored layout)."""
    if w.shape[1] <= width and out is None:
        return rot.left_t(gamma[:, None] * w)
    out = np.empty(w.shape, np.float32) if out is None else out
    for start in range(0, w.shape[1], width):
        cols = slice(start, start + width)
        out[:, cols] = rot.left_t(gamma[:, None] * w[:, cols])
    return out


def _bridge(graph: ir.Graph, site: LinearSite, matrix: np.ndarray, name: str) -> None:
    """``site`` reads ``MatMul(its input, matrix)`` instead of its input."""
    node = ir.node("MatMul", [site.node.inputs[0], add_initializer(graph, matrix, name)], name=name)
    node.metadata_props[FLOAT_SITE_KEY] = TIED_BRIDGE_REASON
    node.outputs[0].name = f"{name}.output"
    node.outputs[0].type, node.outputs[0].shape = site.node.inputs[0].type, site.node.inputs[0].shape
    graph.insert_before(site.node, node)
    site.node.replace_input_with(0, node.outputs[0])


class RotateResidualPass(LowbitPass):
    """R1 (module doc); ``report["rotate"]["residual"]`` says what was rotated, or why not."""

    PRESERVES_FUNCTION = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        report = self.ctx.report.setdefault("rotate", {})
        stream = find_residual_stream(model.graph, self.ctx.sites)
        if isinstance(stream, str):
            report["residual"] = {"rotated": False, "reason": stream}
            logger.warning("R1 residual rotation not applied: %s", stream)
            return ir.passes.PassResult(model, modified=False)
        recipe = self.ctx.recipe
        rot = rotation(stream.hidden, recipe.rotate.seed)
        keep_tied = bool(stream.tied) and recipe.sites.embeddings == "int8" and all(
            matches_any(s, recipe.sites.int8_weights) for s in stream.tied)
        rotate_stream(model.graph, stream, rot, keep_tied=keep_tied, after_each=self.ctx.release_rewritten,
                      defer=self.ctx.defer_rewrites)
        report["residual"] = {"rotated": True, "hidden": stream.hidden, "matrix": rot.kind,
                              "writers": len(stream.writers), "norms": len(stream.norms),
                              "readers": sum(len(r) for _, r in stream.norms),
                              "untied_head": bool(stream.tied) and not keep_tied, "tied_head_bridge": keep_tied}  # fmt: skip
        logger.info("R1: residual stream (%d) rotated by %s: %d writers, %d norms", stream.hidden, rot.kind,
                    len(stream.writers), len(stream.norms))  # fmt: skip
        return ir.passes.PassResult(model, modified=True)
