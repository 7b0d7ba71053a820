"""Emit 4-bit weight sites as the lowbit ORT custom ops (target ``ort-cpu``).

Assumes: :class:`lowbit.encode.weights.EncodeWeightsPass` filled ``weight_encodings`` and
:class:`EmitQDQPass` ran with target ``ort-cpu``: it emitted the activation Q/DQ and the weight QDQ
of the sites :func:`kernel_reason` refuses, and left the weights of the others float (their
MatMuls are still linear sites); :class:`FindEmbeddingsPass` ran before emission when embeddings
are to be lowered. Not function-preserving as a pipeline step, but see the guarantees.

Guarantees:

- Each such MatMul becomes one ``lowbit.MatMulLowbit`` packing the site's encoding itself
  (:func:`lowbit.runtime_ext.pack_matmul_weight`): the kernel's decoded weight equals
  ``lowbit.formats.decode`` of it bit for bit, hence the ``qdq`` target's DQ output (E2M1's -0
  excepted). Scales are float32 per block (dint4, int4) or the uint8 E4M3 (nvfp4) / E8M0 (mxfp4)
  codes. With float inputs the op runs ``act_mode=float32``: outputs differ from the ``qdq`` model
  only by float32 summation order.
- A symmetric int8 per-tensor activation pair ``QuantizeLinear -> DequantizeLinear`` (zero point 0)
  feeding the MatMul is folded into ``act_mode=int8_static`` with the same scale; the kernel clamps
  to [-127, 127] where QuantizeLinear clamps to [-128, 127], which differs only for inputs below
  -127.5 x scale, outside the calibrated range. Other activation pairs (uint8, per-channel or
  per-cluster scales) stay in the graph and the op reads their float output.
- Run-time per-token-group activation quantizers (``activations.granularity = per_token_group``)
  are written by :class:`EmitQDQPass` as one ``lowbit.GroupQuant`` node each instead of nine
  standard ops: the same float32 bits (the kernel and its fallback are tested against those ops),
  eight fewer nodes for ONNX Runtime to dispatch per quantized input at every decode step.
- A lowered site reading a ``lowbit.GroupQuant`` whose every group is int8 (qmax 127) reads the
  quantizer's input instead, with ``act_mode=int8_group, act_group=G`` when G qualifies
  (:func:`lowbit.runtime_ext.specs.int8_group_reason`: a multiple of 32 and of the power-of-two
  weight block, dividing the reduction axis): the op quantizes each row per group exactly as
  GroupQuant does and sums exact integer products per weight block, so outputs equal GroupQuant
  followed by ``act_mode=float32`` up to float32 summation order (NaN/Inf positions included). A
  GroupQuant no other node reads leaves the graph.
- ``ort_cpu.dynamic_activations``: sites whose input is float use ``act_mode=int8_dynamic``
  (int8 per row at run time; no longer equal to the ``qdq`` model).
- ``ort_cpu.embeddings``: every embedding ``Gather`` of a constant 2-D table becomes
  ``lowbit.GatherLowbit``; a table tied to a lowered lm_head shares its packed arrays (one copy in
  the file), otherwise it is encoded with ``weights.format`` in blocks along the hidden axis.
- Symmetric int8 weight sites (e.g. ``sites.int8_weights``' LM head) behind an int8 run-time
  group quantizer whose group is a power of two >= 16 become ONNX Runtime's ``MatMulNBits``
  (bits=8, blocks of that group, accuracy_level=4): its int8 kernel re-quantizes each block of
  activations with scale absmax/127, which gives back the quantizer's own codes, so the output
  equals the ``qdq`` model up to float32 summation order (:func:`_nbits_reason`).
- Sites no kernel can take (block sizes other than 16 or multiples of 32, Gemm, other layout
  ops, int8 weights on any other activations) keep their QDQ form; the report says why. Every
  lowbit node gets its ONNX function fallback, so the model runs with or without
  ``lowbit.runtime_ext.session_options()``.
- :class:`lowbit.emit.reorder_norm.FuseReorderNormPass`: an RPTQ ``Gather(x, perm, axis=-1) -> RMS/LayerNormalization``
  (last axis, constant 1-D gamma/beta, the Gather read by the norm only) becomes one
  ``lowbit.ReorderNorm(x, perm, gamma[, beta])``: the same function (statistics over the gathered
  row, as the kernel and its fallback compute them); outputs differ from the unfused graph only by
  float32 rounding inside the norm.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lowbit import formats
from lowbit.core.context import CompileContext
from lowbit.core.analyses import WEIGHT_ENCODINGS, Key
from lowbit.core.pass_base import LowbitPass
from lowbit.errors import LowbitError
from lowbit.core.initializers import add_initializer
from lowbit.core.linear_sites import LinearSite
from lowbit.runtime_ext import (
    DOMAIN,
    GatherSpec,
    function_protos,
    gather_node_ir,
    matmul_node_ir,
    pack_gather_table,
    pack_matmul_weight,
)
from lowbit.runtime_ext.packing import Packed
from lowbit.runtime_ext.reference import FORMATS as REFERENCE_FORMATS
from lowbit.runtime_ext.specs import int8_group_reason

__all__ = ["KERNEL_FORMATS", "EmbeddingTable", "FindEmbeddingsPass", "LowerOrtCpuPass",
           "activation_int8_group", "attach_fallbacks", "kernel_reason", "nbits_int8_weight"]

logger = logging.getLogger(__name__)

KERNEL_FORMATS = REFERENCE_FORMATS  # the 4-bit formats the native kernels implement (runtime_ext)
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (MatMulNBits)


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingTable:
    """An embedding lookup and, when its table is also a linear weight, that site's MatMul."""

    gather: ir.Node
    table: ir.Value  # constant [vocab, hidden] initializer
    tied_matmul: ir.Node | None  # e.g. the tied lm_head (same ir.Node after QDQ emission)


