"""Emit standard ONNX QDQ for every linear site: weights as DequantizeLinear chains over stored
codes, activations as one QuantizeLinear/DequantizeLinear pair per shared input (or, with
``activations.granularity = per_token_group``, the run-time group quantizer of
:mod:`lowbit.emit.dynamic_act`; target ``ort-cpu`` writes it as one ``lowbit.GroupQuant`` node,
which computes the same bits).

Assumes: the linear-site map, and (when activations are quantized) ``activation_stats`` from
calibration. Not function-preserving (it quantizes). Guarantees:

- target ``qdq``: only standard ops and types ONNX Runtime CPU executes exactly (FACTS.md):
  int8/uint8 codes, INT4/UINT4 codes (blocked or per-axis), FLOAT8E4M3FN codes. Formats whose
  values are not a linear integer grid -- dINT, FP4 E2M1, NVFP4, MXFP4 -- are stored as int8 codes
  of 2*value with half the scale: 2*v is an integer in [-12, 12], and (2v) * (s/2) rounds to the
  same float32 as v * s, so the graph's decoded weight equals ``lowbit.formats.decode`` bit for bit
  (E2M1's negative-zero code becomes +0: int8 has no -0; it adds the same to every dot product).
- target ``qdq-fp4``: FP4-element formats are stored as FLOAT4E2M1 codes; NVFP4 block scales as
  FLOAT8E4M3FN codes dequantized by the FP32 global scale (DQ(DQ(f8 scale, global)) chain). Meant
  for runtimes that implement FP4 (TensorRT-class); ORT CPU does not, so it is verified with
  ``onnx.reference``.
- weights: every selected site writes exactly ``weight_encodings[site]`` (:mod:`lowbit.encode.weights`,
  computed here if that pass did not run; FGMP sites are left to :mod:`lowbit.emit.mixed`). Target
  ``ort-cpu``: the sites :func:`lowbit.emit.ort_cpu.kernel_reason` accepts keep their float weight
  for :class:`~lowbit.emit.ort_cpu.LowerOrtCpuPass`; the others get QDQ and the report says why.
- the default opset is raised to 21 when blocked or 4-bit DQ needs it (23 for FLOAT4E2M1); ops in
  exported LLM graphs keep their semantics across 18 -> 23 (only type lists grew).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit import formats
from lowbit.core.context import CompileContext
from lowbit.core.pass_base import LowbitPass
from lowbit.encode.activations import activation_qparams, cluster_ranges, dynamic_group_size
from lowbit.errors import LowbitError
from lowbit.emit.dynamic_act import dynamic_group_nodes, group_qmax
from lowbit.emit.ort_cpu import KEPT_QDQ, activation_int8_group, kernel_reason
from lowbit.runtime_ext import group_quant_node_ir
from lowbit.core.analyses import WEIGHT_ENCODINGS
from lowbit.core.statistics import ACTIVATION_STATS
from lowbit.passes.reorder import ACT_CLUSTERS
from lowbit.core.initializers import add_initializer
from lowbit.core.linear_sites import LinearSite, selected_sites

__all__ = ["EmitQDQPass", "add_initializer", "ensure_opset", "quantizable_groups",
           "stored_codes", "weight_dq_nodes"]

logger = logging.getLogger(__name__)


def ensure_opset(model: ir.Model, version: int) -> None:
    current = model.opset_imports.get("", 1)
    if current < 18 <= version:  # renumbering would leave old-form ops (ReduceMean's axes attribute)
        raise LowbitError(f"the model has opset {current}: convert it to {version} first "
                          "(lowbit.passes.opset.UpgradeOpsetPass, the first canonicalization pass)")
    if current < version:
        model.opset_imports[""] = version
        model.graph.opset_imports[""] = version
        for function in model.functions.values():  # model-local functions must match the model
            function.opset_imports[""] = version
    # ORT 1.31 accepts IR <= 13; opset 21 needs IR >= 10, opset 23 IR >= 11.
    model.ir_version = min(max(model.ir_version, 10 if version <= 22 else 11), 11)


def _per_axis(scale: np.ndarray, axis: int) -> np.ndarray:
    return scale.reshape(-1) if scale.shape[axis] == 1 else scale


def stored_codes(enc: formats.Encoded, fmt: str, target: str, *, unsigned_int8: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:  # fmt: skip
    """(codes array with its ONNX dtype via ml_dtypes, float32 scale, zero point, scale kind).

    ``unsigned_int8``: store symmetric 8-bit weights as uint8 codes with zero point 128. The
    decoded values are identical, (c - 128) * s == v * s, but ONNX Runtime then fuses uint8
    activations x weights into its u8u8 integer kernel. Its u8s8 kernel on x86 CPUs without VNNI
    (VPMADDUBSW) saturates int16 pair sums (255 * 127 * 2 > 32767): measured on SmolLM2 W8A8,
    ppl 25 with u8 weights vs 7e5 with s8 weights, on an AVX2 EPYC.
    """
    scale = (enc.scale.astype(np.float32) * np.float32(enc.global_scale)).astype(np.float32)
    spec = formats.get_format(fmt)
    element = spec.element.name
    if target == "qdq-fp4" and element == "fp4_e2m1":
        return _stored_values(enc, lambda v: v.astype(ml_dtypes.float4_e2m1fn)), scale, None, "fp4"
    if spec.half_step_storage:
        return _stored_values(enc, lambda v: (2 * v).astype(np.int8)), (scale / np.float32(2)).astype(np.float32), None, "half"
    if element.startswith("fp8"):
        return _stored_values(enc, lambda v: v.astype(ml_dtypes.float8_e4m3fn)), scale, None, "fp8"
    if not np.array_equal(spec.grid, np.rint(spec.grid)):
        raise LowbitError(f"{fmt}: no exact standard-ONNX storage (its values are not integers and "
                          "2 x value does not fit int8)")
    bits = spec.bits
    if enc.zero_point is not None:  # asymmetric: unsigned codes with a zero point, like ONNX
        dtype = ml_dtypes.uint4 if bits == 4 else np.uint8
        return enc.codes.astype(dtype), scale, enc.zero_point.astype(dtype), "int"
    if unsigned_int8 and bits == 8:
        codes = _stored_values(enc, lambda v: (v.astype(np.int16) + 128).astype(np.uint8))
        return codes, scale, np.full(enc.scale.shape, 128, np.uint8), "int"
    dtype = ml_dtypes.int4 if bits == 4 else np.int8
    return _stored_values(enc, lambda v: v.astype(np.int8).astype(dtype)), scale, None, "int"


_STORE_SLICE = 16 << 20  # elements decoded at a time: float32 values of a slice, not of a vocabulary head


def _stored_values(enc: formats.Encoded, store: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``store(enc.values())`` for a symmetric encoding (an elementwise decode of the codes), a
    slice of rows at a time: the same array without a float32 copy of a 1-2 GB head."""
    codes = enc.codes
    if codes.ndim < 2 or codes.size <= _STORE_SLICE or enc.zero_point is not None:
        return store(enc.values())
    rows = max(1, _STORE_SLICE // (codes.size // len(codes)))
    parts = [store(enc.spec.element.decode(codes[i:i + rows])) for i in range(0, len(codes), rows)]
    return np.concatenate(parts)


def weight_dq_nodes(graph: ir.Graph, site: LinearSite, enc: formats.Encoded, fmt: str, target: str, *,
                    unsigned_int8: bool = False) -> tuple[list[ir.Node], ir.Value]:  # fmt: skip
    """DequantizeLinear node(s) reproducing ``formats.decode(enc)`` for the site's weight."""
    axis, block = site.reduction_axis, enc.block_size
    codes, scale, zp, kind = stored_codes(enc, fmt, target, unsigned_int8=unsigned_int8)
    base = site.name
    blocked = block is not None and enc.scale.shape[axis] > 1
    attrs = {"axis": axis, "block_size": int(block)} if blocked else {"axis": 1 - axis}
    if not blocked:
        scale = _per_axis(scale, axis)
        zp = _per_axis(zp, axis) if zp is not None else None
    nodes: list[ir.Node] = []
    if kind == "fp4" and fmt == "nvfp4":  # FP8 block scales dequantized by the FP32 global scale
        f8 = add_initializer(graph, enc.scale.astype(np.float32).astype(ml_dtypes.float8_e4m3fn), f"{base}.scale_f8")
        gs = add_initializer(graph, np.array(enc.global_scale, np.float32), f"{base}.global_scale")
        scale_node = ir.node("DequantizeLinear", [f8, gs], name=f"{base}.scale_dq")
        scale_node.outputs[0].name = f"{base}.scale"
        nodes.append(scale_node)
        scale_value = scale_node.outputs[0]
    else:
        scale_value = add_initializer(graph, scale, f"{base}.scale")
    inputs = [add_initializer(graph, codes, f"{base}.q"), scale_value]
    if zp is not None:
        inputs.append(add_initializer(graph, zp, f"{base}.zero_point"))
    dq = ir.node("DequantizeLinear", inputs, attrs, name=f"{base}.dq")
    dq.outputs[0].name = f"{base}.dequantized"
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    nodes.append(dq)
    return nodes, dq.outputs[0]


def quantizable_groups(ctx: CompileContext) -> list[list[LinearSite]]:
    """Linear sites grouped by shared input, without those ``sites.exclude`` names (empty groups
    dropped). Never silently: the report records every skipped or excluded site and why."""
    site_report = ctx.report["sites"]
    for name, why in ctx.sites.skipped.items():
        site_report[name] = {"quantized": False, "reason": why}
    groups = []
    for group in ctx.sites.input_groups():
        chosen = selected_sites(group, ctx.recipe.sites.exclude)
        for s in group:
            if s not in chosen:
                site_report[s.name] = {"quantized": False, "reason": "excluded by sites.exclude"}
        if chosen:
            groups.append(chosen)
    return groups


class EmitQDQPass(LowbitPass):
    """Quantize every selected linear site's weight (and input) as the recipe says."""

    PRESERVES_FUNCTION = False
    BLOCKWISE = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        recipe = self.ctx.recipe
        wspec, aspec, target = recipe.weights, recipe.activations, recipe.target
        if wspec.format == "none" and aspec.format == "none":
            return ir.passes.PassResult(model, modified=False)
        ensure_opset(model, 23 if target == "qdq-fp4" else 21)
        stats = self.ctx.analyses.get(ACTIVATION_STATS) if aspec.format != "none" else None
        graph, count = model.graph, 0
        site_report = self.ctx.report["sites"]
        weights = wspec.format != "none" and not recipe.precision.enabled  # FGMP emits its own
        encodings = self.ctx.analyses.get(WEIGHT_ENCODINGS) if weights else {}  # EncodeWeightsPass
        for chosen in quantizable_groups(self.ctx):
            if stats is not None:
                self._quantize_input(graph, chosen, stats)
            for site in chosen:
                if weights:
                    self._quantize_weight(graph, site, encodings[site.name])
                site_report.setdefault(site.name, {}).update(
                    {"quantized": True, "activations": aspec.format, "feeder": site.feeder.describe(),
                     "shape": [site.in_features, site.out_features]})  # fmt: skip
                count += 1
        logger.info("quantized %d linear sites", count)
        return ir.passes.PassResult(model, modified=bool(count))

    def _quantize_weight(self, graph: ir.Graph, site: LinearSite, enc: formats.Encoded) -> None:
        recipe = self.ctx.recipe
        target = recipe.target
        spec = formats.get_format(enc.fmt)  # the recipe's grid, or int8 for sites.int8_weights
        n_scales = int(np.prod(enc.scale.shape))
        entry = self.ctx.report["sites"].setdefault(site.name, {})
        entry.update({"weights": enc.fmt, "block_size": enc.block_size or 0,
                      "bits_per_weight": spec.bits + 32.0 * n_scales / int(np.prod(enc.shape)),
                      "in_features": site.in_features})  # fmt: skip
        if target == "ort-cpu":  # sites the lowbit kernels take stay float for LowerOrtCpuPass
            why = kernel_reason(site, enc, activation_int8_group(self.ctx.report["sites"], site))
            if why is None:
                return
            entry["ort_cpu_kept_qdq"] = why
            kept = self.ctx.analyses.find(KEPT_QDQ) or {}
            kept[site.name] = why
            self.ctx.analyses.put(KEPT_QDQ, kept)
        aspec = recipe.activations
        uint8_acts = aspec.format == "int8" and not aspec.symmetric
        nodes, dq_out = weight_dq_nodes(graph, site, enc, enc.fmt, target, unsigned_int8=uint8_acts)
        consumer = site.weight_path[0] if site.weight_path else site.node
        graph.insert_before(consumer, nodes)
        consumer.replace_input_with(0 if site.weight_path else 1, dq_out)

    def _quantize_input(self, graph: ir.Graph, sites: list[LinearSite], stats) -> None:
        aspec = self.ctx.recipe.activations
        x = sites[0].input
        clusters = (self.ctx.analyses.find(ACT_CLUSTERS) or {}).get(x.name)
        if aspec.granularity == "per_token_group":
            self._quantize_input_dynamic(graph, sites, clusters)
            return
        ranges = stats[x.name]
        if clusters is not None:  # RPTQ: one range per cluster, as a per-channel scale vector
            ranges, aspec = cluster_ranges(ranges, clusters), dataclasses.replace(aspec, granularity="per_channel")
        scale, zp, axis = activation_qparams(ranges, aspec)
        base = x.name
        attrs = {"axis": axis} if axis is not None else {}
        s_val = add_initializer(graph, scale, f"{base}.act_scale")
        z_val = add_initializer(graph, zp, f"{base}.act_zero_point")
        q = ir.node("QuantizeLinear", [x, s_val, z_val], attrs, name=f"{base}.q")
        q.outputs[0].name = f"{base}.quantized"
        q.outputs[0].type = ir.TensorType(z_val.dtype)
        q.outputs[0].shape = x.shape
        nodes = [q]
        if axis is None:
            dq = ir.node("DequantizeLinear", [q.outputs[0], s_val, z_val], attrs, name=f"{base}.dq")
            nodes.append(dq)
        else:
            # Per-channel scales vary along the reduction axis: no integer matmul can apply them,
            # yet ORT 1.31 fuses any DQ -> MatMul into MatMulIntegerToFloat and fails at run time.
            # DQ with unit scales, then Mul by the scales: (q - zp) * 1 * s is bit-identical to
            # (q - zp) * s, and the Mul keeps the fusion away.
            ones = add_initializer(graph, np.ones_like(scale), f"{base}.act_unit_scale")
            unit = ir.node("DequantizeLinear", [q.outputs[0], ones, z_val], attrs, name=f"{base}.dq")
            dq = ir.node("Mul", [unit.outputs[0], s_val], name=f"{base}.dq_scale")
            unit.outputs[0].name = f"{base}.act_unscaled"
            nodes += [unit, dq]
        dq.outputs[0].name = f"{base}.act_dequantized"
        dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        dq.outputs[0].shape = x.shape
        graph.insert_before(sites[0].node, nodes)
        for site in sites:
            site.node.replace_input_with(0, dq.outputs[0])

    def _quantize_input_dynamic(self, graph: ir.Graph, sites: list[LinearSite], clusters: np.ndarray | None) -> None:
        aspec = self.ctx.recipe.activations
        x, channels = sites[0].input, sites[0].in_features
        group = dynamic_group_size(channels, aspec.group_size)
        outliers = None
        if aspec.outlier_format == "int8" and clusters is not None:
            outliers = np.flatnonzero(clusters == clusters.max())  # labels rank clusters by range
        qmax = group_qmax(aspec.format, channels, group, outliers)
        if self.ctx.recipe.target == "ort-cpu":  # one lowbit.GroupQuant node, the same bits
            limits = add_initializer(graph, qmax.astype(np.float32).reshape(-1, 1), f"{x.name}.group_qmax")
            node = group_quant_node_ir(x, limits, group, name=f"{x.name}.group_quant")
            node.outputs[0].name = f"{x.name}.act_dequantized"
            node.outputs[0].type, node.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), x.shape
            nodes, out = [node], node.outputs[0]
        else:
            nodes, out = dynamic_group_nodes(graph, x, channels, group, qmax, x.name)
        graph.insert_before(sites[0].node, nodes)
        for site in sites:
            site.node.replace_input_with(0, out)
        # bits per activation: codes plus one float32 scale per group
        bits = float(np.where(qmax > 7, 8.0, 4.0).mean()) + 32.0 / group
        for site in sites:
            self.ctx.report["sites"].setdefault(site.name, {}).update(
                {"activation_group_size": group, "activation_groups": len(qmax), "activation_int8_groups": int((qmax > 7).sum()), "bits_per_activation": bits})
