"""Where a per-channel transform of a linear-site input can be folded exactly, and the edits.

Shared by the smooth (scales) and reorder (permutations) passes; no pass of its own. For one
input group (sites sharing an input x), :func:`fold_target` finds the producer of x that can
absorb ``x / s`` or ``x[..., perm]``:

- ``norm``: x is a norm's output; the norm's gamma (and LayerNorm's beta) absorb the transform;
- ``gated_linear``: x = act(gate) * up; up_proj's output columns absorb a scale, gate_proj's and
  up_proj's columns together absorb a permutation (act is elementwise); a fused gate_up (Phi-3,
  one weight whose output is split in halves) the same, on the halves of its columns;
- ``activated_linear``: x = act(fc1(x0)) with act positively homogeneous (ReLU, LeakyReLU: OPT,
  T5): fc1's output columns absorb a positive scale or a permutation, as up_proj's do;
- ``attention_v``: x is attention output; v_proj's output columns absorb a scale. With GQA each
  v channel is replicated to ``g`` query heads, so a scale must be one value per *v* channel:
  ``channel_map[c]`` is the v channel that o_proj input channel c reads. A permutation must keep
  every channel inside its head (attention mixes tokens, never channels, within a head) and be the
  same in every query head that shares a v head; v_proj's output columns then absorb it.

A bias added to the producer's (or gate's) output channels -- Qwen's v_proj, Gemm's C -- takes
the same scale or permutation as the producer's columns
(:func:`lowbit.core.linear_sites.output_bias`); a fused QKV producer (Phi-3's qkv_proj) takes
them on its V columns only; a Reshape that keeps the channel axis between a norm and its sites
(GPT-2's Conv1D) is walked through.

It refuses (returns a reason string) whenever folding would change anything but x: the group
input has consumers outside the group (``Shape``/``Size`` consumers are allowed: a per-channel
scale or permutation leaves the shape they read unchanged), a weight or gamma initializer is shared (tied lm_head),
a producer output feeds anything else, v_proj's output is also a KV-cache output (the
``present`` tensors of a with-past export must keep their meaning). Weights are handled in (K, N) orientation -- K the
reduction (input-channel) axis -- whatever the stored layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.core.float_types import read_float32
from lowbit.core.linear_sites import ELEMENTWISE_OPS, LinearSite, output_bias, private_initializer
from lowbit.core.weight_io import transformed_stored

__all__ = ["SHAPE_ONLY_OPS", "FoldTarget", "fold_target", "materialize_deferred", "producer_permutation", "set_weight_kn",
           "weight_kn"]


@dataclass
class FoldTarget:
    kind: str  # "norm" | "gated_linear" | "activated_linear" | "attention_v"
    group: list[LinearSite]
    norm: ir.Node | None = None
    producer: LinearSite | None = None  # v_proj or up_proj
    gate: LinearSite | None = None  # gate_proj (gated_linear only)
    channel_map: np.ndarray | None = None  # consumer channel -> producer channel
    head_dim: int | None = None  # attention_v: channels per head (None: head layout unknown)
    producer_bias: ir.Value | None = None  # added to the producer's output channels (Qwen's v_proj)
    gate_bias: ir.Value | None = None  # added to gate_proj's output channels
    # a fused producer (Phi-3's gate_up_proj, qkv_proj): its columns that are up (or V), and gate
    producer_columns: slice | None = None
    gate_columns: slice | None = None

    @property
    def channels(self) -> int:
        return self.group[0].in_features

    @property
    def input(self) -> ir.Value:
        return self.group[0].input

    # --- scales: x -> x / s ------------------------------------------------------------------
    def apply_scale(self, s: np.ndarray) -> None:
        for site in self.group:  # streamed: a vocabulary head gets no whole temporary copy
            _set_const(site.weight, transformed_stored(site, scale=s))
        if self.kind == "norm":
            for i in (1, 2):
                if len(self.norm.inputs) > i and self.norm.inputs[i] is not None:
                    _set_const(self.norm.inputs[i], _const(self.norm.inputs[i]) / s.astype(np.float32))
            return
        sp = producer_scale(self, s)
        set_weight_kn(self.producer, weight_kn(self.producer) / sp[None, :].astype(np.float32))
        if self.producer_bias is not None:
            _set_const(self.producer_bias, _const(self.producer_bias) / sp.astype(np.float32))

    # --- permutations: x -> x[..., perm] -------------------------------------------------------
    def apply_permutation(self, perm: np.ndarray) -> None:
        """x -> x[..., perm]. A norm target needs the caller to reorder the norm *input* too (a
        Gather), which this method does not insert; an attention_v permutation must be one
        :func:`producer_permutation` accepts."""
        pperm = producer_permutation(self, perm) if self.kind == "attention_v" else perm
        for site in self.group:
            _set_const(site.weight, transformed_stored(site, perm=perm))
        if self.kind == "gated_linear" and self.producer_columns is not None:  # fused gate_up: both halves alike
            pperm = np.arange(self.producer.out_features)
            for cols in (self.producer_columns, self.gate_columns):
                pperm[cols] = cols.start + perm
        if self.kind == "norm":
            for i in (1, 2):
                if len(self.norm.inputs) > i and self.norm.inputs[i] is not None:
                    _set_const(self.norm.inputs[i], _const(self.norm.inputs[i])[perm])
            return
        for site in (self.producer, self.gate) if self.gate is not None else (self.producer,):
            set_weight_kn(site, weight_kn(site)[:, pperm])
        for bias in (self.producer_bias, self.gate_bias):
            if bias is not None:
                _set_const(bias, _const(bias)[..., pperm])


def producer_permutation(target: FoldTarget, perm: np.ndarray) -> np.ndarray:
    """The v_proj output permutation that realises o_proj input permutation ``perm``; raises if
    ``perm`` moves a channel out of its head or differs between query heads sharing a v head."""
    if target.head_dim is None:
        raise ValueError(f"{target.group[0].name}: head layout unknown, its input cannot be permuted")
    c = np.arange(perm.size)
    if np.any(perm // target.head_dim != c // target.head_dim):
        raise ValueError(f"{target.group[0].name}: permutation moves channels across attention heads")
    offset = target.producer_columns.start if target.producer_columns is not None else 0  # a fused QKV's V part
    cmap = offset + target.channel_map
    pperm = np.arange(target.producer.out_features)  # columns outside V (a fused QKV's Q and K) stay
    pperm[cmap] = cmap[perm]  # new consumer channel c reads new v channel cmap[c] = old cmap[perm[c]]
    if np.any(pperm[cmap] != cmap[perm]):
        raise ValueError(f"{target.group[0].name}: permutation differs between query heads sharing a v head")
    return pperm


def producer_scale(target: FoldTarget, s: np.ndarray) -> np.ndarray:
    """Per producer channel scale from a consumer-channel scale constant on replicas."""
    sp = np.ones(target.producer.out_features, np.float64)
    offset = target.producer_columns.start if target.producer_columns is not None else 0  # up / V of a fused producer
    sp[offset + target.channel_map] = s
    return sp


def weight_kn(site: LinearSite) -> np.ndarray:
    w = site.weight.const_value.numpy()
    return w if site.reduction_axis == 0 else w.T


def set_weight_kn(site: LinearSite, w_kn: np.ndarray) -> None:
    w = w_kn if site.reduction_axis == 0 else w_kn.T
    _set_const(site.weight, np.ascontiguousarray(w, dtype=np.float32))


def rewrite_weight_kn(site: LinearSite, fn: Callable[[np.ndarray], np.ndarray], *, defer: bool = False) -> None:
    """W -> fn(W), W in (K, N) orientation (float32 in, any float out; shape kept). ``defer``: not
    computed now -- the weight becomes a lazy float32 constant computing fn(W) from the current
    one at every read, so a large model's model-wide rewrites (rotations) hold no rewritten copy,
    in memory or on disk, before a block reads it; deferred rewrites of one weight compose. Every
    read gives the bytes the eager rewrite gives."""
    if not defer:
        set_weight_kn(site, fn(weight_kn(site)))
        return
    source, name = site.weight.const_value, site.weight.name
    # a partial over the source tensor: the scratch spill sees what a lazy constant still reads
    compute = functools.partial(_rewritten, source, fn, site.reduction_axis, name)
    site.weight.const_value = ir.LazyTensor(compute, dtype=ir.DataType.FLOAT, shape=source.shape, name=name)


def materialize_deferred(sites: list[LinearSite]) -> int:
    """Compute the deferred rewrites of ``sites``' weights once, now, into memory; returns the
    bytes made. A block's passes read each weight several times (smoothing's statistics, sample
    and fold, the reorder, OPTQ) and every read of a deferred weight recomputes its rotations
    (smoothing a 4-layer 8B took 185 s where eager rotations took 44)."""
    made = 0
    for site in sites:
        tensor = site.weight.const_value
        if isinstance(tensor, ir.LazyTensor) and getattr(tensor.raw, "func", None) is _rewritten:
            site.weight.const_value = tensor.raw()
            made += site.weight.const_value.nbytes
    return made


def _rewritten(source: ir.TensorProtocol, fn: Callable[[np.ndarray], np.ndarray], axis: int, name: str) -> ir.Tensor:
    w = read_float32(source)  # external data through a map of its own, closed again
    out = fn(w if axis == 0 else w.T)
    return ir.tensor(np.ascontiguousarray(out if axis == 0 else out.T, dtype=np.float32), name=name)


def _const(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def _set_const(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=value.name)


def _weights_private(sites: list[LinearSite]) -> bool:
    return all(private_initializer(s.weight) for s in sites)


# Consumers that read only a tensor's shape: folding a per-channel transform cannot affect them
# (optimum's with-past exports read the norm output's shape to build the attention reshapes).
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def _channel_preserving_chain(start: ir.Value, end: ir.Value) -> bool:
    """``end`` is ``start`` through Reshape / Identity / Squeeze / Unsqueeze nodes that keep the
    last axis (the channels) whole -- GPT-2's Conv1D flattens [batch, seq, d] to [tokens, d] --
    each the only reader of its input, so a per-channel transform of ``start`` reaches ``end``
    unchanged and nothing else."""
    value = end
    while value is not start:
        node = value.producer()
        if node is None or node.op_type not in _CHANNEL_LAYOUT_OPS or node.domain != "":
            return False
        src = node.inputs[0]
        dims_in, dims_out = (tuple(v.shape) if v.shape is not None else () for v in (src, value))
        if not dims_in or not dims_out or not isinstance(dims_in[-1], int) or dims_in[-1] != dims_out[-1]:
            return False
        if src.is_graph_output() or [n for n in src.consumers() if n.op_type not in SHAPE_ONLY_OPS] != [node]:
            return False
        value = src
    return True


_CHANNEL_LAYOUT_OPS = frozenset({"Reshape", "Identity", "Squeeze", "Unsqueeze"})


def _elementwise_only(value: ir.Value) -> bool:
    """Every consumer of the gate output is elementwise (a column permutation commutes)."""
    return all(c.op_type in ELEMENTWISE_OPS for c in value.consumers())


def _reaches_graph_output(value: ir.Value, depth: int = 8) -> bool:
    """Does ``value`` reach a graph output before any MatMul/Attention (e.g. KV-cache Concat)?"""
    frontier = [value]
    for _ in range(depth):
        if any(v.is_graph_output() for v in frontier):
            return True
        frontier = [o for v in frontier for c in v.consumers() if c.op_type not in ("MatMul", "Attention") for o in c.outputs]
        if not frontier:
            return False
    return False


def _head_dim(attn: ir.Node) -> int | None:
    """Channels per head of the V an attention reads: [B, heads, S, head_dim], or the fused
    Attention's 3-D [B, S, kv_num_heads * head_dim]; None when the layout does not say."""
    v = attn.inputs[2] if attn.op_type == "Attention" else attn.inputs[1]
    dims = tuple(v.shape) if v.shape is not None else ()
    if len(dims) == 4 and isinstance(dims[-1], int):
        return dims[-1]
    heads = attn.attributes.get_int("kv_num_heads", 0) if attn.op_type == "Attention" else 0
    if len(dims) == 3 and isinstance(dims[-1], int) and heads and dims[-1] % heads == 0:
        return dims[-1] // heads
    return None