EMBEDDINGS: Key[list[EmbeddingTable]] = Key("embedding_tables", "token-embedding Gathers and their tied linear sites")
KEPT_QDQ: Key[dict[str, str]] = Key("ort_cpu_kept_qdq", "sites the ort-cpu kernels cannot take, emitted as QDQ, and why")


class FindEmbeddingsPass(LowbitPass):
    """Analysis only (never edits): records embedding Gathers and their tied linear sites.

    Runs before QDQ emission, while a tied lm_head still reads the table's initializer; the
    MatMul node objects survive emission, so the lowering finds the tie by node identity.
    """

    ENSURES = (EMBEDDINGS,)
    PRESERVES_FUNCTION = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = list(self.ctx.sites)
        tables = []
        for node in model.graph:
            if node.domain != "" or node.op_type != "Gather" or node.attributes.get_int("axis", 0):
                continue
            table = node.inputs[0]
            const = table.const_value if table is not None and table.is_initializer() else None
            if const is None or len(const.shape) != 2 or const.dtype != ir.DataType.FLOAT:
                continue
            tied = next((s.node for s in sites if _same_matrix(s.weight, table)), None)
            tables.append(EmbeddingTable(node, table, tied))
        self.ctx.analyses.put(EMBEDDINGS, tables)
        logger.info("found %d embedding tables (%d tied to a linear site)", len(tables),
                    sum(t.tied_matmul is not None for t in tables))
        return ir.passes.PassResult(model, modified=False)


def _same_matrix(weight: ir.Value, table: ir.Value) -> bool:
    """The site's weight is the table itself, or an equal copy of it or of its transpose (the
    constant folder materializes a small tied lm_head's Transpose)."""
    if weight is table:
        return True
    w, t = weight.const_value, table.const_value
    if w is None or w.dtype != t.dtype or sorted(w.shape) != sorted(t.shape):
        return False
    w, t = w.numpy(), t.numpy()
    return (w.shape == t.shape and np.array_equal(w, t)) or (
        w.shape == t.shape[::-1] and np.array_equal(w.T, t))


