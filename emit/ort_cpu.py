"""Lower 4-bit QDQ weight sites to the lowbit ORT custom ops (target ``ort-cpu``).

Assumes: :class:`EmitQDQPass` ran with a 4-bit ``weights.format`` the native kernels know
(dint4, nvfp4, int4, mxfp4; symmetric), so every quantized weight reaches its MatMul as
``DequantizeLinear(codes, scale) [-> Transpose(perm=[1, 0])] -> MatMul`` with constant codes
(int8 codes of 2 x value with half scales for dint/FP4 formats, INT4 codes for int4; see
:mod:`lowbit.emit.qdq`); :class:`FindEmbeddingsPass` ran before emission when embeddings
are to be lowered. Not function-preserving as a pipeline step, but see the guarantees.

Guarantees:

- Each such MatMul becomes one ``lowbit.MatMulLowbit`` whose packed codes/scales are read back
  from the DQ exactly: the decoded weight equals the DQ's output bit for bit, hence
  ``lowbit.formats.decode`` of the emitted encoding (E2M1's -0 excepted, as in ``qdq``). Scales are
  float32 per block, or the exact uint8 E4M3 (nvfp4) / E8M0 (mxfp4) bytes when they reproduce every
  block scale exactly. With float inputs the op runs ``act_mode=float32``: outputs differ from the
  ``qdq`` model only by float32 summation order.
- A symmetric int8 per-tensor activation pair ``QuantizeLinear -> DequantizeLinear`` (zero point 0)
  feeding the MatMul is folded into ``act_mode=int8_static`` with the same scale; the kernel clamps
  to [-127, 127] where QuantizeLinear clamps to [-128, 127], which differs only for inputs below
  -127.5 x scale, outside the calibrated range. Other activation pairs (uint8, per-channel or
  per-cluster scales) stay in the graph and the op reads their float output.
- ``ort_cpu.dynamic_activations``: sites whose input is float use ``act_mode=int8_dynamic``
  (int8 per row at run time; no longer equal to the ``qdq`` model).
- ``ort_cpu.embeddings``: every embedding ``Gather`` of a constant 2-D table becomes
  ``lowbit.GatherLowbit``; a table tied to a lowered lm_head shares its packed arrays (one copy in
  the file), otherwise it is encoded with ``weights.format`` in blocks along the hidden axis.
- Sites the kernels cannot take (block sizes other than 16 or multiples of 32, Gemm, other
  layout ops) keep their QDQ form; the report says why. Every lowbit node gets its ONNX function
  fallback, so the model runs with or without ``lowbit.runtime_ext.session_options()``.
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
from lowbit.errors import LowbitError
from lowbit.formats.minifloat import FP8_E4M3
from lowbit.core.initializers import add_initializer
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
from lowbit.runtime_ext.reference import INT_TABLES

__all__ = ["KERNEL_FORMATS", "EmbeddingTable", "FindEmbeddingsPass", "LowerOrtCpuPass",
           "read_weight_encoding"]

logger = logging.getLogger(__name__)

KERNEL_FORMATS = ("dint4", "nvfp4", "int4", "mxfp4")
_HALF_STEP = ("dint4", "nvfp4", "mxfp4")  # emit_qdq stores int8 codes of 2 x value
_EMBEDDINGS = "embedding_tables"  # analysis name (FindEmbeddingsPass -> LowerOrtCpuPass)


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingTable:
    """An embedding lookup and, when its table is also a linear weight, that site's MatMul."""

    gather: ir.Node
    table: ir.Value  # constant [vocab, hidden] initializer
    tied_matmul: ir.Node | None  # e.g. the tied lm_head (same ir.Node after QDQ emission)