def _gqa_map(site: LinearSite, p: int, head_dim: int | None) -> np.ndarray | str:
    """o_proj input channel -> V channel (of ``p``)."""
    k = site.in_features
    if k == p:
        return np.arange(k)
    if head_dim is None or k % p or p % head_dim:
        return f"GQA layout unknown (o input {k}, v output {p}, head dim {head_dim})"
    group = k // p
    c = np.arange(k)
    return (c // head_dim // group) * head_dim + c % head_dim


def fold_target(group: list[LinearSite], kinds: tuple[str, ...], *, cache_follows: bool = False) -> FoldTarget | str:
    """The exact folding target of one input group, or why there is none. ``cache_follows``: a
    v_proj whose output is also a KV-cache output is accepted -- for a transform the model's own
    later steps undo (a rotation inside each head: the cache then holds rotated V, which only this
    model reads back), never for one meant to leave the cache's values as they were."""
    site = group[0]
    feeder = site.feeder
    if feeder is None or feeder.kind not in kinds:
        return f"feeder {feeder.describe() if feeder else 'unknown'} not foldable here"
    members = {id(s.node) for s in group}
    readers = {id(n) for n in site.input.consumers() if n.op_type not in SHAPE_ONLY_OPS}
    if readers != members or site.input.is_graph_output():
        return "the input has consumers outside the group"
    if not _weights_private(group):
        return "a weight initializer is shared (e.g. a tied embedding)"
    if feeder.kind == "norm":
        norm = feeder.node
        if norm.outputs[0] is not site.input and not _channel_preserving_chain(norm.outputs[0], site.input):
            return "layout ops between the norm and the sites"
        params = [v for v in norm.inputs[1:3] if v is not None]
        if not all(private_initializer(v) for v in params):
            return "norm gamma/beta are not private initializers"
        return FoldTarget("norm", group, norm=norm)
    producer = feeder.producer_site
    if producer is not None and feeder.producer_columns is not None and feeder.kind == "gated_linear":
        # one gate_up weight (linear_sites: its output read by its two halves only)
        if not _weights_private([producer]):
            return "the producer's weight is shared"
        bias = output_bias(producer)
        if isinstance(bias, str):
            return bias
        return FoldTarget("gated_linear", group, producer=producer, producer_bias=bias, producer_columns=feeder.producer_columns,
                          gate_columns=feeder.gate_columns, channel_map=np.arange(site.in_features))  # fmt: skip
    fused = feeder.producer_columns is not None  # V columns of a fused QKV, read by slices only (linear_sites)
    if producer is None or not _weights_private([producer]) or (len(producer.node.outputs[0].consumers()) != 1 and not fused):
        return "the producer's weight or output is shared"
    bias = output_bias(producer)
    if isinstance(bias, str):
        return bias
    if feeder.kind == "gated_linear":
        siblings = producer.siblings
        if len(siblings) != 1 or not _weights_private(siblings) or not _elementwise_only(siblings[0].node.outputs[0]):
            return "gate/up pair not recognised"
        gate_bias = output_bias(siblings[0])
        if isinstance(gate_bias, str):
            return gate_bias
        return FoldTarget("gated_linear", group, producer=producer, gate=siblings[0], channel_map=np.arange(site.in_features),
                          producer_bias=bias, gate_bias=gate_bias)  # fmt: skip
    if feeder.kind == "activated_linear":
        act = feeder.node
        if list(act.inputs[0].consumers()) != [act] or act.inputs[0].is_graph_output():
            return "the activation's input is read elsewhere"
        if act.outputs[0] is not site.input and not _channel_preserving_chain(act.outputs[0], site.input):
            return "layout ops between the activation and the sites"
        return FoldTarget("activated_linear", group, producer=producer, channel_map=np.arange(site.in_features),
                          producer_bias=bias)  # fmt: skip
    if not cache_follows and _reaches_graph_output(producer.node.outputs[0]):
        return "v_proj output is also a KV-cache output (present.*): scaling it would change the cache"
    head_dim = _head_dim(feeder.node)
    cols = feeder.producer_columns
    mapping = _gqa_map(site, cols.stop - cols.start if fused else producer.out_features, head_dim)
    if isinstance(mapping, str):
        return mapping
    if head_dim is not None and site.in_features % head_dim:
        head_dim = None
    return FoldTarget("attention_v", group, producer=producer, channel_map=mapping, head_dim=head_dim, producer_bias=bias,
                      producer_columns=cols)  # fmt: skip