@dataclasses.dataclass(frozen=True, eq=False)
class _Lowered:
    packed: Packed
    arrays: tuple[ir.Value, ir.Value, ir.Value]  # codes, scales, global_scale initializers


def kernel_reason(site: LinearSite, enc: formats.Encoded, act_group: int | None = None) -> str | None:
    """Why no kernel of the ``ort-cpu`` target can take ``site`` with encoding ``enc``, or None.

    The lowbit kernels take a MatMul whose weight initializer reaches it directly or through one
    Transpose(perm=[1, 0]), in a symmetric 4-bit kernel format with blocks of 16 or multiples
    of 32 dividing a reduction axis that is a multiple of 16. Symmetric int8 weights go to ONNX
    Runtime's ``MatMulNBits`` where its int8 compute is exact (:func:`_nbits_reason`):
    ``act_group`` is the group of the int8 run-time activation quantizer feeding the site.
    """
    if site.node.op_type != "MatMul":
        return f"{site.node.op_type} sites keep their QDQ form"
    path = site.weight_path
    if path and (len(path) > 1 or path[0].op_type != "Transpose"
                 or list(path[0].attributes.get_ints("perm", [1, 0])) != [1, 0]):
        return "weight layout ops other than one Transpose(perm=[1, 0])"
    if enc.zero_point is not None:
        return "asymmetric weights (zero point): the lowbit kernels are symmetric"
    if enc.fmt == "int8":
        return _nbits_reason(enc, act_group)
    if enc.fmt not in KERNEL_FORMATS:
        return f"{enc.fmt} has no lowbit kernel (kernel formats: {', '.join(KERNEL_FORMATS)})"
    d = enc.shape[enc.axis]
    block = enc.block_size or d
    try:
        GatherSpec(enc.fmt, block)
    except LowbitError as e:
        return str(e)
    if d % 16 or d % block:
        return f"reduction axis {d} must be a multiple of 16 and of block_size={block}"
    return None


def _nbits_reason(enc: formats.Encoded, act_group: int | None) -> str | None:
    """int8 weights in ``MatMulNBits`` (bits=8, accuracy_level=4): its kernel quantizes the
    activations to int8 per block of K with scale absmax/127. On activations that already are
    int8 codes times one scale per group of the same length, that re-quantization gives back the
    same codes, so the product equals the graph's up to float32 summation order. On any other
    input it would round a second time: those sites keep their QDQ form."""
    if act_group is None:
        return "int8 weights without an int8 per-token-group activation quantizer (MatMulNBits would re-quantize)"
    if enc.axis is None:
        return "per-tensor int8 weights: MatMulNBits blocks run along the reduction axis"
    if act_group < 16 or act_group & (act_group - 1):
        return f"activation group {act_group}: MatMulNBits blocks are powers of two >= 16"
    d = enc.shape[enc.axis]
    if d % act_group or (enc.block_size and enc.block_size % act_group):
        return f"reduction axis {d} / weight block {enc.block_size or d} not in whole activation groups of {act_group}"
    return None


def activation_int8_group(site_report: dict, site: LinearSite) -> int | None:
    """The group of the run-time activation quantizer EmitQDQPass put before ``site`` when every
    group of it is int8 (qmax 127), else None."""
    entry = site_report.get(site.name, {})
    group = entry.get("activation_group_size")
    if group is None or entry.get("activation_int8_groups") != entry.get("activation_groups"):
        return None
    return int(group)