class FindEmbeddingsPass(ir.passes.InPlacePass):
    """Analysis only (never edits): records embedding Gathers and their tied linear sites.

    Runs before QDQ emission, while a tied lm_head still reads the table's initializer; the
    MatMul node objects survive emission, so the lowering finds the tie by node identity.
    """

    def __init__(self, ctx: CompileContext) -> None:
        super().__init__()
        self.ctx = ctx

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
        self.ctx.put(_EMBEDDINGS, tables)
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
class _WeightSite:
    matmul: ir.Node
    dq: ir.Node
    transpose: ir.Node | None
    axis: int  # reduction axis of the stored codes

    @property
    def label(self) -> str:  # emit_qdq names the DQ "<site>.dq"; cosmetic only
        return (self.dq.name or self.matmul.name or "matmul").removesuffix(".dq")


@dataclasses.dataclass(frozen=True, eq=False)
class _Lowered:
    packed: Packed
    arrays: tuple[ir.Value, ir.Value, ir.Value]  # codes, scales, global_scale initializers


def _weight_site(node: ir.Node) -> _WeightSite | str | None:
    """The QDQ weight path of a MatMul, a reason it cannot be lowered, or None (no DQ weight)."""
    if node.domain != "" or node.op_type != "MatMul" or len(node.inputs) != 2:
        return None
    producer = node.inputs[1].producer() if node.inputs[1] is not None else None
    transpose = None
    if producer is not None and producer.op_type == "Transpose" and producer.domain == "":
        transpose, producer = producer, producer.inputs[0].producer()
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain != "":
        return None
    codes = producer.inputs[0]
    if codes.const_value is None or len(codes.const_value.shape) != 2:
        return None  # activations (K/V Q/DQ) or non-matrix weights
    if transpose is not None and list(transpose.attributes.get_ints("perm", [1, 0])) != [1, 0]:
        return "weight transposed with a perm other than [1, 0]"
    if len(producer.inputs) > 2 and producer.inputs[2] is not None:
        return "asymmetric weights (zero point): the lowbit kernels are symmetric"
    return _WeightSite(node, producer, transpose, 1 if transpose is not None else 0)


def _inverse_table(fmt: str) -> np.ndarray:
    """Integer value (2 x value for half-step formats) + 12 -> 4-bit code; 99 = not on the grid."""
    inv = np.full(25, 99, np.uint8)
    for code in range(15, -1, -1):  # lowest code wins: +0 is code 0, never the -0 code
        inv[int(INT_TABLES[fmt][code]) + 12] = code
    return inv


def read_weight_encoding(dq: ir.Node, fmt: str, axis: int) -> formats.Encoded | str:
    """The :class:`formats.Encoded` whose decode equals ``dq``'s output bit for bit, or why not.

    ``axis``: reduction axis of the stored codes (the blocked axis of the DQ). The encoding has
    global scale 1 and float32 scales fl(scale * global) -- the product the DQ holds -- except
    that :func:`_compact_scales` turns them back into E4M3 / E8M0 values when that is exact.
    """
    codes = dq.inputs[0].const_value.numpy()
    scale = dq.inputs[1].const_value
    if scale is None:
        return "scale is not a constant (e.g. an FP8 scale chain)"
    scale = scale.numpy().astype(np.float32)
    shape = tuple(int(d) for d in codes.shape)
    block = dq.attributes.get_int("block_size", 0) or None
    want = "int8" if fmt in _HALF_STEP else "int4"
    if codes.dtype.name != want:
        return f"codes are {codes.dtype.name}, {fmt} weights are emitted as {want}"
    ints = codes.astype(np.int32)
    if fmt in _HALF_STEP:  # (2v) * (s / 2) == v * s: doubling the half scale is exact
        scale = (scale * np.float32(2)).astype(np.float32)
    inv = _inverse_table(fmt)
    if ints.min() < -12 or ints.max() > 12 or (inv[ints + 12] == 99).any():
        return f"codes are not on the {fmt} grid"
    # scale layout: same rank as the codes, D / B on the blocked axis
    n_blocks = 1 if block is None else shape[axis] // block
    scale_shape = (n_blocks, shape[1]) if axis == 0 else (shape[0], n_blocks)
    if block is not None and shape[axis] % block:
        return f"block_size {block} does not divide the reduction axis ({shape[axis]})"
    if scale.size != int(np.prod(scale_shape)):
        return f"scale shape {scale.shape} does not match {scale_shape}"
    scale, global_scale = _compact_scales(scale.reshape(scale_shape), fmt)
    return formats.Encoded(fmt, shape, axis, block, inv[ints + 12].astype(np.uint8), scale,
                           np.float32(global_scale), None)


