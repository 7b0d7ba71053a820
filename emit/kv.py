"""KV quantization: static Q/DQ on the K and V inputs of every attention (the KV rows of RPTQ's
W4A4KV experiments), with one scale per tensor, per head, or per (head, head_dim) channel.

Assumes the linear-site map (attentions are found as the feeders of o_proj sites, layouts in
:mod:`lowbit.core.kv_sites`) and ``activation_stats`` from calibration, whose K/V entries are
per (head, channel) and were kept exact through smoothing (V's channels are rescaled with the
o_proj input's, see ``ActivationStats.links``) -- so this pass runs no model. Not
function-preserving (it quantizes). Guarantees: each K/V input of an attention (the fused
opset-23 ``Attention``, or the QK^T / PV MatMuls of a decomposed export) reads the dequantized
value of a standard ``QuantizeLinear`` with INT8/INT4 codes (UINT8/UINT4 with a zero point when
``kv.symmetric = false``) that ONNX Runtime CPU executes:

- ``per_tensor``: one scale; ``per_head``: one scale per head (per-axis Q/DQ on the head axis);
- ``per_channel``: one scale per head and head_dim channel. K after RoPE has a few large
  channels (KIVI quantizes K per channel); on a 3-D [batch, seq, heads * head_dim] input this is
  a per-axis Q/DQ (axis -1); on 4-D inputs, whose channels span two axes, it is
  ``Mul(DequantizeLinear(QuantizeLinear(x / s, 1)), s)`` with s broadcast ([1, H, 1, D]).

Ranges (``kv.range``): ``absmax`` (the calibrated min/max) or ``percentile``: each channel
clipped at the mean over calibration windows of its ``kv.percentile`` of |x|. int4 absmax over a
few windows is set by rare peaks: with int4 per-channel K/V alone on FP32 SmolLM2-135M (8 x 512
evaluation tokens) ppl was 18.30 with absmax, 17.31 with the per-window 99.9 percentile, 17.58
with a global 99.9 percentile, 17.76 with a per-channel MSE clip search. Coarser granularities
take the max over their channels. With GQA the replicated heads of one kv head get equal
scales, so quantizing after replication equals quantizing the cache.
With ``kv.dynamic_k`` K's static per-channel scales only normalise its channels; each token's
head then gets its own symmetric scale, max |x / s| over head_dim / qmax, computed at run time
(Abs, ReduceMax, Div: standard ops); ``kv.dynamic_v`` does the same for V (V rotated per head by
R2 has no channel outliers left for a static scale to follow, but its token magnitudes vary).
Other consumers of K/V (the ``present.*`` outputs of a with-past export and their shape reads)
keep float values: the cache stays float, attention reads the quantized cache; static Q/DQ is
idempotent, so re-quantizing a past that was already quantized changes nothing.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from lowbit.core.pass_base import LowbitPass
from lowbit.core.statistics import ACTIVATION_STATS
from lowbit.errors import LowbitError
from lowbit.emit.qdq import ensure_opset
from lowbit.core.initializers import SCALE_FLOOR, add_initializer, code_dtype
from lowbit.core.kv_sites import KvInput, broadcast_shape, kv_inputs
from lowbit.formats import integer_codes

__all__ = ["KvQuantPass", "kv_qparams", "kv_range"]

logger = logging.getLogger(__name__)


def _codes(fmt: str) -> tuple[tuple[type, int, int], tuple[type, int]]:
    """((symmetric code dtype, qmin, qmax), (asymmetric code dtype, qmax)) of a kv.format."""
    lo, hi = integer_codes(fmt, signed=True)
    _, umax = integer_codes(fmt, signed=False)
    return (code_dtype(fmt, True), lo, hi), (code_dtype(fmt, False), umax)


def kv_range(channel_stats, spec) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (lo, hi) to quantize: the calibrated min/max, clipped at the averaged
    per-window percentile of |x| with ``kv.range = percentile``."""
    lo, hi = channel_stats.min, channel_stats.max
    if spec.range == "percentile":
        p = channel_stats.percentile
        lo, hi = np.maximum(lo, -p), np.minimum(hi, p)
    return lo, hi


def kv_qparams(lo: np.ndarray, hi: np.ndarray, heads: int, spec) -> tuple[np.ndarray, np.ndarray | None]:
    """(scale, zero point or None) per (head, channel) from calibrated per-channel lo/hi, at the
    recipe's granularity (coarser granularities take the max over their channels)."""
    (_, _, qmax), (_, umax) = _codes(spec.format)
    group = {"per_tensor": lo.size, "per_head": lo.size // heads, "per_channel": 1}[spec.granularity]
    lo_g = np.repeat(lo.reshape(-1, group).min(axis=1), group)
    hi_g = np.repeat(hi.reshape(-1, group).max(axis=1), group)
    if spec.symmetric:
        amax = np.maximum(-lo_g, hi_g)
        return np.where(amax > 0, amax / qmax, 1.0).astype(np.float32), None
    lo_g, hi_g = np.minimum(lo_g, 0.0), np.maximum(hi_g, 0.0)  # zero stays exact
    scale = np.where(hi_g > lo_g, (hi_g - lo_g) / umax, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo_g / scale), 0, umax)
    return scale, zero


