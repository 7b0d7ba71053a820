"""Emit the ``npu`` target: standard ONNX QDQ in the one form integer-only accelerators take.

Assumes: the linear-site map; ``activation_stats`` when activations are quantized; optionally
``act_clusters`` (RPTQ labels from the reorder pass) and ``weight_encodings`` (:mod:`lowbit.encode.weights`; computed here if that pass did not run).
Not function-preserving (it quantizes). Guarantees, for every selected linear site:

- only standard ops (QuantizeLinear, DequantizeLinear, MatMul, Split, Gather, Sum; Mul/Add for a
  Gemm's alpha and bias) and integer types (int8/uint8, int16/uint16 activations; int8 or INT4
  weights): no custom domain, no float8/float4.
- every quantized MatMul reads a *per-tensor* activation DQ (scalar scale and zero point) and a
  *symmetric per-output-channel* weight DQ with zero point 0, in (K, N) layout with no Transpose
  between DQ and MatMul -- the pattern ONNX Runtime fuses into MatMulIntegerToFloat and OpenVINO
  into an int8 FullyConnected.
- RPTQ clusters become standard ops: the input is cut by cluster (one Split when the reorder pass
  made the clusters contiguous, one Gather per cluster when it left the input in place), each
  slice gets its own per-tensor Q/DQ, each site one partial MatMul per cluster on the matching
  weight rows, and a Sum of the partials replaces the site's output. The weights decode to the
  same values as the ``qdq`` target's and the cluster ranges are the same, so the graph equals
  the ``qdq`` graph up to float32 summation order (without power-of-two scales).
- ``npu.power_of_two_scales``: every scale (per weight channel, per activation cluster) is
  rounded to a power of two *before* the codes or the zero point are derived from it (``ceil``:
  up, never clips; ``nearest``: nearest in log2, may clip the largest values by up to sqrt(2)).
- ``npu.int4_storage``: int4 weights as int8 codes in [-7, 7] (``int8``, what ONNX Runtime CPU and
  OpenVINO turn into integer kernels, measured) or as INT4 tensors (``int4``, half the size).

The report records per site its number of partial MatMuls; ``report["npu"]`` the totals and
:data:`ORT_X86_NOTE`: ONNX Runtime's CPU provider fuses this pattern into ``MatMulIntegerToFloat``
(uint8 activations x int8 weights), whose x86 kernel without VNNI sums pairs of products in int16
with saturation (``vpmaddubsw``); there the graph is computed as written only with the session
option the note names (measured on an AVX2 CPU: 3.9 % relative logit error on the tiny W8A8
decoder at default options, 0 with the option). VNNI and ARM kernels are exact.
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir

from lowbit import formats
from lowbit.core.context import CompileContext
from lowbit.core.pass_base import LowbitPass
from lowbit.errors import LowbitError
from lowbit.encode.activations import activation_qparams
from lowbit.emit.qdq import ensure_opset, quantizable_groups, stored_codes
from lowbit.core.analyses import WEIGHT_ENCODINGS
from lowbit.core.statistics import ACTIVATION_STATS
from lowbit.passes.reorder import ACT_CLUSTERS
from lowbit.encode.weights import power_of_two, transposed
from lowbit.core.folding import weight_kn
from lowbit.core.initializers import add_initializer
from lowbit.core.linear_sites import LinearSite

__all__ = ["EmitNpuPass", "ORT_DISABLE_QDQ_FUSION", "ORT_X86_NOTE", "power_of_two"]

# The session config entry that keeps ONNX Runtime from fusing QDQ into its integer kernels.
ORT_DISABLE_QDQ_FUSION = ("session.disable_quant_qdq", "1")
ORT_X86_NOTE = ("ONNX Runtime on an x86 CPU without VNNI: its int8 kernel saturates int16 pair sums; "
                f"to compute the graph as written there, set session config {ORT_DISABLE_QDQ_FUSION[0]}="
                f"{ORT_DISABLE_QDQ_FUSION[1]} (or ORT_ENABLE_BASIC)")

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Slice:
    rows: np.ndarray  # input channels (weight rows) of this cluster
    value: ir.Value  # the activation slice: quantized codes, or float when activations stay float
    qparams: tuple[ir.Value, ir.Value] | None = None  # (scale, zero point) of the codes

    def dequantized(self, graph: ir.Graph, anchor: ir.Node, consumer: str) -> ir.Value:
        """A DQ of this slice's codes for one consumer. One DQ per consumer is the canonical QDQ
        form: ONNX Runtime fuses a shared int8 DQ into only one of its MatMuls (measured)."""
        if self.qparams is None:
            return self.value
        dq = ir.node("DequantizeLinear", [self.value, *self.qparams], name=f"{consumer}.act_dq")
        dq.outputs[0].name, dq.outputs[0].type = f"{consumer}.act_dequantized", ir.TensorType(ir.DataType.FLOAT)
        graph.insert_before(anchor, dq)
        return dq.outputs[0]


class EmitNpuPass(LowbitPass):
    """Quantize every selected site as per-tensor-activation, per-channel-weight integer MatMuls."""

    PRESERVES_FUNCTION = False

    def __init__(self, ctx: CompileContext) -> None:
        super().__init__(ctx)
        self.totals = {"partial_matmuls": 0, "split_inputs": 0, "gathered_inputs": 0}
        self.encodings: dict[str, formats.Encoded] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        recipe = self.ctx.recipe
        if recipe.weights.format == "none" and recipe.activations.format == "none":
            return ir.passes.PassResult(model, modified=False)
        ensure_opset(model, 21)  # INT4 and 16-bit Q/DQ
        stats = self.ctx.analyses.get(ACTIVATION_STATS) if recipe.activations.format != "none" else None
        clusters = (self.ctx.analyses.find(ACT_CLUSTERS) or {}) if stats is not None else {}
        self.encodings = self.ctx.analyses.get(WEIGHT_ENCODINGS) if recipe.weights.format != "none" else {}
        count = 0
        for group in quantizable_groups(self.ctx):
            x = group[0].input
            slices = self._slices(model.graph, group, clusters.get(x.name), stats)
            for site in group:
                self._emit_site(model.graph, site, slices)
                count += 1
        self.ctx.report["npu"] = {**self.totals, "power_of_two_scales": recipe.npu.power_of_two_scales,
                                  "int4_storage": recipe.npu.int4_storage, "onnxruntime_x86": ORT_X86_NOTE}  # fmt: skip
        logger.info("npu: %d sites as %d partial integer MatMuls", count, self.totals["partial_matmuls"])
        return ir.passes.PassResult(model, modified=bool(count))

    # --- activations ---------------------------------------------------------------------------
    def _slices(self, graph: ir.Graph, group: list[LinearSite], labels: np.ndarray | None, stats) -> list[_Slice]:
        x, anchor, k = group[0].input, group[0].node, group[0].in_features
        if labels is None or labels.max() == 0:
            parts = [(np.arange(k), x)]
        else:
            parts = self._cut(graph, x, anchor, labels)
        if stats is None:  # weight-only: slices stay float
            return [_Slice(rows, value) for rows, value in parts]
        return [self._quantize(graph, value, anchor, stats[x.name], rows) for rows, value in parts]

    def _cut(self, graph: ir.Graph, x: ir.Value, anchor: ir.Node, labels: np.ndarray) -> list[tuple[np.ndarray, ir.Value]]:
        """One slice of ``x`` per cluster: a Split if clusters are contiguous, else Gathers."""
        n = int(labels.max()) + 1
        rows = [np.flatnonzero(labels == c) for c in range(n)]
        if np.all(np.diff(labels) >= 0):  # the reorder pass made the clusters contiguous
            sizes = add_initializer(graph, np.array([len(r) for r in rows], np.int64), f"{x.name}.cluster_sizes")
            split = ir.node("Split", [x, sizes], {"axis": -1}, num_outputs=n, name=f"{x.name}.split")
            outputs = list(split.outputs)
            graph.insert_before(anchor, split)
            self.totals["split_inputs"] += 1
        else:  # clusters left in place (attention_v, tied or residual-shared inputs)
            outputs = []
            for c, r in enumerate(rows):
                idx = add_initializer(graph, r.astype(np.int64), f"{x.name}.cluster{c}.channels")
                gather = ir.node("Gather", [x, idx], {"axis": -1}, name=f"{x.name}.cluster{c}.gather")
                graph.insert_before(anchor, gather)
                outputs.append(gather.outputs[0])
            self.totals["gathered_inputs"] += 1
        for c, out in enumerate(outputs):
            out.name, out.type = f"{x.name}.cluster{c}", ir.TensorType(ir.DataType.FLOAT)
        return list(zip(rows, outputs))

    def _quantize(self, graph: ir.Graph, value: ir.Value, anchor: ir.Node, st, rows: np.ndarray) -> _Slice:
        aspec = dataclasses.replace(self.ctx.recipe.activations, granularity="per_tensor")
        ranges = SimpleNamespace(min=st.min[rows], max=st.max[rows])
        if aspec.range == "percentile":
            ranges.percentile = st.percentile[rows]
        mode = self.ctx.recipe.npu.power_of_two_scales
        scale, zp, _ = activation_qparams(ranges, aspec, lambda s: power_of_two(s, mode))
        s_val = add_initializer(graph, scale.reshape(()), f"{value.name}.act_scale")
        z_val = add_initializer(graph, zp.reshape(()), f"{value.name}.act_zero_point")
        q = ir.node("QuantizeLinear", [value, s_val, z_val], name=f"{value.name}.q")
        q.outputs[0].name, q.outputs[0].type = f"{value.name}.quantized", ir.TensorType(z_val.dtype)
        graph.insert_before(anchor, q)
        return _Slice(rows, q.outputs[0], (s_val, z_val))

    # --- weights and partial MatMuls -----------------------------------------------------------
    def _encoding(self, site: LinearSite) -> formats.Encoded:
        """The site's symmetric per-output-channel encoding (:mod:`lowbit.encode.weights`; OPTQ's
        when it ran) as the (K, N) matrix."""
        enc = self.encodings[site.name]
        if enc.zero_point is not None or (enc.block_size is not None and enc.scale.shape[site.reduction_axis] > 1):
            raise LowbitError(f"npu: weight {site.name} must be symmetric per output channel, got "
                              f"{'a zero point' if enc.zero_point is not None else f'blocks of {enc.block_size}'}")
        return enc if site.reduction_axis == 0 else transposed(enc)

    def _emit_site(self, graph: ir.Graph, site: LinearSite, slices: list[_Slice]) -> None:
        recipe, node = self.ctx.recipe, site.node
        if recipe.weights.format == "none":
            weights = [add_initializer(graph, weight_kn(site)[s.rows], f"{site.name}.rows{i}") for i, s in enumerate(slices)]
            new_nodes = []
        else:
            enc = self._encoding(site)
            codes, scale, _, _ = stored_codes(enc, recipe.weights.format, "qdq")
            if recipe.npu.int4_storage == "int8":
                codes = codes.astype(np.int8)
            s_val = add_initializer(graph, scale.reshape(-1), f"{site.name}.scale")
            z_val = add_initializer(graph, np.zeros(scale.size, codes.dtype), f"{site.name}.zero_point")
            weights, new_nodes = [], []
            for i, s in enumerate(slices):
                q_val = add_initializer(graph, np.ascontiguousarray(codes[s.rows]), f"{site.name}.q{i}")
                dq = ir.node("DequantizeLinear", [q_val, s_val, z_val], {"axis": 1}, name=f"{site.name}.dq{i}")
                dq.outputs[0].name, dq.outputs[0].type = f"{site.name}.dequantized{i}", ir.TensorType(ir.DataType.FLOAT)
                new_nodes.append(dq)
                weights.append(dq.outputs[0])
        partials = []
        for i, (s, w) in enumerate(zip(slices, weights)):
            x = s.dequantized(graph, node, f"{site.name}.matmul{i}")
            mm = ir.node("MatMul", [x, w], name=f"{site.name}.matmul{i}")
            mm.outputs[0].name, mm.outputs[0].type = f"{site.name}.partial{i}", ir.TensorType(ir.DataType.FLOAT)
            new_nodes.append(mm)
            partials.append(mm.outputs[0])
        result = partials[0]
        if len(partials) > 1:
            total = ir.node("Sum", partials, name=f"{site.name}.sum")
            total.outputs[0].name, total.outputs[0].type = f"{site.name}.summed", ir.TensorType(ir.DataType.FLOAT)
            new_nodes.append(total)
            result = total.outputs[0]
        if node.op_type == "Gemm":
            result = self._gemm_epilogue(graph, node, result, new_nodes, site.name)
        graph.insert_before(node, new_nodes)
        out = node.outputs[0]
        result.shape = out.shape
        out.replace_all_uses_with(result, replace_graph_outputs=True)
        name = out.name
        graph.remove(node, safe=True)
        result.name = name  # a graph output (the lm_head's logits) keeps its name
        self.totals["partial_matmuls"] += len(partials)
        self._report(site, enc if recipe.weights.format != "none" else None, len(partials))

    @staticmethod
    def _gemm_epilogue(graph: ir.Graph, node: ir.Node, y: ir.Value, nodes: list[ir.Node], base: str) -> ir.Value:
        """alpha * y + beta * C, the rest of a Gemm once its product is the summed partials."""
        alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)
        if alpha != 1.0:
            nodes.append(ir.node("Mul", [y, add_initializer(graph, np.array(alpha, np.float32), f"{base}.alpha")]))
            y = nodes[-1].outputs[0]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            if beta != 1.0:
                nodes.append(ir.node("Mul", [c, add_initializer(graph, np.array(beta, np.float32), f"{base}.beta")]))
                c = nodes[-1].outputs[0]
            nodes.append(ir.node("Add", [y, c]))
            y = nodes[-1].outputs[0]
        y.type = ir.TensorType(ir.DataType.FLOAT)
        return y

    def _report(self, site: LinearSite, enc: formats.Encoded | None, partials: int) -> None:
        recipe = self.ctx.recipe
        entry = {"quantized": True, "activations": recipe.activations.format, "feeder": site.feeder.describe(),
                 "shape": [site.in_features, site.out_features], "npu_partials": partials}  # fmt: skip
        if enc is not None:
            bits = formats.get_format(recipe.weights.format).bits
            entry.update({"weights": recipe.weights.format, "block_size": 0, "in_features": site.in_features,
                          "bits_per_weight": bits + 32.0 / site.in_features,
                          "storage_bits": 4 if bits == 4 and recipe.npu.int4_storage == "int4" else 8})  # fmt: skip
        self.ctx.report["sites"].setdefault(site.name, {}).update(entry)