def _compact_scales(s_eff: np.ndarray, fmt: str) -> tuple[np.ndarray, float]:
    """(scale, global) with fl(scale * global) == s_eff everywhere: E4M3 block scales and a
    global scale (nvfp4) when exact, else (s_eff, 1).

    NVFP4's largest block scale is fl(448 * global) for absmax scales, so the global scale is
    within a few ulps of max / 448: those candidates are tried, and any mismatch (e.g. clipped
    scales) keeps float32 scales.
    """
    if fmt != "nvfp4" or not s_eff.size or not s_eff.max() > 0:
        return s_eff, 1.0
    g = np.float32(s_eff.max() / np.float32(448))
    for step in (0, 1, -1, 2, -2, 3, -3):
        cand = g
        for _ in range(abs(step)):
            cand = np.nextafter(cand, np.float32(np.inf if step > 0 else 0), dtype=np.float32)
        sb = FP8_E4M3.round((s_eff / cand).astype(np.float32)).astype(np.float32)
        if (sb > 0).all() and np.array_equal((sb * cand).astype(np.float32), s_eff):
            return sb, float(cand)
    return s_eff, 1.0


def _scale_dtype(enc: formats.Encoded) -> str:
    """uint8 when the scales are exactly E4M3 values (nvfp4) or powers of two (mxfp4)."""
    if enc.fmt == "nvfp4" and enc.global_scale != 1.0:
        return "uint8"
    if enc.fmt == "mxfp4" and (enc.scale > 0).all() and (np.frexp(enc.scale)[0] == 0.5).all():
        return "uint8"
    return "float32"


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


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put ``new`` where ``old`` was; ``new``'s output takes over the old name and every use."""
    graph.insert_before(old, new)
    out, new_out = old.outputs[0], new.outputs[0]
    new_out.type, new_out.shape = out.type, out.shape
    out.replace_all_uses_with(new_out, replace_graph_outputs=True)
    graph.remove(old, safe=True)
    new_out.name = out.name


