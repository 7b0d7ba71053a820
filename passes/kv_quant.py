"""KV quantization: static symmetric Q/DQ on the K and V inputs of every attention, one scale per
head (or per tensor), as the KV rows of RPTQ's W4A4KV experiments quantize the cache.

Assumes the linear-site map (attentions are found as the feeders of o_proj sites) and calibration
windows. Not function-preserving (it quantizes). Guarantees: each K/V input of an attention node
(the fused opset-23 ``Attention`` or the MatMul pair of a decomposed export) reads
``DequantizeLinear(QuantizeLinear(x))`` with INT8 or INT4 codes (standard since opset 21, executed
by ONNX Runtime CPU), scales from the K/V absmax observed on the calibration windows *after* every
earlier pass (smoothing rescales V, so ranges are measured here, not reused from SLAC). Per head:
one scale per index of axis 1 of the 4-D [batch, heads, ...] tensor; with GQA the replicated heads
of one kv head get equal scales, so quantizing after replication equals quantizing the cache.
Other consumers of K/V (the KV-cache ``present`` outputs) keep float values.
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from lowbit.compiler.context import CompileContext
from lowbit.compiler.feeds import make_feed
from lowbit.compiler.ortrun import ort_session
from lowbit.errors import LowbitError
from lowbit.passes.calibrate import _attention_kv
from lowbit.passes.emit_qdq import ensure_opset

__all__ = ["KvQuantPass"]

logger = logging.getLogger(__name__)

_CODES = {"int8": (np.int8, 127.0), "int4": (ml_dtypes.int4, 7.0)}


def _attention_inputs(ctx: CompileContext) -> list[tuple[ir.Node, ir.Value]]:
    """(attention consumer node, K or V value) for every attention feeding an o_proj."""
    pairs, seen = [], set()
    for site in ctx.sites:
        if site.feeder is None or site.feeder.kind != "attention_v":
            continue
        for value in _attention_kv(site.feeder.node):
            consumer = site.feeder.node if value in site.feeder.node.inputs else None
            if consumer is None:  # K of a decomposed attention feeds the QK^T MatMul
                consumer = next((c for c in value.consumers() if c.op_type == "MatMul"), None)
            if consumer is not None and id(value) not in seen:
                seen.add(id(value))
                pairs.append((consumer, value))
    return pairs


class KvQuantPass(ir.passes.InPlacePass):
    """Insert per-head static Q/DQ on attention K/V."""

    def __init__(self, ctx: CompileContext) -> None:
        super().__init__()
        self.ctx = ctx

    def _absmax(self, model: ir.Model, values: list[ir.Value], per_head: bool) -> list[np.ndarray]:
        data = self.ctx.calibration
        if data is None or not data.windows:
            raise LowbitError("kv quantization needs calibration data (--calib-text or a model directory with a tokenizer)")
        for i, v in enumerate(values):
            v.name = v.name or f"lowbit_kv_{i}"
        session = ort_session(model, values)
        names = [v.name for v in values]
        amax: list[np.ndarray | None] = [None] * len(values)
        for ids in tqdm(data.windows, desc="KV ranges", unit="window", leave=False):
            for i, x in enumerate(session.run(names, make_feed(session.get_inputs(), ids))):
                a = np.abs(x)
                a = a.max(axis=tuple(d for d in range(a.ndim) if d != 1)) if per_head and a.ndim == 4 else np.array(a.max())
                amax[i] = a if amax[i] is None else np.maximum(amax[i], a)
        return amax

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        spec = self.ctx.recipe.kv
        pairs = _attention_inputs(self.ctx)
        if not pairs:
            return ir.passes.PassResult(model, modified=False)
        ensure_opset(model, 21)
        dtype, qmax = _CODES[spec.format]
        amax = self._absmax(model, [v for _, v in pairs], spec.granularity == "per_head")
        graph = model.graph
        for (consumer, value), a in zip(pairs, amax):
            scale = np.where(a > 0, a / qmax, 1.0).astype(np.float32)
            base = value.name
            s = ir.Value(name=f"{base}.kv_scale", const_value=ir.tensor(scale, name=f"{base}.kv_scale"),
                         shape=ir.Shape(scale.shape), type=ir.TensorType(ir.DataType.FLOAT))  # fmt: skip
            zt = ir.tensor(np.zeros(scale.shape, dtype), name=f"{base}.kv_zero_point")
            z = ir.Value(name=zt.name, const_value=zt, shape=ir.Shape(zt.shape), type=ir.TensorType(zt.dtype))
            graph.register_initializer(s)
            graph.register_initializer(z)
            attrs = {"axis": 1} if scale.ndim == 1 else {}
            q = ir.node("QuantizeLinear", [value, s, z], attrs, name=f"{base}.kv_q")
            q.outputs[0].name, q.outputs[0].type = f"{base}.kv_quantized", ir.TensorType(zt.dtype)
            dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], attrs, name=f"{base}.kv_dq")
            dq.outputs[0].name, dq.outputs[0].type, dq.outputs[0].shape = f"{base}.kv_dequantized", value.type, value.shape
            graph.insert_before(consumer, [q, dq])
            for i, inp in enumerate(consumer.inputs):
                if inp is value:
                    consumer.replace_input_with(i, dq.outputs[0])
        self.ctx.report["kv"] = {"format": spec.format, "granularity": spec.granularity, "tensors": len(pairs)}
        logger.info("kv: quantized %d K/V tensors to %s (%s)", len(pairs), spec.format, spec.granularity)
        return ir.passes.PassResult(model, modified=True)
