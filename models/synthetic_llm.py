"""Real-shaped synthetic decoders written straight to external data, for scale tests and benches.

``write_decoder(shape, out_dir)`` builds the float32-compute ONNX graph that optimum exports for
a Llama / Qwen2 decoder without KV cache (opset 18) and writes ``out_dir`` as a model directory
lowbit, ONNX Runtime and optimum load like an export:

- ``model.onnx`` + ``model.onnx.data``: every weight is an initializer stored in the one data
  file (offsets aligned to :data:`ALIGNMENT`); everything else (shape constants, eps, rotary
  frequencies) is a ``Constant`` node, as the exporter writes it;
- ``config.json``: a ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` config of the shape (lowbit reads
  the directory as a causal LM because the graph outputs ``logits``);
- SmolLM2's tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``):
  its ids are < 49152 <= every shape's vocabulary, so calibration text tokenizes to valid ids.

Graph (``with_past=False``): ``input_ids``, ``attention_mask`` [batch, seq] int64 -> embedding Gather -> per layer
[decomposed RMSNorm (Cast, Pow, ReduceMean, Add eps, Sqrt, Div(1, .), Mul, Cast, Mul(weight, .))
-> q/k/v MatMul (+ bias Add for Qwen2) -> rotary (cos/sin of mask-cumsum positions, rotate_half by
Slice/Neg/Concat) -> GQA repeat_kv (Unsqueeze/Expand/Reshape) -> q, k^T scaled by head_dim^-1/4
-> + causal/padding mask -> Softmax -> o_proj -> residual; RMSNorm -> gate/up -> SiLU(gate) * up
-> down_proj -> residual] -> final norm -> lm_head (``MatMul`` with ``Transpose`` of the embedding
when tied) -> ``logits`` [batch, seq, vocab]. Node names follow optimum (``/model/layers.0/
self_attn/q_proj/MatMul``), initializers HF (``model.layers.0.self_attn.q_proj.weight``), but
linear weights are stored ``[in, out]`` as the export stores them. ``dtype="float16"``: every
weight is stored float16 and read through ``Cast(to=FLOAT)`` ("float16 storage, float32
compute", the form :mod:`lowbit.core.float_types` folds); compute stays float32.
``with_past=True`` writes optimum's decoder-with-past signature instead: ``position_ids``
[batch, seq] and ``past_key_values.{i}.key / value`` [batch, kv_heads, past, head_dim] inputs
(``attention_mask`` covers past and new tokens), each layer's rotated K and its V concatenated to
the cache before the head repeat and written as ``present.{i}.key / value``; rotary angles from
``position_ids``, the mask causal at offset ``past``. The same weights, so the same logits.

Weights: normal / sqrt(fan_in) linears (the embedding too: tied logits of unit scale), RMSNorm
weights 1 + N(0, 0.1^2), biases N(0, 0.1^2). Three residual channels
(:attr:`DecoderShape.outlier_channels`) get ``outlier_gain`` times larger weights in every
down_proj output, so from layer 1 on they are outliers of every norm and linear input, as the
massive activations of real LLMs are; the final norm weighs them 1/``outlier_gain`` (the logits
do not hang on three channels). Each tensor has its own generator seeded by ``(seed, name)``: a
``layers=N`` model is the first N layers of the full one. Not modelled: Llama-3.x's rope scaling
(config.json says ``rope_scaling: null``, as the graph computes), sliding windows, the
statistics of trained weights.

Guarantees: at most one block of :data:`_CHUNK_ELEMENTS` weights is in memory at a time (peak RSS
is independent of the model size); the directory appears complete or not at all
(:func:`lowbit.files.fsutil.atomic_path`) and an existing non-empty path is never replaced;
the same arguments write byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx_ir as ir

from lowbit.errors import LowbitError

__all__ = ["ALIGNMENT", "DecoderShape", "SHAPES", "TOKENIZER_FILES", "add_arguments", "run", "smollm2_tokenizer_dir",
           "write_decoder"]

logger = logging.getLogger(__name__)

ALIGNMENT = 4096  # page-aligned offsets: ONNX Runtime memory-maps such external tensors
OPSET = 18  # optimum's decoder export opset (decomposed norms, no fused attention)
IR_VERSION = 8  # the IR version of opset 18
DATA_FILE = "model.onnx.data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_VOCAB = 49152  # SmolLM2's vocabulary: every shape's vocab must hold its ids
_CHUNK_ELEMENTS = 1 << 24  # weights generated and written 16 M elements (64 MB float32) at a time
_NORM_STD = 0.1
_BIAS_STD = 0.1
_MASKED = float(np.finfo(np.float32).min)  # additive mask value transformers uses (no -inf NaNs)
_DTYPES = {"float32": (np.float32, ir.DataType.FLOAT), "float16": (np.float16, ir.DataType.FLOAT16)}
_FAMILIES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}


@dataclass(frozen=True)
class DecoderShape:
    """A decoder's dimensions and the family facts the graph and config.json depend on."""

    name: str
    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads (GQA: heads share each kv head in groups)
    ffn: int  # intermediate_size
    vocab: int  # vocab_size (>= TOKENIZER_VOCAB)
    family: str = "llama"  # "llama" | "qwen2": the architecture config.json names
    tied: bool = True  # tie_word_embeddings: lm_head is the transposed embedding table
    qkv_bias: bool = False  # q/k/v projections have biases (Qwen2)
    rope_theta: float = 500000.0
    eps: float = 1e-5  # rms_norm_eps
    max_positions: int = 131072  # max_position_embeddings (config only)
    outlier_gain: float = 12.0  # scale of the outlier residual channels

    def __post_init__(self) -> None:
        dims = {"hidden": self.hidden, "layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads,
                "ffn": self.ffn, "vocab": self.vocab}  # fmt: skip
        bad = [f"{k}={v}" for k, v in dims.items() if not isinstance(v, int) or v < 1]
        if bad:
            raise LowbitError(f"shape {self.name}: dimensions must be positive integers ({', '.join(bad)})")
        if self.hidden % self.heads or self.heads % self.kv_heads or self.head_dim % 2:
            raise LowbitError(f"shape {self.name}: need hidden % heads == 0, heads % kv_heads == 0 and an even "
                              f"head_dim (hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads})")
        if self.vocab < TOKENIZER_VOCAB:
            raise LowbitError(f"shape {self.name}: vocab {self.vocab} < {TOKENIZER_VOCAB}, the ids of the SmolLM2 "
                              "tokenizer written beside the model")  # fmt: skip
        if self.family not in _FAMILIES:
            raise LowbitError(f"shape {self.name}: family must be one of {', '.join(_FAMILIES)}, got {self.family!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def outlier_channels(self) -> tuple[int, ...]:
        """Three residual channels spread over the hidden size (distinct for hidden >= 8)."""
        h = self.hidden
        return tuple(sorted({h // 7, h // 3 + 1, (2 * h) // 3 + 2}))

    def parameters(self) -> int:
        per_layer = (2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * self.head_dim
                     + 3 * self.hidden * self.ffn + 2 * self.hidden)  # fmt: skip
        bias = (self.hidden + 2 * self.kv_heads * self.head_dim) if self.qkv_bias else 0
        head = 0 if self.tied else self.hidden * self.vocab
        return self.vocab * self.hidden + self.layers * (per_layer + bias) + self.hidden + head


_LLAMA3 = dict(vocab=128256, rope_theta=500000.0, eps=1e-5)
_QWEN25 = dict(vocab=151936, family="qwen2", qkv_bias=True, rope_theta=1000000.0, eps=1e-6, max_positions=32768)
SHAPES: dict[str, DecoderShape] = {s.name: s for s in (
    DecoderShape("tiny", 64, 2, 4, 2, 96, vocab=TOKENIZER_VOCAB, rope_theta=10000.0, max_positions=2048),
    DecoderShape("smollm2-135m", 576, 30, 9, 3, 1536, vocab=49152, rope_theta=100000.0, max_positions=8192),
    DecoderShape("llama-3.2-1b", 2048, 16, 32, 8, 8192, **_LLAMA3),
    DecoderShape("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, **_QWEN25),
    DecoderShape("llama-3.2-3b", 3072, 28, 24, 8, 8192, **_LLAMA3),
    DecoderShape("qwen2.5-3b", 2048, 36, 16, 2, 11008, **_QWEN25),
    DecoderShape("llama-3-8b", 4096, 32, 32, 8, 14336, tied=False, max_positions=8192, **_LLAMA3),
)}  # fmt: skip


# -- weights: generated block by block straight into the data file ---------------------------------


@dataclass(frozen=True)
class _Weight:
    """A weight tensor's recipe: mean + std * N(0, 1), ``gain`` on some last-axis channels."""

    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0
    gain_channels: tuple[int, ...] = ()
    gain: float = 1.0


class _DataFile:
    """The external data file, appended one aligned tensor at a time."""

    def __init__(self, directory: Path, dtype: str, seed: int) -> None:
        self.directory = directory
        self.np_dtype, self.ir_dtype = _DTYPES[dtype]
        self.seed = seed
        self._file: BinaryIO = open(directory / DATA_FILE, "wb")  # noqa: SIM115 - closed on __exit__

    def __enter__(self) -> _DataFile:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def write(self, w: _Weight) -> ir.ExternalTensor:
        f = self._file
        f.write(b"\0" * (-f.tell() % ALIGNMENT))
        offset = f.tell()
        # one generator per tensor: values do not depend on which other tensors were written
        rng = np.random.default_rng([self.seed, zlib.crc32(w.name.encode())])
        cols = w.shape[-1]
        rows = int(np.prod(w.shape[:-1], dtype=np.int64))
        step = max(1, _CHUNK_ELEMENTS // cols)
        for start in range(0, rows, step):
            block = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
            block *= np.float32(w.std)
            if w.mean:
                block += np.float32(w.mean)
            if w.gain_channels:
                block[:, list(w.gain_channels)] *= np.float32(w.gain)
            f.write(memoryview(np.ascontiguousarray(block.astype(self.np_dtype, copy=False))))
        return ir.ExternalTensor(DATA_FILE, offset, f.tell() - offset, self.ir_dtype, shape=ir.Shape(w.shape),
                                 name=w.name, base_dir=self.directory)  # fmt: skip


# -- graph ------------------------------------------------------------------------------------------


class _Builder:
    """Nodes named as optimum names them (``/model/layers.0/self_attn/Mul_1``), weights external."""

    def __init__(self, shape: DecoderShape, data: _DataFile) -> None:
        self.shape, self.data = shape, data
        self.tape = ir.tape.Tape()
        self._names: dict[str, int] = {}

    def _node_name(self, scope: str, op_type: str) -> str:
        base = f"{scope}/{op_type}"
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def op(self, scope: str, op_type: str, *inputs: ir.Value | None, **attrs) -> ir.Value:
        name = self._node_name(scope, op_type)
        out = self.tape.op(op_type, list(inputs), attrs or None, name=name)
        out.name = f"{name}_output_0"
        return out

    def const(self, scope: str, value) -> ir.Value:
        return self.op(scope, "Constant", value=ir.tensor(np.asarray(value)))

    def ints(self, scope: str, *values: int) -> ir.Value:
        return self.const(scope, np.array(values, np.int64))

    def weight(self, scope: str, w: _Weight) -> ir.Value:
        value = self.tape.initializer(self.data.write(w), name=w.name)
        if self.data.ir_dtype == ir.DataType.FLOAT:
            return value
        return self.op(scope, "Cast", value, to=ir.DataType.FLOAT)  # float16 storage, float32 compute

    def linear(self, scope: str, x: ir.Value, name: str, fan_in: int, fan_out: int, *, bias: bool = False,
               gain_channels: tuple[int, ...] = ()) -> ir.Value:  # fmt: skip
        s = self.shape
        w = _Weight(f"{name}.weight", (fan_in, fan_out), fan_in**-0.5, gain_channels=gain_channels, gain=s.outlier_gain)
        y = self.op(scope, "MatMul", x, self.weight(scope, w))
        if bias:  # nn.Linear with bias exports as Add(bias, MatMul(x, W))
            y = self.op(scope, "Add", self.weight(scope, _Weight(f"{name}.bias", (fan_out,), _BIAS_STD)), y)
        return y

    def rms_norm(self, x: ir.Value, name: str, scope: str, *, damp_outliers: bool = False) -> ir.Value:
        """transformers' LlamaRMSNorm as exported: the no-op float32 Casts included.
        ``damp_outliers``: weight 1/outlier_gain on the outlier channels (real final norms
        shrink the massive channels: the logits then depend on every channel, not on three)."""
        s = self.shape
        x = self.op(scope, "Cast", x, to=ir.DataType.FLOAT)
        ms = self.op(scope, "ReduceMean", self.op(scope, "Pow", x, self.const(scope, np.float32(2.0))),
                     self.ints(scope, -1), keepdims=1)  # fmt: skip
        rms = self.op(scope, "Sqrt", self.op(scope, "Add", ms, self.const(scope, np.float32(s.eps))))
        normed = self.op(scope, "Mul", x, self.op(scope, "Div", self.const(scope, np.float32(1.0)), rms))
        normed = self.op(scope, "Cast", normed, to=ir.DataType.FLOAT)
        gamma = _Weight(f"{name}.weight", (s.hidden,), _NORM_STD, mean=1.0,
                        gain_channels=s.outlier_channels if damp_outliers else (), gain=1.0 / s.outlier_gain)
        gamma = self.weight(scope, gamma)
        return self.op(scope, "Mul", gamma, normed)


def _positions(b: _Builder, mask: ir.Value) -> ir.Value:
    """Position ids as optimum's ORTModel derives them: cumsum(mask) - 1, 1 where padded; float."""
    sc = "/model"
    pos = b.op(sc, "Sub", b.op(sc, "CumSum", mask, b.const(sc, np.int64(1))), b.const(sc, np.int64(1)))
    padded = b.op(sc, "Equal", mask, b.const(sc, np.int64(0)))
    pos = b.op(sc, "Where", padded, b.const(sc, np.int64(1)), pos)
    return b.op(sc, "Cast", pos, to=ir.DataType.FLOAT)


def _rotary(b: _Builder, positions: ir.Value) -> tuple[ir.Value, ir.Value]:
    """cos, sin [batch, 1, seq, head_dim] of positions * inv_freq, halves repeated (HF layout)."""
    sc, hd = "/model/rotary_emb", b.shape.head_dim
    inv_freq = 1.0 / (b.shape.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    freqs = b.op(sc, "Mul", b.op(sc, "Unsqueeze", positions, b.ints(sc, 2)), b.const(sc, inv_freq.astype(np.float32)))
    emb = b.op(sc, "Concat", freqs, freqs, axis=-1)
    return tuple(b.op(sc, "Unsqueeze", b.op(sc, fn, emb), b.ints(sc, 1)) for fn in ("Cos", "Sin"))


def _cached_attention_bias(b: _Builder, ids: ir.Value, mask: ir.Value) -> ir.Value:
    """[batch, 1, seq, total] additive mask of a step after ``total - seq`` cached tokens: 0 where
    key j <= past + query i and j is not padding (``mask`` covers past and new tokens)."""
    sc = "/model"
    seq = b.op(sc, "Gather", b.op(sc, "Shape", ids), b.const(sc, np.int64(1)), axis=0)
    total = b.op(sc, "Gather", b.op(sc, "Shape", mask), b.const(sc, np.int64(1)), axis=0)
    past = b.op(sc, "Sub", total, seq)
    queries = b.op(sc, "Range", past, total, b.const(sc, np.int64(1)))
    keys = b.op(sc, "Range", b.const(sc, np.int64(0)), total, b.const(sc, np.int64(1)))
    causal = b.op(sc, "LessOrEqual", b.op(sc, "Unsqueeze", keys, b.ints(sc, 0)), b.op(sc, "Unsqueeze", queries, b.ints(sc, 1)))
    kept = b.op(sc, "Cast", b.op(sc, "Unsqueeze", mask, b.ints(sc, 1, 2)), to=ir.DataType.BOOL)
    return b.op(sc, "Where", b.op(sc, "And", causal, kept), b.const(sc, np.float32(0.0)), b.const(sc, np.float32(_MASKED)))


def _attention_bias(b: _Builder, ids: ir.Value, mask: ir.Value) -> ir.Value:
    """[batch, 1, seq, seq] additive mask: 0 where key j <= query i and j is not padding."""
    sc = "/model"
    seq = b.op(sc, "Gather", b.op(sc, "Shape", ids), b.const(sc, np.int64(1)), axis=0)
    r = b.op(sc, "Range", b.const(sc, np.int64(0)), seq, b.const(sc, np.int64(1)))
    causal = b.op(sc, "LessOrEqual", b.op(sc, "Unsqueeze", r, b.ints(sc, 0)), b.op(sc, "Unsqueeze", r, b.ints(sc, 1)))
    keys = b.op(sc, "Cast", b.op(sc, "Unsqueeze", mask, b.ints(sc, 1, 2)), to=ir.DataType.BOOL)
    keep = b.op(sc, "And", causal, keys)
    return b.op(sc, "Where", keep, b.const(sc, np.float32(0.0)), b.const(sc, np.float32(_MASKED)))


def _attention(b: _Builder, x: ir.Value, i: int, cos: ir.Value, sin: ir.Value, bias: ir.Value,
               cache: list[ir.Value] | None = None) -> ir.Value:  # fmt: skip
    """``cache``: [past_key, past_value] graph inputs; the layer then writes its present_key /
    present_value (Concat on the sequence axis, before the head repeat) as graph outputs."""
    s, sc, name = b.shape, f"/model/layers.{i}/self_attn", f"model.layers.{i}.self_attn"
    hd, kv_dim = s.head_dim, s.kv_heads * s.head_dim

    def proj(p: str, out: int, heads: int) -> ir.Value:  # [B, S, out] -> [B, heads, S, hd]
        y = b.linear(f"{sc}/{p}", x, f"{name}.{p}", s.hidden, out, bias=s.qkv_bias)
        return b.op(sc, "Transpose", b.op(sc, "Reshape", y, b.ints(sc, 0, 0, heads, hd)), perm=[0, 2, 1, 3])

    def rope(t: ir.Value) -> ir.Value:  # t * cos + rotate_half(t) * sin
        x1 = b.op(sc, "Slice", t, b.ints(sc, 0), b.ints(sc, hd // 2), b.ints(sc, 3))
        x2 = b.op(sc, "Slice", t, b.ints(sc, hd // 2), b.ints(sc, np.iinfo(np.int64).max), b.ints(sc, 3))
        rotated = b.op(sc, "Concat", b.op(sc, "Neg", x2), x1, axis=-1)
        return b.op(sc, "Add", b.op(sc, "Mul", t, cos), b.op(sc, "Mul", rotated, sin))

    def repeat_kv(t: ir.Value) -> ir.Value:  # transformers' repeat_kv: [B, kv, S, hd] -> [B, heads, S, hd]
        n_rep = s.heads // s.kv_heads
        if n_rep == 1:
            return t
        t = b.op(sc, "Expand", b.op(sc, "Unsqueeze", t, b.ints(sc, 2)), b.ints(sc, 1, 1, n_rep, 1, 1))
        return b.op(sc, "Reshape", t, b.ints(sc, 0, s.heads, -1, hd))

    q = rope(proj("q_proj", s.hidden, s.heads))
    k, v = rope(proj("k_proj", kv_dim, s.kv_heads)), proj("v_proj", kv_dim, s.kv_heads)
    if cache is not None:
        k, v = (b.op(sc, "Concat", past, new, axis=2) for past, new in zip(cache, (k, v)))
        for value, kind in ((k, "key"), (v, "value")):
            value.name = f"present.{i}.{kind}"
            value.type = ir.TensorType(ir.DataType.FLOAT)
            value.shape = ir.Shape(["batch_size", s.kv_heads, "total_sequence_length", hd])
        cache[:] = [k, v]
    k, v = repeat_kv(k), repeat_kv(v)
    scale = b.const(sc, np.float32(hd**-0.25))  # SDPA's decomposition scales q and k^T by sqrt(1/sqrt(hd))
    kt = b.op(sc, "Mul", b.op(sc, "Transpose", k, perm=[0, 1, 3, 2]), scale)
    scores = b.op(sc, "Add", b.op(sc, "MatMul", b.op(sc, "Mul", q, scale), kt), bias)
    ctx = b.op(sc, "MatMul", b.op(sc, "Softmax", scores, axis=-1), v)
    ctx = b.op(sc, "Reshape", b.op(sc, "Transpose", ctx, perm=[0, 2, 1, 3]), b.ints(sc, 0, 0, -1))
    return b.linear(f"{sc}/o_proj", ctx, f"{name}.o_proj", s.hidden, s.hidden)


def _mlp(b: _Builder, x: ir.Value, i: int) -> ir.Value:
    s, sc, name = b.shape, f"/model/layers.{i}/mlp", f"model.layers.{i}.mlp"
    gate = b.linear(f"{sc}/gate_proj", x, f"{name}.gate_proj", s.hidden, s.ffn)
    up = b.linear(f"{sc}/up_proj", x, f"{name}.up_proj", s.hidden, s.ffn)
    act = b.op(f"{sc}/act_fn", "Mul", gate, b.op(f"{sc}/act_fn", "Sigmoid", gate))  # SiLU as exported
    # outlier residual channels written by every layer: they stay outliers at any depth
    return b.linear(f"{sc}/down_proj", b.op(sc, "Mul", act, up), f"{name}.down_proj", s.ffn, s.hidden,
                    gain_channels=s.outlier_channels)  # fmt: skip


def _build_graph(b: _Builder, step: Callable[[str], object], with_past: bool = False) -> ir.Graph:
    s = b.shape
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch_size", "sequence_length"]))
    mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64),
                    shape=ir.Shape(["batch_size", "total_sequence_length" if with_past else "sequence_length"]))  # fmt: skip
    inputs, caches = [ids, mask], []
    # std hidden^-1/2: tied logits of unit scale, like the untied head's
    embed = b.weight("/model/embed_tokens", _Weight("model.embed_tokens.weight", (s.vocab, s.hidden), s.hidden**-0.5))
    h = b.op("/model/embed_tokens", "Gather", embed, ids, axis=0)
    if with_past:  # optimum's KV-cache signature: explicit position ids, past_key_values.* -> present.*
        positions = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch_size", "sequence_length"]))
        inputs.append(positions)
        for i in range(s.layers):
            caches.append([ir.Value(name=f"past_key_values.{i}.{kind}", type=ir.TensorType(ir.DataType.FLOAT),
                                    shape=ir.Shape(["batch_size", s.kv_heads, "past_sequence_length", s.head_dim]))
                           for kind in ("key", "value")])  # fmt: skip
            inputs += caches[-1]
        cos, sin = _rotary(b, b.op("/model", "Cast", positions, to=ir.DataType.FLOAT))
        bias = _cached_attention_bias(b, ids, mask)
    else:
        cos, sin = _rotary(b, _positions(b, mask))
        bias = _attention_bias(b, ids, mask)
    step("embedding")
    for i in range(s.layers):
        x = b.rms_norm(h, f"model.layers.{i}.input_layernorm", f"/model/layers.{i}/input_layernorm")
        h = b.op(f"/model/layers.{i}", "Add", h, _attention(b, x, i, cos, sin, bias, caches[i] if with_past else None))
        x = b.rms_norm(h, f"model.layers.{i}.post_attention_layernorm", f"/model/layers.{i}/post_attention_layernorm")
        h = b.op(f"/model/layers.{i}", "Add", h, _mlp(b, x, i))
        step(f"layer {i}")
    h = b.rms_norm(h, "model.norm", "/model/norm", damp_outliers=True)
    if s.tied:
        logits = b.op("/lm_head", "MatMul", h, b.op("/lm_head", "Transpose", embed, perm=[1, 0]))
    else:
        logits = b.linear("/lm_head", h, "lm_head", s.hidden, s.vocab)
    step("lm_head")
    logits.name = "logits"
    logits.type = ir.TensorType(ir.DataType.FLOAT)
    logits.shape = ir.Shape(["batch_size", "sequence_length", s.vocab])
    return ir.Graph(inputs, [logits, *(v for kv in caches for v in kv)], nodes=b.tape.nodes, initializers=b.tape.initializers,
                    opset_imports={"": OPSET}, name=f"synthetic_{s.name}")  # fmt: skip


# -- directory: model, config, tokenizer -------------------------------------------------------------


def _config(s: DecoderShape, dtype: str, seed: int) -> dict:
    architecture, model_type = _FAMILIES[s.family]
    config = {
        "architectures": [architecture], "model_type": model_type,
        "hidden_size": s.hidden, "intermediate_size": s.ffn, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
        "vocab_size": s.vocab, "max_position_embeddings": s.max_positions, "rms_norm_eps": s.eps,
        "rope_theta": s.rope_theta, "rope_scaling": None, "tie_word_embeddings": s.tied,
        "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,  # SmolLM2's tokenizer (written beside)
        "torch_dtype": dtype, "use_cache": False,
    }  # fmt: skip
    if s.family == "llama":
        config.update(attention_bias=s.qkv_bias, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=s.layers)
    config["lowbit_synthetic"] = {"shape": s.name, "dtype": dtype, "seed": seed, "module": __name__,
                                  "tokenizer": "SmolLM2-135M (ids < 49152)"}  # fmt: skip
    return config


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer files, extracted once from the shipped GGUF (lowbit's own loader) into
    ``$LOWBIT_CACHE/tokenizers``; later calls only read the cache (no transformers import)."""
    from importlib import metadata

    from lowbit.files.fsutil import atomic_path
    from lowbit.files.paths import cache_root
    from lowbit.models.registry import load_tokenizer, resolve_model

    src = resolve_model("smollm2-135m")
    stat = src.path.stat()
    key = f"{stat.st_size}-{int(stat.st_mtime)}-{metadata.version('transformers')}"
    cached = cache_root() / "tokenizers" / f"smollm2-135m-{zlib.crc32(key.encode()):08x}"
    if all((cached / f).is_file() for f in TOKENIZER_FILES):
        return cached
    import transformers

    cached.parent.mkdir(parents=True, exist_ok=True)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its "legacy behaviour" notice for GGUF tokenizers
    try:
        with atomic_path(cached, is_dir=True) as tmp:
            load_tokenizer(src).save_pretrained(tmp)
            for f in tmp.iterdir():  # drop the rest (tokenizer.model is a 98 MB copy of the GGUF)
                if f.name not in TOKENIZER_FILES:
                    f.unlink()
    finally:
        transformers.logging.set_verbosity(verbosity)
    return cached


def _resolve_shape(shape: str | DecoderShape, layers: int | None) -> DecoderShape:
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise LowbitError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        shape = SHAPES[shape]
    if layers is not None:
        if not isinstance(layers, int) or layers < 1:
            raise LowbitError(f"layers must be a positive integer, got {layers!r}")
        shape = replace(shape, layers=layers)
    return shape


def _check_new_dir(out: Path) -> None:
    """Never replace anything but an empty directory (and never through a link)."""
    if os.path.islink(out):
        raise LowbitError(f"{out} is a symbolic link: choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LowbitError(f"{out} already exists and is not an empty directory: refusing to overwrite it "
                          "(choose a new directory)")  # fmt: skip


def write_decoder(shape: str | DecoderShape, out_dir: str | os.PathLike, *, dtype: str = "float32", seed: int = 0,
                  layers: int | None = None, progress: bool = True, with_past: bool = False) -> Path:  # fmt: skip
    """Write the synthetic decoder ``shape`` (a :data:`SHAPES` name or a DecoderShape; ``layers``
    overrides its depth) into the new directory ``out_dir`` (see the module docstring); returns it.
    ``with_past``: optimum's KV-cache signature (``position_ids`` and ``past_key_values.{i}.key /
    value`` inputs, ``present.{i}.*`` outputs), what ``ORTModelForCausalLM`` decodes with."""
    from tqdm import tqdm

    from lowbit.files.fsutil import atomic_path, normalized

    s = _resolve_shape(shape, layers)
    if dtype not in _DTYPES:
        raise LowbitError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if not isinstance(seed, int) or seed < 0:
        raise LowbitError(f"seed must be a non-negative integer, got {seed!r}")
    out = normalized(out_dir)
    _check_new_dir(out)
    tokenizer = smollm2_tokenizer_dir()  # before the long write: its failure costs nothing
    start = time.perf_counter()
    with atomic_path(out, is_dir=True) as tmp:
        bar = tqdm(total=s.layers + 2, desc=f"synth {s.name}", unit="block", disable=None if progress else True)
        with bar, _DataFile(tmp, dtype, seed) as data:
            graph = _build_graph(_Builder(s, data), lambda what: (bar.set_postfix_str(what), bar.update()), with_past)
        model = ir.Model(graph, ir_version=IR_VERSION, producer_name="lowbit.synthetic_llm")
        ir.save(model, tmp / "model.onnx")  # external tensors stay references to DATA_FILE
        config = _config(s, dtype, seed)
        config["use_cache"] = with_past
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer / name, tmp / name)
    logger.info("wrote %s (%d parameters, %s) in %.1f s", out, s.parameters(), dtype, time.perf_counter() - start)
    return out


# -- `lowbit-bench synth` ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shape", metavar="SHAPE", help=f"decoder shape: {', '.join(SHAPES)}")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="new directory to write (refused if it exists non-empty)")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float32",
                        help="weight storage (float16: stored float16, Cast to float32 before use)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--with-past", action="store_true", help="KV-cache inputs and outputs (optimum's decoder-with-past signature)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = write_decoder(args.shape, args.out_dir, dtype=args.dtype, seed=args.seed, layers=args.layers,
                        with_past=args.with_past)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {args.shape} ({args.dtype}), {size / 2**30:.2f} GiB in {time.perf_counter() - start:.1f} s")
    return 0