def nbits_int8_weight(enc: formats.Encoded, group: int) -> tuple[np.ndarray, np.ndarray]:
    """``MatMulNBits`` (bits=8, block ``group``) arrays for an int8 encoding: uint8 codes
    ``value + 128`` (its default zero point) as [N, K / group, group], and float32 scales
    [N * K / group] (a per-channel or coarser block scale repeated over its groups)."""
    scale = (enc.scale.astype(np.float32) * np.float32(enc.global_scale)).astype(np.float32)
    stored = enc.codes if enc.axis == 1 else enc.codes.T  # the kernel wants N rows of K
    if enc.axis == 0:
        scale = scale.T
    n, k = stored.shape
    scale = np.repeat(scale, k // group // scale.shape[1], axis=1)  # [N, K / group]
    if enc.zero_point is None:  # symmetric (every int8 site): values are an elementwise decode of the codes
        def values(rows: slice) -> np.ndarray:
            return enc.spec.element.decode(stored[rows])
    else:
        whole = enc.values().T if enc.axis == 0 else enc.values()

        def values(rows: slice) -> np.ndarray:
            return whole[rows]
    codes = np.empty((n, k), np.uint8)
    step = max(1, (16 << 20) // k)  # a slice of rows at a time: a 1B head's int16 values are 0.5 GB
    for i in range(0, n, step):
        codes[i:i + step] = (values(slice(i, i + step)).astype(np.int16) + 128).astype(np.uint8)
    return codes.reshape(n, k // group, group), np.ascontiguousarray(scale.reshape(-1))


def _scale_dtype(fmt: str) -> str:
    """uint8 (the exact E4M3 / E8M0 bytes) for formats whose block scales are such codes."""
    kind = formats.get_format(fmt).scale_kind
    return "uint8" if kind in (formats.ScaleKind.NVFP4, formats.ScaleKind.E8M0) else "float32"


def _pack(graph: ir.Graph, packed: Packed, base: str) -> tuple[ir.Value, ir.Value, ir.Value]:
    return tuple(add_initializer(graph, arr, f"{base}.{key}4") for key, arr in (
        ("codes", packed.codes), ("scales", packed.scales), ("global_scale", packed.global_scale)))


def _static_int8_pair(a: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(x, scale) when ``a = DQ(Q(x, s, 0), s, 0)`` is symmetric int8 per-tensor, else None."""
    dq = a.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return None
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or q.domain != "" or len(dq.inputs) < 3:
        return None
    s, zp = dq.inputs[1], dq.inputs[2]
    if len(q.inputs) < 3 or q.inputs[1] is not s or q.inputs[2] is not zp:
        return None
    if s.const_value is None or zp.const_value is None or s.const_value.size != 1:
        return None
    if zp.const_value.dtype != ir.DataType.INT8 or zp.const_value.numpy().any():
        return None
    if q.attributes.get_int("saturate", 1) != 1 or q.attributes.get_int("block_size", 0):
        return None
    return q.inputs[0], s


def _int8_group_quant(a: ir.Value, block: int, k: int) -> tuple[ir.Value, int] | None:
    """(x, G) when ``a = lowbit.GroupQuant(x, qmax)`` with qmax 127 in every group of G channels
    and MatMulLowbit's int8_group mode takes G with weight blocks of ``block`` along a reduction
    axis of ``k``, else None."""
    gq = a.producer()
    if gq is None or gq.domain != DOMAIN or gq.op_type != "GroupQuant" or len(gq.inputs) < 2:
        return None
    group = gq.attributes.get_int("group_size", 0)
    qmax = gq.inputs[1].const_value if gq.inputs[1] is not None else None
    if qmax is None or not np.all(qmax.numpy() == 127) or group < 1 or k % group:
        return None
    return None if int8_group_reason(block, group) is not None else (gq.inputs[0], group)


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put ``new`` where ``old`` was; ``new``'s output takes over the old name and every use."""
    graph.insert_before(old, new)
    out, new_out = old.outputs[0], new.outputs[0]
    new_out.type, new_out.shape = out.type, out.shape
    out.replace_all_uses_with(new_out, replace_graph_outputs=True)
    graph.remove(old, safe=True)
    new_out.name = out.name


class LowerOrtCpuPass(LowbitPass):
    """4-bit weight sites -> MatMulLowbit; embeddings -> GatherLowbit (see module docs)."""

    REQUIRES = (WEIGHT_ENCODINGS,)
    PRESERVES_FUNCTION = False

    def __init__(self, ctx: CompileContext) -> None:
        super().__init__(ctx)
        # one block's sites at a time (lowbit.compiler.blockwise), except when embeddings are
        # lowered too: a table shares the packed arrays of its tied head, lowered in another block
        self.BLOCKWISE = not ctx.recipe.ort_cpu.embeddings

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        recipe = self.ctx.recipe
        fmt, opts = recipe.weights.format, recipe.ort_cpu
        encodings = self.ctx.analyses.find(WEIGHT_ENCODINGS) or {}
        kept = dict(self.ctx.analyses.find(KEPT_QDQ) or {})
        earlier = self.ctx.report.get("ort_cpu", {})  # a block-wise compile's earlier blocks
        summary = {"lowered": earlier.get("lowered", 0), "act_modes": Counter(earlier.get("act_modes", {})),
                   "kept_qdq": kept, "embeddings": list(earlier.get("embeddings", []))}  # fmt: skip
        before = summary["lowered"]
        lowered: dict[int, _Lowered] = {}
        site_report = self.ctx.report["sites"]
        for site in list(self.ctx.sites):  # float weights left: the sites EmitQDQPass kept for us
            enc = encodings.get(site.name)
            group = activation_int8_group(site_report, site)
            if enc is None or kernel_reason(site, enc, group) is not None:
                continue  # excluded by sites.exclude (or not emitted by EmitQDQPass)
            if enc.fmt == "int8":
                self._lower_nbits_site(model, site, enc, group)
                summary["lowered"] += 1
                summary["act_modes"]["MatMulNBits int8"] += 1
                continue
            lowered[id(site.node)], mode = self._lower_site(model.graph, site, enc, opts.dynamic_activations)
            summary["lowered"] += 1
            summary["act_modes"][mode] += 1
        if opts.embeddings:
            if fmt not in KERNEL_FORMATS:
                raise LowbitError(f"ort_cpu.embeddings needs a 4-bit weights.format "
                                  f"({', '.join(KERNEL_FORMATS)}), got {fmt!r}")
            for emb in self.ctx.analyses.get(EMBEDDINGS):
                summary["embeddings"].append(self._lower_embedding(model.graph, emb, lowered, fmt))
        count = summary["lowered"] - before + len(summary["embeddings"])
        if count:
            RemoveUnusedNodesPass()(model)  # the float weights and tables replaced
        if count or any(n.domain == DOMAIN and n.op_type == "GroupQuant" for n in model.graph):
            attach_fallbacks(model)  # and EmitQDQPass's GroupQuant nodes
        summary["act_modes"] = dict(summary["act_modes"])
        self.ctx.report["ort_cpu"] = summary
        logger.info("ort-cpu: %d MatMulLowbit, %d GatherLowbit, %d sites kept in QDQ",
                    summary["lowered"], len(summary["embeddings"]), len(summary["kept_qdq"]))
        return ir.passes.PassResult(model, modified=bool(count))

    def _lower_site(self, graph: ir.Graph, site: LinearSite, enc: formats.Encoded, dynamic: bool
                    ) -> tuple[_Lowered, str]:  # fmt: skip
        packed = pack_matmul_weight(enc, scale_dtype=_scale_dtype(enc.fmt))
        arrays = _pack(graph, packed, site.name)
        a, act_scale, mode, group = site.node.inputs[0], None, "float32", None
        pair = _static_int8_pair(a)
        grouped = _int8_group_quant(a, packed.spec.block_size, enc.shape[enc.axis])
        if pair is not None:
            (a, act_scale), mode = pair, "int8_static"
        elif grouped is not None:
            (a, group), mode = grouped, "int8_group"
        elif dynamic and not _from_dequantize(a):
            mode = "int8_dynamic"
        spec = packed.matmul_spec(mode, group)
        node = matmul_node_ir(a, *arrays, spec, act_scale=act_scale, name=f"{site.name}.lowbit")
        _replace(graph, site.node, node)
        entry = self.ctx.report["sites"].get(site.name)
        if entry is not None:
            entry["ort_cpu"] = f"MatMulLowbit {spec.overload}"
        return _Lowered(packed, arrays), mode

    def _lower_nbits_site(self, model: ir.Model, site: LinearSite, enc: formats.Encoded, group: int) -> None:
        codes, scales = nbits_int8_weight(enc, group)
        n, blocks, _ = codes.shape
        graph = model.graph
        inputs = [site.node.inputs[0], add_initializer(graph, codes, f"{site.name}.nbits_codes"),
                  add_initializer(graph, scales, f"{site.name}.nbits_scales")]  # fmt: skip
        attrs = {"K": blocks * group, "N": n, "bits": 8, "block_size": group, "accuracy_level": 4}
        node = ir.node("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=f"{site.name}.nbits")
        _replace(graph, site.node, node)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        entry = self.ctx.report["sites"].get(site.name)
        if entry is not None:
            entry["ort_cpu"] = f"MatMulNBits bits=8 block={group} (int8 activations, exact)"

    def _lower_embedding(self, graph: ir.Graph, emb: EmbeddingTable, lowered: dict[int, _Lowered],
                         fmt: str) -> dict:  # fmt: skip
        if emb.gather.graph is not graph or emb.gather.inputs[0] is not emb.table:
            raise LowbitError(f"embedding Gather {emb.gather.name} changed after it was recorded; "
                              "run FindEmbeddingsPass right before emission")
        table = emb.table.const_value.numpy()
        shared = lowered.get(id(emb.tied_matmul)) if emb.tied_matmul is not None else None
        name = emb.table.name or emb.gather.name or "embedding"
        rows = (table.shape[0], table.shape[1] // 2)  # kernel layout: [vocab, hidden / 2]
        if shared is not None and shared.packed.codes.shape == rows:
            packed, arrays = shared.packed, shared.arrays  # tied lm_head: one packed copy
        else:
            wspec = self.ctx.recipe.weights
            block = formats.get_format(fmt).block_size(wspec.block_size)
            enc = formats.encode(table, fmt, axis=1, block_size=block, scale_method=wspec.scale_method)
            packed = pack_gather_table(enc, scale_dtype=_scale_dtype(fmt))
            arrays = _pack(graph, packed, name)
            shared = None
        spec = GatherSpec(packed.spec.fmt, packed.spec.block_size, packed.spec.scale_dtype)
        node = gather_node_ir(*arrays, emb.gather.inputs[1], spec, name=f"{name}.lowbit_gather")
        _replace(graph, emb.gather, node)
        return {"table": name, "shape": list(table.shape), "op": f"GatherLowbit {spec.overload}",
                "shared_with_lm_head": shared is not None}


def attach_fallbacks(model: ir.Model) -> None:
    """The fallback function of every runtime_ext op variant in the graph.

    Not ``attach_functions_ir``: that one wants a fallback builder for every ``lowbit``-domain
    node, and canonicalize's ``lowbit.RMSNormalization`` (opset-18 exports) brings its own.
    """
    opset = model.opset_imports[""]
    ours = [ir.serde.serialize_node(n) for n in model.graph
            if n.domain == DOMAIN and n.op_type in ("MatMulLowbit", "GatherLowbit", "ReorderNorm", "GroupQuant")]
    for proto in function_protos(ours, opset):
        fn = ir.serde.deserialize_function(proto)
        model.functions[fn.identifier()] = fn
    model.opset_imports.setdefault(DOMAIN, 1)


def _from_dequantize(a: ir.Value) -> bool:
    producer = a.producer()
    return producer is not None and producer.op_type == "DequantizeLinear"