def _splice(graph: ir.Graph, kv: KvInput, nodes: list[ir.Node], out: ir.Value) -> None:
    """Insert ``nodes`` before the attention and make it (only it) read ``out`` instead of K/V:
    other consumers (the KV-cache ``present`` outputs) keep the float values."""
    x = kv.value
    out.name, out.type, out.shape = f"{x.name}.kv_dequantized", x.type, x.shape
    graph.insert_before(kv.consumer, nodes)
    for i, inp in enumerate(kv.consumer.inputs):
        if inp is x:
            kv.consumer.replace_input_with(i, out)


class KvQuantPass(LowbitPass):
    """Insert static Q/DQ on attention K/V from the calibrated per-(head, channel) ranges."""

    PRESERVES_FUNCTION = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        spec = self.ctx.recipe.kv
        inputs = kv_inputs(self.ctx.sites)
        if not inputs:
            return ir.passes.PassResult(model, modified=False)
        stats = self.ctx.analyses.find(ACTIVATION_STATS)
        if stats is None:
            raise LowbitError("kv quantization needs calibration data (--calib-text or a model directory with a tokenizer)")
        ensure_opset(model, 21)
        forms: dict[str, int] = {}
        for kv in inputs:
            name = kv.value.name
            if name not in stats.by_value or name not in stats.kv_shapes:
                raise LowbitError(f"no calibrated range for attention {kv.role.upper()} {name!r}")
            self._check_smoothing(kv)
            shape = stats.kv_shapes[name]
            lo, hi = kv_range(stats[name], spec)
            scale, zero = kv_qparams(lo, hi, kv.heads(shape), spec)
            if (spec.dynamic_k and kv.role == "k") or (spec.dynamic_v and kv.role == "v"):
                form = self._emit_dynamic(model.graph, kv, shape, scale)
            else:
                form = self._emit(model.graph, kv, shape, scale, zero)
            forms[form] = forms.get(form, 0) + 1
        self.ctx.report["kv"] = {"format": spec.format, "granularity": spec.granularity, "symmetric": spec.symmetric,
                                 "range": spec.range, "dynamic_k": spec.dynamic_k, "dynamic_v": spec.dynamic_v, "tensors": len(inputs), "forms": forms}  # fmt: skip
        logger.info("kv: quantized %d K/V tensors to %s (%s)", len(inputs), spec.format, spec.granularity)
        return ir.passes.PassResult(model, modified=True)

    def _check_smoothing(self, kv: KvInput) -> None:
        """V's ranges are exact after smoothing only through a recorded channel link."""
        if kv.role != "v":
            return
        stats = self.ctx.analyses.get(ACTIVATION_STATS)
        linked = any(name == kv.value.name for name, _ in stats.links.get(kv.o_input.name, ()))
        if kv.o_input.name in stats.rescaled and not linked:
            raise LowbitError(f"smoothing rescaled V {kv.value.name!r}, whose heads are merged into the batch: "
                              "its per-channel range cannot follow; set smooth.feeders without attention_v")  # fmt: skip

    def _emit_dynamic(self, graph: ir.Graph, kv: KvInput, shape: tuple[int, ...], scale: np.ndarray) -> str:
        # K or V alike: the head_dim axis is the last channel axis of either layout
        """x / s (static, per channel) -> one symmetric scale per token and head, from the max of
        |x / s| over head_dim at run time -> Q/DQ with unit scale -> times both scales."""
        (dtype, _, qmax), base, x = _codes(self.ctx.recipe.kv.format)[0], kv.value.name, kv.value
        s_val = add_initializer(graph, scale.reshape(broadcast_shape(kv, shape, scale.size)), f"{base}.kv_scale")
        axes = add_initializer(graph, np.array([kv.channel_axes(len(shape))[-1]], np.int64), f"{base}.kv_token_axes")
        q_max = add_initializer(graph, np.array(qmax, np.float32), f"{base}.kv_qmax")
        floor = add_initializer(graph, np.array(SCALE_FLOOR, np.float32), f"{base}.kv_min_scale")
        unit = add_initializer(graph, np.array(1.0, np.float32), f"{base}.kv_unit_scale")
        zero = add_initializer(graph, np.array(0, dtype), f"{base}.kv_zero_point")
        normed = ir.node("Div", [x, s_val], name=f"{base}.kv_div")
        amax = ir.node("ReduceMax", [ir.node("Abs", [normed.outputs[0]], name=f"{base}.kv_abs").outputs[0], axes],
                       {"keepdims": 1}, name=f"{base}.kv_token_max")  # fmt: skip
        nodes = [normed, amax.inputs[0].producer(), amax]
        nodes.append(ir.node("Div", [amax.outputs[0], q_max], name=f"{base}.kv_token_scale_raw"))
        token_scale = ir.node("Max", [nodes[-1].outputs[0], floor], name=f"{base}.kv_token_scale")
        nodes.append(token_scale)
        nodes.append(ir.node("Div", [normed.outputs[0], token_scale.outputs[0]], name=f"{base}.kv_token_div"))
        q = ir.node("QuantizeLinear", [nodes[-1].outputs[0], unit, zero], name=f"{base}.kv_q")
        q.outputs[0].name, q.outputs[0].type = f"{base}.kv_quantized", ir.TensorType(zero.dtype)
        dq = ir.node("DequantizeLinear", [q.outputs[0], unit, zero], name=f"{base}.kv_dq")
        nodes += [q, dq, ir.node("Mul", [dq.outputs[0], token_scale.outputs[0]], name=f"{base}.kv_token_rescale")]
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0], s_val], name=f"{base}.kv_rescale"))
        _splice(graph, kv, nodes, nodes[-1].outputs[0])
        return "dynamic"

    def _emit(self, graph: ir.Graph, kv: KvInput, shape: tuple[int, ...], scale: np.ndarray,
              zero: np.ndarray | None) -> str:  # fmt: skip
        spec = self.ctx.recipe.kv
        (sdtype, _, _), (udtype, _) = _codes(spec.format)
        dtype = sdtype if zero is None else udtype
        zero = np.zeros_like(scale) if zero is None else zero
        bshape = broadcast_shape(kv, shape, scale.size)
        varying = [a for a, n in enumerate(bshape) if n > 1]
        heads = kv.heads(shape)
        per_head = len(varying) == 2 and np.all(scale.reshape(heads, -1) == scale.reshape(heads, -1)[:, :1]) \
            and np.all(zero.reshape(heads, -1) == zero.reshape(heads, -1)[:, :1])  # fmt: skip
        base, x = kv.value.name, kv.value
        if np.all(scale == scale[0]) and np.all(zero == zero[0]):
            form, axis, s_arr, z_arr = "per_tensor", None, scale[:1].reshape(()), zero[:1].reshape(())
        elif per_head:
            form, axis, s_arr, z_arr = "per_axis", varying[0], scale.reshape(heads, -1)[:, 0], zero.reshape(heads, -1)[:, 0]
        elif len(varying) == 1:
            form, axis, s_arr, z_arr = "per_axis", varying[0], scale, zero
        else:
            form, axis, s_arr, z_arr = "broadcast", None, scale.reshape(bshape), zero.reshape(bshape)
        nodes: list[ir.Node] = []
        attrs = {"axis": axis} if axis is not None else {}
        s_val = add_initializer(graph, s_arr.astype(np.float32), f"{base}.kv_scale")
        if form == "broadcast":
            # channels span two axes (head and head_dim): no Q/DQ axis covers them, so divide by
            # the broadcast scale, quantize with unit scale, and multiply back -- bit-identical to
            # a per-channel Q/DQ: (q - z) * 1 * s == (q - z) * s
            nodes.append(ir.node("Div", [x, s_val], name=f"{base}.kv_div"))
            if np.any(z_arr):  # per-channel zero point: shifted in float (integers, exact)
                z_f = add_initializer(graph, z_arr.astype(np.float32), f"{base}.kv_zero_float")
                nodes.append(ir.node("Add", [nodes[-1].outputs[0], z_f], name=f"{base}.kv_shift"))
            q_scale = add_initializer(graph, np.array(1.0, np.float32), f"{base}.kv_unit_scale")
            q_zero = add_initializer(graph, np.array(0, dtype), f"{base}.kv_zero_point")
            q_in = nodes[-1].outputs[0]
        else:
            q_scale, q_zero, q_in = s_val, add_initializer(graph, z_arr.astype(dtype), f"{base}.kv_zero_point"), x
        q = ir.node("QuantizeLinear", [q_in, q_scale, q_zero], attrs, name=f"{base}.kv_q")
        q.outputs[0].name, q.outputs[0].type = f"{base}.kv_quantized", ir.TensorType(q_zero.dtype)
        dq = ir.node("DequantizeLinear", [q.outputs[0], q_scale, q_zero], attrs, name=f"{base}.kv_dq")
        nodes += [q, dq]
        out = dq.outputs[0]
        if form == "broadcast":
            if np.any(z_arr):
                nodes.append(ir.node("Sub", [out, nodes[1].inputs[1]], name=f"{base}.kv_unshift"))
            nodes.append(ir.node("Mul", [nodes[-1].outputs[0], s_val], name=f"{base}.kv_rescale"))
            out = nodes[-1].outputs[0]
        _splice(graph, kv, nodes, out)
        return form
