"""Tiny synthetic transformer models built with onnx_ir (no torch), for unit tests.

``tiny_decoder`` mimics an exported LLaMA block stack closely enough to exercise every graph
path the compiler handles: int64 ``input_ids`` -> embedding Gather -> [norm -> q/k/v -> multi-head
attention through Reshape/Transpose -> o_proj -> residual -> norm -> gate/up -> SiLU * up ->
down_proj -> residual] x layers -> final norm -> tied lm_head (MatMul with a Transpose of the
embedding table). ``norm_form`` picks the opset-23 fused ``RMSNormalization`` /
``LayerNormalization`` nodes or the decomposed opset-18 chain that optimum exports
(Pow/ReduceMean/Add/Sqrt/Div/Mul, and Sub for LayerNorm). A few hidden channels are scaled up so
activations have outlier channels like real LLMs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = ["TinyConfig", "tiny_decoder"]

FLOAT = ir.DataType.FLOAT


@dataclass(frozen=True)
class TinyConfig:
    vocab: int = 64
    hidden: int = 32
    heads: int = 4
    ffn: int = 48
    layers: int = 2
    norm: str = "rms"  # "rms" | "layer"
    norm_form: str = "fused"  # "fused" (opset 23) | "decomposed" (opset 18)
    outlier_channels: tuple[int, ...] = (3, 17)
    outlier_gain: float = 12.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.norm_form not in ("fused", "decomposed"):
            raise ValueError(f"norm_form must be 'fused' or 'decomposed', got {self.norm_form!r}")
        if self.hidden % self.heads:
            raise ValueError("hidden must be divisible by heads")

    @property
    def opset(self) -> int:
        return 23 if self.norm_form == "fused" else 18


class _Builder:
    def __init__(self, cfg: TinyConfig) -> None:
        self.cfg = cfg
        self.tape = ir.tape.Tape()
        self.rng = np.random.default_rng(cfg.seed)

    def const(self, array: np.ndarray, name: str) -> ir.Value:
        return self.tape.initializer(ir.tensor(np.asarray(array), name=name), name=name)

    def op(self, op_type: str, *inputs: ir.Value, **attrs) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attrs or None)

    def linear(self, x: ir.Value, fan_in: int, fan_out: int, name: str) -> ir.Value:
        w = (self.rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        return self.op("MatMul", x, self.const(w, f"{name}.weight"))

    def norm(self, x: ir.Value, name: str) -> ir.Value:
        cfg, h = self.cfg, self.cfg.hidden
        gamma = self.const(1.0 + 0.1 * self.rng.standard_normal(h).astype(np.float32), f"{name}.weight")
        beta = None
        if cfg.norm == "layer":
            beta = self.const(0.1 * self.rng.standard_normal(h).astype(np.float32), f"{name}.bias")
        eps = 1e-5
        if cfg.norm_form == "fused":
            if cfg.norm == "rms":
                return self.op("RMSNormalization", x, gamma, axis=-1, epsilon=eps)
            return self.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=eps)
        axes = self.const(np.array([-1], np.int64), f"{name}.axes")
        if cfg.norm == "layer":
            mean = self.op("ReduceMean", x, axes, keepdims=1)
            x = self.op("Sub", x, mean)
        two = self.const(np.array(2.0, np.float32), f"{name}.two")
        var = self.op("ReduceMean", self.op("Pow", x, two), axes, keepdims=1)
        eps_v = self.const(np.array(eps, np.float32), f"{name}.eps")
        normed = self.op("Div", x, self.op("Sqrt", self.op("Add", var, eps_v)))
        y = self.op("Mul", gamma, normed)  # optimum writes weight * hidden_states
        return self.op("Add", y, beta) if beta is not None else y

    def attention(self, x: ir.Value, i: int) -> ir.Value:
        cfg = self.cfg
        hd = cfg.hidden // cfg.heads
        split = self.const(np.array([0, 0, cfg.heads, hd], np.int64), f"l{i}.attn.split_shape")
        merge = self.const(np.array([0, 0, cfg.hidden], np.int64), f"l{i}.attn.merge_shape")

        def heads(v: ir.Value) -> ir.Value:  # [B, S, H] -> [B, heads, S, hd]
            return self.op("Transpose", self.op("Reshape", v, split), perm=[0, 2, 1, 3])

        q = heads(self.linear(x, cfg.hidden, cfg.hidden, f"layers.{i}.self_attn.q_proj"))
        k = heads(self.linear(x, cfg.hidden, cfg.hidden, f"layers.{i}.self_attn.k_proj"))
        v = heads(self.linear(x, cfg.hidden, cfg.hidden, f"layers.{i}.self_attn.v_proj"))
        scale = self.const(np.array(1.0 / np.sqrt(hd), np.float32), f"l{i}.attn.scale")
        scores = self.op("Mul", self.op("MatMul", q, self.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
        ctx = self.op("MatMul", self.op("Softmax", scores, axis=-1), v)
        ctx = self.op("Reshape", self.op("Transpose", ctx, perm=[0, 2, 1, 3]), merge)
        return self.linear(ctx, cfg.hidden, cfg.hidden, f"layers.{i}.self_attn.o_proj")

    def mlp(self, x: ir.Value, i: int) -> ir.Value:
        cfg = self.cfg
        gate = self.linear(x, cfg.hidden, cfg.ffn, f"layers.{i}.mlp.gate_proj")
        up = self.linear(x, cfg.hidden, cfg.ffn, f"layers.{i}.mlp.up_proj")
        act = self.op("Mul", self.op("Sigmoid", gate), gate)  # SiLU as exported
        return self.linear(self.op("Mul", act, up), cfg.ffn, cfg.hidden, f"layers.{i}.mlp.down_proj")


def tiny_decoder(cfg: TinyConfig | None = None, **overrides) -> ir.Model:
    """Build the tiny decoder described in the module docstring; returns an ``ir.Model``."""
    cfg = cfg or TinyConfig(**overrides)
    b = _Builder(cfg)
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    table = b.rng.standard_normal((cfg.vocab, cfg.hidden)).astype(np.float32)
    table[:, list(cfg.outlier_channels)] *= cfg.outlier_gain
    embed = b.const(table, "embed_tokens.weight")
    h = b.op("Gather", embed, ids, axis=0)
    for i in range(cfg.layers):
        h = b.op("Add", h, b.attention(b.norm(h, f"layers.{i}.input_layernorm"), i))
        h = b.op("Add", h, b.mlp(b.norm(h, f"layers.{i}.post_attention_layernorm"), i))
    h = b.norm(h, "norm")
    logits = b.op("MatMul", h, b.op("Transpose", embed, perm=[1, 0]))
    logits.name = "logits"
    logits.type = ir.TensorType(FLOAT)
    logits.shape = ir.Shape(["batch", "seq", cfg.vocab])
    graph = ir.Graph(
        [ids],
        [logits],
        nodes=b.tape.nodes,
        initializers=b.tape.initializers,
        opset_imports={"": cfg.opset},
        name=f"tiny_{cfg.norm}_{cfg.norm_form}",
    )
    return ir.Model(graph, ir_version=10 if cfg.opset < 23 else 11, producer_name="lowbit.synthetic")
