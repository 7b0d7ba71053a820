"""Where attention reads K and V, and in which layout: shared by calibration (which records
per-(head, channel) K/V ranges) and KV quantization (which inserts Q/DQ there). No pass of its own.

Read-only. An attention is found as the feeder of an o_proj site (``attention_v``). Its K/V
inputs and their layouts follow from the operator's definition, not from value names:

- fused ``Attention`` (opset 23): K = input 1, V = input 2; 4-D inputs are
  [batch, heads, seq, head_dim]; 3-D inputs are [batch, seq, heads * head_dim] (heads from the
  ``kv_num_heads`` attribute);
- decomposed attention ``softmax(Q K^T) V``: V is the second input of the PV MatMul,
  [batch, heads, seq, head_dim]; K is the second input of the QK^T MatMul, i.e. K *transposed*,
  [batch, heads, head_dim, seq] (a constant scalar scaling folded into it, as optimum exports,
  changes no layout). 3-D MatMul inputs (heads merged into the batch) have no head axis: their
  channels are the head_dim channels shared by all heads.

A K/V tensor's *channels* are its (head, head_dim) pairs, flattened head-major (index
``h * head_dim + d``): :func:`to_channels` turns an observed tensor into [tokens, channels] rows,
:func:`broadcast_shape` gives the shape of a per-channel scale that broadcasts against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = ["KvInput", "attention_kv", "broadcast_shape", "kv_inputs", "to_channels"]

# ops between softmax(QK^T) and the PV MatMul, and between QK^T and the softmax
_SCORE_OPS = frozenset({"Softmax", "Mul", "Div", "Add", "Cast", "Where"})


@dataclass(frozen=True)
class KvInput:
    consumer: ir.Node  # the node reading the value: Attention or a MatMul
    value: ir.Value
    role: str  # "k" | "v"
    attention: ir.Node  # the node whose output feeds o_proj (Attention or the PV MatMul)
    o_input: ir.Value  # o_proj's input: smoothing folds its channel scales into V

    def channel_axes(self, ndim: int) -> tuple[int, ...]:
        """Axes of one channel (head axis first), for a tensor of rank ``ndim``."""
        transposed_k = self.role == "k" and self.consumer.op_type == "MatMul"
        channel = ndim - 2 if transposed_k else ndim - 1
        if ndim == 4:
            return (1, channel)
        if ndim == 3 or ndim == 2:
            return (channel,)
        raise ValueError(f"K/V of rank {ndim} at {self.consumer.name}")

    def heads(self, shape: tuple[int, ...]) -> int:
        """Number of heads the channels of a K/V tensor of ``shape`` split into."""
        if len(shape) == 4:
            return int(shape[1])
        if len(shape) == 3 and self.consumer.op_type == "Attention":
            return self.consumer.attributes.get_int("kv_num_heads", 1)
        return 1  # heads merged into the batch: channels shared by all heads


def _probabilities_source(probs: ir.Value) -> ir.Node | None:
    """Walk from the PV MatMul's first input back to the QK^T MatMul."""
    node = probs.producer()
    for _ in range(12):
        if node is None or node.op_type == "MatMul":
            return node
        if node.op_type not in _SCORE_OPS:
            return None
        # Where(IsNaN(p), 0, p) guards keep the probabilities in their last input
        data = node.inputs[2] if node.op_type == "Where" else node.inputs[0]
        node = data.producer() if data is not None else None
    return None


def attention_kv(node: ir.Node) -> list[ir.Value]:
    """[K, V] read by an attention (K missing if a decomposed score path is not recognised)."""
    if node.op_type == "Attention":
        return [node.inputs[1], node.inputs[2]]
    qk = _probabilities_source(node.inputs[0])
    return [node.inputs[1]] + ([qk.inputs[1]] if qk is not None else [])


def kv_inputs(sites) -> list[KvInput]:
    """Every K/V input of every attention feeding an o_proj site, each value once."""
    found: list[KvInput] = []
    seen: set[int] = set()
    for site in sites:
        feeder = site.feeder
        if feeder is None or feeder.kind != "attention_v" or feeder.node is None:
            continue
        node = feeder.node
        if node.op_type == "Attention":
            pairs = [(node, node.inputs[1], "k"), (node, node.inputs[2], "v")]
        else:
            pairs = [(node, node.inputs[1], "v")]
            qk = _probabilities_source(node.inputs[0])
            if qk is not None:
                pairs.append((qk, qk.inputs[1], "k"))
        for consumer, value, role in pairs:
            if value is not None and id(value) not in seen:
                seen.add(id(value))
                found.append(KvInput(consumer, value, role, node, site.input))
    return found


def to_channels(x: np.ndarray, kv: KvInput) -> np.ndarray:
    """[tokens, channels] rows of an observed K/V tensor, channels flattened head-major."""
    axes = kv.channel_axes(x.ndim)
    rest = [a for a in range(x.ndim) if a not in axes]
    y = np.transpose(x, rest + list(axes))
    return y.reshape(-1, int(np.prod([x.shape[a] for a in axes])))


def broadcast_shape(kv: KvInput, shape: tuple[int, ...], channels: int) -> tuple[int, ...]:
    """Shape of a per-channel array of ``channels`` values (head-major) that broadcasts against a
    K/V tensor of ``shape`` (the channel axes keep their length, every other axis is 1)."""
    axes = kv.channel_axes(len(shape))
    out = [1] * len(shape)
    if len(axes) == 2:
        heads = shape[axes[0]]
        out[axes[0]], out[axes[1]] = heads, channels // heads
    else:
        out[axes[0]] = channels
    return tuple(out)