class LowerOrtCpuPass(ir.passes.InPlacePass):
    """QDQ 4-bit weight sites -> MatMulLowbit; embeddings -> GatherLowbit (see module docs)."""

    def __init__(self, ctx: CompileContext) -> None:
        super().__init__()
        self.ctx = ctx

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        recipe = self.ctx.recipe
        fmt, opts = recipe.weights.format, recipe.ort_cpu
        summary = {"lowered": 0, "act_modes": Counter(), "kept_qdq": {}, "embeddings": []}
        lowered: dict[int, _Lowered] = {}
        if fmt in KERNEL_FORMATS:
            for node in list(model.graph):
                site = _weight_site(node)
                if site is None:
                    continue
                label = site.label if isinstance(site, _WeightSite) else node.name
                result = self._lower_site(model.graph, site, fmt, opts.dynamic_activations)
                if isinstance(result, str):
                    summary["kept_qdq"][label] = result
                    logger.debug("ort-cpu: %s stays QDQ: %s", label, result)
                    continue
                lowered[id(node)], mode = result
                summary["lowered"] += 1
                summary["act_modes"][mode] += 1
        if opts.embeddings:
            if fmt not in KERNEL_FORMATS:
                raise LowbitError(f"ort_cpu.embeddings needs a 4-bit weights.format "
                                  f"({', '.join(KERNEL_FORMATS)}), got {fmt!r}")
            for emb in self.ctx.get(_EMBEDDINGS):
                summary["embeddings"].append(self._lower_embedding(model.graph, emb, lowered, fmt))
        count = summary["lowered"] + len(summary["embeddings"])
        if count:
            RemoveUnusedNodesPass()(model)  # the DQ/Transpose/QDQ chains and float tables replaced
            _attach_fallbacks(model)
        summary["act_modes"] = dict(summary["act_modes"])
        self.ctx.report["ort_cpu"] = summary
        logger.info("ort-cpu: %d MatMulLowbit, %d GatherLowbit, %d sites kept in QDQ",
                    summary["lowered"], len(summary["embeddings"]), len(summary["kept_qdq"]))
        return ir.passes.PassResult(model, modified=bool(count))

    def _lower_site(self, graph: ir.Graph, site: _WeightSite | str, fmt: str, dynamic: bool
                    ) -> tuple[_Lowered, str] | str:  # fmt: skip
        if isinstance(site, str):
            return site
        enc = read_weight_encoding(site.dq, fmt, site.axis)
        if isinstance(enc, str):
            return enc
        try:
            packed = pack_matmul_weight(enc, scale_dtype=_scale_dtype(enc))
        except LowbitError as e:  # block sizes / lengths the kernels do not take
            return str(e)
        label = site.label
        arrays = tuple(add_initializer(graph, arr, f"{label}.{key}4") for key, arr in (
            ("codes", packed.codes), ("scales", packed.scales), ("global_scale", packed.global_scale)))
        a, act_scale, mode = site.matmul.inputs[0], None, "float32"
        pair = _static_int8_pair(a)
        if pair is not None:
            (a, act_scale), mode = pair, "int8_static"
        elif dynamic and not _from_dequantize(a):
            mode = "int8_dynamic"
        node = matmul_node_ir(a, *arrays, packed.matmul_spec(mode), act_scale=act_scale,
                              name=f"{label}.lowbit")
        _replace(graph, site.matmul, node)
        entry = self.ctx.report["sites"].get(label)
        if entry is not None:
            entry["ort_cpu"] = f"MatMulLowbit {packed.spec.overload}_{mode}"
        return _Lowered(packed, arrays), mode

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
            block = wspec.block_size or (16 if fmt == "nvfp4" else 32 if fmt == "mxfp4" else None)
            enc = formats.encode(table, fmt, axis=1, block_size=block,
                                 scale_method=wspec.scale_method)
            packed = pack_gather_table(
                enc, scale_dtype="uint8" if fmt in ("nvfp4", "mxfp4") else "float32")
            arrays = tuple(add_initializer(graph, arr, f"{name}.{key}4") for key, arr in (
                ("codes", packed.codes), ("scales", packed.scales),
                ("global_scale", packed.global_scale)))
            shared = None
        spec = GatherSpec(packed.spec.fmt, packed.spec.block_size, packed.spec.scale_dtype)
        node = gather_node_ir(*arrays, emb.gather.inputs[1], spec, name=f"{name}.lowbit_gather")
        _replace(graph, emb.gather, node)
        return {"table": name, "shape": list(table.shape), "op": f"GatherLowbit {spec.overload}",
                "shared_with_lm_head": shared is not None}


def _attach_fallbacks(model: ir.Model) -> None:
    """The fallback function of every runtime_ext op variant in the graph.

    Not ``attach_functions_ir``: that one wants a fallback builder for every ``lowbit``-domain
    node, and canonicalize's ``lowbit.RMSNormalization`` (opset-18 exports) brings its own.
    """
    opset = model.opset_imports[""]
    ours = [ir.serde.serialize_node(n) for n in model.graph
            if n.domain == DOMAIN and n.op_type in ("MatMulLowbit", "GatherLowbit")]
    for proto in function_protos(ours, opset):
        fn = ir.serde.deserialize_function(proto)
        model.functions[fn.identifier()] = fn
    model.opset_imports.setdefault(DOMAIN, 1)


def _from_dequantize(a: ir.Value) -> bool:
    producer = a.producer()
    return producer is not None and producer.op_type == "DequantizeLinear"
