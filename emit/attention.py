"""Fuse exported eager attention into ONNX's ``Attention`` and ``RotaryEmbedding`` (opset 23; target ``ort-cpu``).

An optimum / transformers export writes each decoder attention as about 45 small nodes (head
reshapes, the rotary embedding's slices and concats, the K/V cache concatenation, the repeat of
K/V heads, two MatMuls, the mask and the softmax). ONNX Runtime dispatches each one at every
decode step; on SmolLM2 they were half of a step. This pass replaces each such block by two
standard ``RotaryEmbedding`` nodes (Q and K) and one standard ``Attention`` (both opset 23),
reading the same projections and K/V cache inputs and writing the same cache outputs. Any ONNX
runtime may run the standard ops, and ONNX Runtime's CPU ``Attention`` is the faster kernel: on
the W4A8 SmolLM2 graph it took 1.54 / 1.76 ms per decode step at 1 / 2 threads where the contrib
``GroupQueryAttention`` this pass first wrote took 1.90 / 2.00 ms (bench/RESULTS.md).

Assumes: the model's default-domain opset is >= 23 (the ``ort-cpu`` target's output opset,
:func:`lowbit.passes.opset.output_opset`), and the graph computes, per layer (operand order of
commutative ops free)::

    q = Transpose(Reshape(q_proj, [B, S, H, D]), [0, 2, 1, 3])          (k, v likewise, Hkv heads)
    rot(x) = x * Unsqueeze(cos, 1) + Concat(-x[..., D/2:], x[..., :D/2]) * Unsqueeze(sin, 1)
    present_k = Concat(past_k, rot(k), axis=2)       present_v = Concat(past_v, v, axis=2)
    (no cache: present_k = rot(k), present_v = v)
    kr, vr = present_k, present_v, each head repeated H / Hkv times (Unsqueeze/Expand/Reshape)
    p = Softmax((rot(q) * c1) @ (Transpose(kr) * c2) + mask)   (optionally NaN -> 0 afterwards)
    out = Reshape(Transpose(p @ vr, [0, 2, 1, 3]), [B, S, H * D])

with ``cos``/``sin`` [B, S, D] computed once as ``Cos``/``Sin`` of ``Concat(f, f)`` (times a
constant), ``mask`` an additive [B, 1, S, T] ``Where(m, 0, -inf)`` (or the float32 minimum) over a
boolean mask built from the ``attention_mask`` input, and ``c1``, ``c2`` scalar constants.

Guarantees: each block that matches all of the above is replaced; the others are left as they
are and the report says why (e.g. a quantized K/V cache between the rotary and the Concat).
The fused graph computes the same function up to float32 rounding, for any ``position_ids`` and
any padding in ``attention_mask``:

- rotary: the first halves of the cos/sin rows the graph computed for this step, [B, S, D / 2],
  are the ``RotaryEmbedding`` caches (its form without ``position_ids``), so positions past any
  trained length behave as in the export;
- attention: ``is_causal = 0`` and the export's own mask is ``attn_mask``, with -inf written as
  the float32 minimum: a query whose keys are all masked (a left-padding position) then yields a
  finite row instead of the export's zero row. Those rows are read by no real token (their keys
  are masked for every other query), so real tokens' outputs do not change (the K/V cache rows of
  padding positions may: they are never read);
- the scale is ``c1 * c2``; ``Attention`` takes and returns the K/V caches in the export's
  [B, Hkv, T, D] layout, so the model still runs in ``ORTModelForCausalLM``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np
import onnx_ir as ir
from onnx_ir.convenience import get_const_tensor
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lowbit.core.initializers import add_initializer
from lowbit.core.pass_base import LowbitPass
from lowbit.passes.opset import default_opset

__all__ = ["FuseAttentionPass"]

logger = logging.getLogger(__name__)

ATTENTION_OPSET = 23  # Attention and RotaryEmbedding
_MASKED = (float("-inf"), float(np.finfo(np.float32).min))  # the masked score (transformers writes either)


class _NoMatch(Exception):
    """The block is not the eager attention this pass fuses; the message says where."""


def _node(value: ir.Value | None, op: str, what: str) -> ir.Node:
    node = value.producer() if value is not None else None
    if node is None or node.domain != "" or node.op_type != op:
        got = "a graph input or constant" if node is None else f"{node.domain + '.' if node.domain else ''}{node.op_type}"
        raise _NoMatch(f"{what} is {got}, not {op}")
    return node


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


def _scalar(value: ir.Value) -> float | None:
    tensor = get_const_tensor(value)
    if tensor is None:
        return None
    array = np.asarray(tensor.numpy())
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _perm(node: ir.Node) -> tuple[int, ...]:
    attr = node.attributes.get("perm")
    return tuple(attr.as_ints()) if attr is not None else ()


def _axis(node: ir.Node, rank: int = 4) -> int:
    axis = node.attributes.get_int("axis", 0)
    return axis + rank if axis < 0 else axis


def _operands(node: ir.Node, op: str, what: str) -> tuple[ir.Node, ir.Value]:
    """For a binary commutative ``node``: (the input produced by ``op``, the other input)."""
    for i in (0, 1):
        producer = node.inputs[i].producer() if node.inputs[i] is not None else None
        if producer is not None and producer.domain == "" and producer.op_type == op:
            return producer, node.inputs[1 - i]
    raise _NoMatch(f"{what}: no {op} input")


@dataclasses.dataclass
class _Heads:
    """``Transpose(Reshape(proj, [B, S, heads, D]), [0, 2, 1, 3])``."""

    proj: ir.Value
    heads: int
    head_size: int


def _split_heads(value: ir.Value, what: str) -> _Heads:
    transpose = _node(value, "Transpose", what)
    if _perm(transpose) != (0, 2, 1, 3):
        raise _NoMatch(f"{what}: Transpose perm {_perm(transpose)}")
    reshape = _node(transpose.inputs[0], "Reshape", what)
    shape, proj = _ints(reshape.inputs[1]), reshape.inputs[0]
    width = proj.shape[-1] if proj.shape is not None and proj.shape.rank() == 3 else None
    if shape is None or len(shape) != 4 or shape[3] <= 0 or not isinstance(width, int) or width % shape[3]:
        raise _NoMatch(f"{what}: Reshape of {proj.shape} to {shape}, not [B, S, heads, head_size]")
    heads = width // shape[3]
    copies = reshape.attributes.get_int("allowzero", 0) == 0  # a 0 copies the input's dimension
    if shape[2] not in (heads, -1) or any(d not in (0, -1) for d in shape[:2]) or shape.count(-1) > 1 or not copies:
        raise _NoMatch(f"{what}: Reshape of {proj.shape} to {shape}, not [B, S, heads, head_size]")
    return _Heads(proj, heads, shape[3])


@dataclasses.dataclass
class _Rotary:
    cos: ir.Value  # [B, S, D]: Cos(Concat(f, f)) (times a constant)
    sin: ir.Value


def _half(value: ir.Value, what: str) -> None:
    """``value`` is Cos/Sin of ``Concat(f, f)`` on the last axis, optionally times a constant."""
    node = value.producer()
    if node is not None and node.op_type == "Mul" and node.domain == "":
        consts = [v for v in node.inputs if _scalar(v) is not None]
        if len(consts) != 1:
            raise _NoMatch(f"{what}: scaled by a non-constant")
        value = next(v for v in node.inputs if v is not consts[0])
        node = value.producer()
    if node is None or node.op_type not in ("Cos", "Sin") or node.domain != "":
        raise _NoMatch(f"{what} is not Cos/Sin of the rotary angles")
    concat = _node(node.inputs[0], "Concat", f"{what}'s angles")
    if len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1] or _axis(concat, 3) != 2:
        raise _NoMatch(f"{what}: the angles are not Concat(f, f) on the last axis (halves would differ)")


def _unsqueezed(value: ir.Value, what: str) -> ir.Value:
    node = _node(value, "Unsqueeze", what)
    if _ints(node.inputs[1]) != [1]:
        raise _NoMatch(f"{what}: Unsqueeze axes {_ints(node.inputs[1])}, not [1]")
    return node.inputs[0]


def _slice(value: ir.Value, what: str) -> tuple[ir.Value, int, int]:
    """(input, start, end) of a last-axis, unit-step ``Slice``."""
    node = _node(value, "Slice", what)
    starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
    axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if starts is None or ends is None or axes not in ([3], [-1]) or steps != [1] or len(starts) != 1:
        raise _NoMatch(f"{what}: not a constant unit-step slice of the last axis")
    return node.inputs[0], starts[0], ends[0]


def _rotary(value: ir.Value, what: str) -> tuple[ir.Value, _Rotary]:
    """(x, rotary) for ``value = x * cos' + rotate_half(x) * sin'``."""
    add = _node(value, "Add", what)
    products = [_node(v, "Mul", what) for v in add.inputs]
    for first, second in (products, products[::-1]):
        try:
            concat, sin_u = _operands(second, "Concat", what)
        except _NoMatch:
            continue
        x = None
        for i in (0, 1):
            if first.inputs[i] is not None and first.inputs[1 - i] is not None:
                try:
                    cos = _unsqueezed(first.inputs[1 - i], f"{what} cos")
                except _NoMatch:
                    continue
                x = first.inputs[i]
                break
        if x is None:
            raise _NoMatch(f"{what}: no x * Unsqueeze(cos)")
        if len(concat.inputs) != 2 or _axis(concat) != 3:
            raise _NoMatch(f"{what}: rotate_half is not a last-axis Concat of two halves")
        neg = _node(concat.inputs[0], "Neg", f"{what} rotate_half")
        x2, s2, e2 = _slice(neg.inputs[0], f"{what} second half")
        x1, s1, e1 = _slice(concat.inputs[1], f"{what} first half")
        shape = x.shape
        size = shape[3] if shape is not None and len(shape) == 4 and isinstance(shape[3], int) else None
        if x1 is not x or x2 is not x or size is None or (s1, e1) != (0, size // 2) or s2 != size // 2 or e2 < size:
            raise _NoMatch(f"{what}: rotate_half does not swap the two halves of the head")
        sin = _unsqueezed(sin_u, f"{what} sin")
        _half(cos, "cos")
        _half(sin, "sin")
        return x, _Rotary(cos, sin)
    raise _NoMatch(f"{what}: no rotate_half(x) * sin term")


def _repeated(value: ir.Value, what: str) -> ir.Value:
    """The cache value a head-repeat (Unsqueeze -> Expand -> Reshape) reads, or ``value``."""
    node = value.producer()
    if node is None or node.op_type != "Reshape" or node.domain != "":
        return value
    expand = _node(node.inputs[0], "Expand", what)
    unsqueeze = _node(expand.inputs[0], "Unsqueeze", what)
    if _ints(unsqueeze.inputs[1]) != [2]:
        raise _NoMatch(f"{what}: head repeat unsqueezes axes {_ints(unsqueeze.inputs[1])}")
    return unsqueeze.inputs[0]


@dataclasses.dataclass
class _Cache:
    present: ir.Value  # the graph output (or the new K/V when there is no cache)
    past: ir.Value | None
    new: ir.Value  # the step's K (rotated) / V heads


def _cache(value: ir.Value, graph: ir.Graph, what: str) -> _Cache:
    node = value.producer()
    if node is not None and node.op_type == "Concat" and node.domain == "" and _axis(node) == 2:
        past, new = node.inputs
        if past not in graph.inputs or not value.is_graph_output():
            raise _NoMatch(f"{what}: the cache Concat does not join a graph input to a graph output")
        return _Cache(value, past, new)
    return _Cache(value, None, value)


@dataclasses.dataclass
class _Block:
    q: ir.Value  # the projections, [B, S, heads * D]
    k: ir.Value
    v: ir.Value
    k_cache: _Cache
    v_cache: _Cache
    rotary: _Rotary
    mask: ir.Node  # Where(m, 0, -inf)
    heads: int
    kv_heads: int
    head_size: int
    scale: float
    output: ir.Value  # the block's [B, S, H * D] result


def _scaled(value: ir.Value) -> tuple[ir.Value, float]:
    node = value.producer()
    if node is not None and node.domain == "" and node.op_type in ("Mul", "Div"):
        for i in (0, 1) if node.op_type == "Mul" else (1,):
            c = _scalar(node.inputs[i])
            if c is not None and c != 0.0:
                return node.inputs[1 - i], (c if node.op_type == "Mul" else 1.0 / c)
    return value, 1.0


def _merges_heads(reshape: ir.Node, width: int) -> bool:
    """Whether a Reshape of [B, S, H, D] writes [B, S, H * D]: a 3-D target (constant, or a
    Concat of the two leading sizes and a constant) ending in H * D or -1."""
    target = _ints(reshape.inputs[1])
    if target is None:
        concat = reshape.inputs[1].producer()
        if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 3:
            return False
        target = [0, 0, *(_ints(concat.inputs[2]) or [])]
    return len(target) == 3 and target[-1] in (width, -1)


def _match(softmax: ir.Node, graph: ir.Graph) -> _Block:
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        raise _NoMatch("Softmax not over the keys")
    probs = softmax.outputs[0]
    uses = [u.node for u in probs.uses()]
    if len(uses) == 2 and {n.op_type for n in uses} == {"IsNaN", "Where"}:
        probs = next(n for n in uses if n.op_type == "Where").outputs[0]  # NaN rows -> 0
        uses = [u.node for u in probs.uses()]
    if len(uses) != 1 or uses[0].op_type != "MatMul" or uses[0].inputs[0] is not probs:
        raise _NoMatch("the probabilities feed more than p @ V")
    context = uses[0]
    scores = _node(softmax.inputs[0], "Add", "the scores")
    qk, mask_value = _operands(scores, "MatMul", "the scores")
    mask = _node(mask_value, "Where", "the mask")
    if _scalar(mask.inputs[1]) != 0.0 or _scalar(mask.inputs[2]) not in _MASKED:
        raise _NoMatch("the mask is not Where(m, 0, -inf or the float32 minimum)")
    q_scaled, c1 = _scaled(qk.inputs[0])
    k_scaled, c2 = _scaled(qk.inputs[1])
    k_t = _node(k_scaled, "Transpose", "K^T")
    if _perm(k_t) != (0, 1, 3, 2):
        raise _NoMatch(f"K^T perm {_perm(k_t)}")
    q_heads_rot, rotary = _rotary(q_scaled, "Q rotary")
    k_cache = _cache(_repeated(k_t.inputs[0], "K repeat"), graph, "K")
    v_cache = _cache(_repeated(context.inputs[1], "V repeat"), graph, "V")
    if (k_cache.past is None) != (v_cache.past is None):
        raise _NoMatch("only one of K and V has a cache")
    k_heads_rot, k_rotary = _rotary(k_cache.new, "K rotary")
    if (k_rotary.cos, k_rotary.sin) != (rotary.cos, rotary.sin):
        raise _NoMatch("Q and K use different rotary angles")
    q, k, v = (_split_heads(x, name) for x, name in ((q_heads_rot, "Q"), (k_heads_rot, "K"), (v_cache.new, "V")))
    if not (q.head_size == k.head_size == v.head_size) or k.heads != v.heads or q.heads % k.heads:
        raise _NoMatch(f"heads Q {q.heads}x{q.head_size}, K {k.heads}x{k.head_size}, V {v.heads}x{v.head_size}")
    merge = [u.node for u in context.outputs[0].uses()]
    if len(merge) != 1 or merge[0].op_type != "Transpose" or _perm(merge[0]) != (0, 2, 1, 3):
        raise _NoMatch("p @ V is not transposed back to [B, S, H, D]")
    out = [u.node for u in merge[0].outputs[0].uses()]
    if len(out) != 1 or out[0].op_type != "Reshape" or not _merges_heads(out[0], q.heads * q.head_size):
        raise _NoMatch("the heads are not merged back to [B, S, H * D]")
    return _Block(q.proj, k.proj, v.proj, k_cache, v_cache, rotary, mask, q.heads, k.heads, q.head_size,
                  c1 * c2, out[0].outputs[0])  # fmt: skip


class _Shared:
    """The values every fused block reads, built once per graph (before the first block)."""

    @staticmethod
    def check(graph: ir.Graph, rotary: _Rotary, mask: ir.Node) -> None:
        """Raise _NoMatch unless the shared values can be built (before any node is inserted)."""
        if not any(v.name == "attention_mask" for v in graph.inputs):
            raise _NoMatch("the graph has no attention_mask input (the key length T comes from it)")
        shape = rotary.cos.shape
        if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
            raise _NoMatch("the rotary table's head size is not static")
        node = mask.inputs[0].producer()
        if node is not None and node.op_type == "Slice" and node.domain == "":
            axes = _ints(node.inputs[3]) if len(node.inputs) > 3 else None
            steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
            if _ints(node.inputs[1]) != [0] or axes not in ([3], [-1]) or steps != [1]:
                raise _NoMatch("the mask is not sliced to the key length on its last axis")

    def __init__(self, graph: ir.Graph, anchor: ir.Node, rotary: _Rotary, mask: ir.Node) -> None:
        self.check(graph, rotary, mask)
        self.graph, self.anchor = graph, anchor
        attention_mask = next(v for v in graph.inputs if v.name == "attention_mask")
        total = self._op("Shape", [attention_mask], start=1, end=2)  # [T]
        self.bias = self._bias(mask, total)
        # RotaryEmbedding's [B, S, D / 2] caches: the first halves of the step's own [B, S, D] cos /
        # sin rows (the angles are Concat(f, f), so both halves are equal)
        size = rotary.cos.shape[2]
        zero, half = self._const(np.array([0], np.int64), "zero"), self._const(np.array([size // 2], np.int64), "rotary_half")
        axis = self._const(np.array([-1], np.int64), "last_axis")
        self.cos, self.sin = (self._op("Slice", [t, zero, half, axis]) for t in (rotary.cos, rotary.sin))

    def _const(self, array: np.ndarray, name: str) -> ir.Value:
        return add_initializer(self.graph, array, f"lowbit_attention.{name}")

    def _op(self, op: str, inputs: list[ir.Value], **attrs) -> ir.Value:
        node = ir.node(op, inputs, attrs, name=f"lowbit_attention/{op}_{len(self.graph)}")
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

    def _bias(self, mask: ir.Node, total: ir.Value) -> ir.Value:
        """The export's additive mask with -inf written as the float32 minimum (a fully masked
        padding row stays finite). A last-axis slice of the boolean mask to the key length is
        taken to T = attention_mask's length here, not from a layer's cache shape (which the
        fused graph no longer computes)."""
        cond = mask.inputs[0]
        node = cond.producer()
        if node is not None and node.op_type == "Slice" and node.domain == "":  # checked in check()
            cond = self._op("Slice", [node.inputs[0], node.inputs[1], total, node.inputs[3]])
        minimum = self._const(np.array([np.finfo(np.float32).min], np.float32), "mask_min")
        return self._op("Where", [cond, mask.inputs[1], minimum])


def _fuse(block: _Block, shared: _Shared, graph: ir.Graph, index: int) -> None:
    anchor = block.output.producer()

    def rope(x: ir.Value, heads: int, name: str) -> ir.Value:
        node = ir.node("RotaryEmbedding", [x, shared.cos, shared.sin], {"interleaved": 0, "num_heads": heads},
                       name=f"lowbit_attention/{index}/{name}_rotary")  # fmt: skip
        graph.insert_before(anchor, node)
        return node.outputs[0]

    q, k = rope(block.q, block.heads, "q"), rope(block.k, block.kv_heads, "k")
    inputs = [q, k, block.v, shared.bias, block.k_cache.past, block.v_cache.past]
    attention = ir.node("Attention", inputs,
                        {"q_num_heads": block.heads, "kv_num_heads": block.kv_heads, "is_causal": 0,
                         "scale": float(np.float32(block.scale))},  # fmt: skip
                        num_outputs=3, name=f"lowbit_attention/{index}/attention")
    graph.insert_before(anchor, attention)
    out, present_k, present_v = attention.outputs
    for old, new in ((block.output, out), (block.k_cache.present, present_k), (block.v_cache.present, present_v)):
        if old is block.output or old.is_graph_output():
            new.type, new.shape = old.type, old.shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            name, old.name = old.name, None
            new.name = name


class FuseAttentionPass(LowbitPass):
    """Eager attention blocks -> RotaryEmbedding + Attention, opset 23 (module docs)."""

    # The same function up to float32 rounding, but it runs after emission: a rounding-level change
    # of an activation that a run-time quantizer reads then moves it to the neighbouring code now
    # and then, so ``--verify``'s 1e-4 check on the quantized graph cannot hold (measured: 3e-2 on
    # SmolLM2 W4A8). tests/emit/test_attention.py checks the rewrite on the float export (1e-5).
    PRESERVES_FUNCTION = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        blocks, reasons = [], Counter()
        opset = default_opset(model)
        for node in list(graph):
            if node.domain == "" and node.op_type == "Softmax":
                try:
                    if opset < ATTENTION_OPSET:
                        raise _NoMatch(f"the model's opset {opset} has no Attention (opset {ATTENTION_OPSET})")
                    blocks.append(_match(node, graph))
                except _NoMatch as why:
                    reasons[str(why)] += 1
        shared, before = None, len(graph)
        if blocks:
            first = blocks[0]
            if any((b.rotary.cos, b.rotary.sin) != (first.rotary.cos, first.rotary.sin)
                   or not self._same_mask(b.mask, first.mask) for b in blocks):
                reasons["the blocks do not share one rotary table and one mask"] += len(blocks)
                blocks = []
            else:
                try:
                    shared = _Shared(graph, first.q.producer() or next(iter(graph)), first.rotary, first.mask)
                except _NoMatch as why:
                    reasons[str(why)] += len(blocks)
                    blocks = []
        for i, block in enumerate(blocks):
            _fuse(block, shared, graph, i)
        if blocks:
            RemoveUnusedNodesPass()(model)
            graph.sort()  # the shared values were inserted before the first block
        self.ctx.report["attention"] = {"fused": len(blocks), "nodes_before": before, "nodes_after": len(graph),
                                        "kept": dict(reasons)}  # fmt: skip
        logger.info("attention: %d blocks -> Attention (%d -> %d nodes)%s", len(blocks), before,
                    len(graph), "".join(f"; kept {n}: {r}" for r, n in reasons.items()))  # fmt: skip
        return ir.passes.PassResult(model, modified=bool(blocks))

    @staticmethod
    def _same_mask(a: ir.Node, b: ir.Node) -> bool:
        """Both layers' masks select from one boolean mask (sliced to the key length T, which every
        layer's cache shares)."""
        if a is b:
            return True
        sa, sb = a.inputs[0].producer(), b.inputs[0].producer()
        if sa is None or sb is None or sa.op_type != "Slice" or sb.op_type != "Slice":
            return a.inputs[0] is b.inputs[0]
        return (sa.inputs[0] is sb.inputs[0] and _ints(sa.inputs[1]) == _ints(sb.inputs[1])
                and _ints(sa.inputs[3]) == _ints(sb.inputs[3]))
