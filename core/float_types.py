"""Float types: fold float16 / bfloat16 weight *storage* into float32, refuse any other non-float32 float.

lowbit compiles float32 graphs: every rewrite writes float32 tensors next to the ones it replaces
(DequantizeLinear outputs, QuantizeLinear scales, smoothing factors folded into norm weights,
the ORT CPU ops' outputs), so a weight or activation computed in another float type would end
up bound to float32 in the same op -- an output ONNX Runtime refuses to load, or (for a weight
seen through a Cast) a model whose folded scales silently miss the weight actually used.

Runs in canonicalization right after the first type inference and before any constant folding,
so a refused model never reaches calibration. Assumes nothing about the input's float types
(value types are used where known; the check also reads every type source -- graph inputs,
constants, Cast / dtype attributes -- so it does not depend on them).

Guarantees:

1. *Storage folded* (function-preserving, exact): a float16, bfloat16 or float64 constant (an
   initializer that is not a graph input or output, or a ``Constant`` node's tensor) whose every
   use reaches a ``Cast(to=FLOAT)`` -- or a ``CastLike`` to a float32 tensor -- through
   element-moving ops only (Identity, Transpose, Reshape, Squeeze, Unsqueeze, Flatten, the data
   input of Gather) becomes the float32 constant of the same name; those ops then move float32
   elements and the Casts are removed (a Cast that is itself a graph output stays, as a no-op
   float -> float Cast). Exact: float16 / bfloat16 -> float32 widening is exact, float64 ->
   float32 rounds to nearest even exactly as the run-time Cast did, and moving elements commutes
   with an elementwise cast. This is the "float16 storage, float32 compute" export form; its
   weights are float32 in the compiled model (quantized sites store codes; a weight left in float
   is stored in float32, twice its float16 size).
   *Lazy*: the fold reads no weight of :data:`LAZY_BYTES` or more (in float32): that constant
   becomes an ``ir.LazyTensor`` whose ``dtype``, ``shape`` and ``nbytes`` are float32's, and which
   reads its source (through a memory map of its own when it is external data, unmapped again)
   and widens it each time its contents are asked for -- ``numpy()``, ``tobytes()``, saving the
   model (every ONNX Runtime session does), a block's session borrowing its array. Nothing is
   kept: the float32 array lives as long as its reader holds it, so the compile holds a weight
   in float32 only while a pass or session uses it, and each read pays the widening again. The
   array is read-only, as an external tensor's is (a write would be lost; a pass that edits a
   weight writes a new tensor). Smaller constants are widened at the fold.
2. *Everything else refused*: afterwards no float16 / bfloat16 / float64 tensor is left in the
   model -- graph inputs and outputs, node inputs and outputs of every graph, subgraph and
   function, ``Cast`` / ``dtype`` targets and tensor attributes -- or a :class:`LowbitError`
   names the first one in graph order (graph inputs, then nodes in order, then graph outputs)
   and says to export in float32. A model computing in float16 or bfloat16 is refused here,
   before calibration runs it. Refusing is the documented choice: lowbit's emission targets
   compute activations in float32 (ORT CPU has few float16 and almost no bfloat16 kernels), so
   a float16 compile path would be a model-wide upcast the user gets more simply, and with an
   input ONNX Runtime can run for calibration, ``--verify`` and ``--eval``, by exporting in
   float32.

``check_float_types`` makes the same refusal without changing the model; the compile context
calls it before anything runs the input (``--verify`` runs it before the first pass, and ONNX
Runtime has no CPU bfloat16 kernels).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.errors import LowbitError

__all__ = ["LAZY_BYTES", "NON_FLOAT32", "FloatTypesPass", "check_float_types", "first_non_float32",
           "fold_float_storage", "read_float32", "widened_source"]

logger = logging.getLogger(__name__)

FLOAT = ir.DataType.FLOAT
# The float types a weight or activation may have in ONNX besides float32. The FP8 / FP4 types
# only appear as quantized codes (DequantizeLinear inputs), which lowbit handles, so they pass.
NON_FLOAT32 = {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16", ir.DataType.DOUBLE: "float64"}
# Ops that only move elements: an elementwise cast commutes with them (data input 0 only).
_MOVE_OPS = frozenset({"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Gather"})
_DTYPE_ATTRS = ("to", "dtype", "output_dtype")
LAZY_BYTES = 1 << 20  # a widened constant this large (in float32) is widened on each read, not at the fold


def _standard(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _casts_to_float32(node: ir.Node, index: int, unknown_ok: bool) -> bool:
    if not _standard(node) or index != 0:
        return False
    if node.op_type == "Cast":
        to = node.attributes.get("to")
        return to is not None and to.as_int() == FLOAT
    if node.op_type == "CastLike" and len(node.inputs) > 1 and node.inputs[1] is not None:
        like = node.inputs[1].dtype
        return like == FLOAT or (unknown_ok and like is None)
    return False


def _widening_path(value: ir.Value, unknown_ok: bool) -> tuple[list[ir.Node], list[ir.Node]] | None:
    """(element-moving nodes, float32 casts) if every use of ``value`` reaches a cast to float32
    through element-moving ops only, else None."""
    moves: dict[ir.Node, None] = {}
    casts: dict[ir.Node, None] = {}
    stack = [value]
    while stack:
        v = stack.pop()
        if v.is_graph_output():
            return None
        for use in v.uses():
            node, index = use.node, use.idx
            if _casts_to_float32(node, index, unknown_ok):
                casts[node] = None
            elif _standard(node) and node.op_type in _MOVE_OPS and index == 0:
                if node not in moves:
                    moves[node] = None
                    stack.append(node.outputs[0])
            else:
                return None
    return list(moves), list(casts)


@dataclass
class _Fold:
    value: ir.Value  # the constant: an initializer or a Constant node's output
    tensor: ir.TensorProtocol
    constant_node: ir.Node | None
    moves: list[ir.Node]
    casts: list[ir.Node]


def _foldable(model: ir.Model, *, unknown_ok: bool = False) -> list[_Fold]:
    """Every non-float32 float constant of the main graph that step 1 widens."""
    graph = model.graph
    found: list[_Fold] = []
    candidates = [(v, v.const_value, None) for v in graph.initializers.values()
                  if v.dtype in NON_FLOAT32 and v.const_value is not None and not v.is_graph_input()]  # fmt: skip
    for node in graph:
        attr = node.attributes.get("value")
        if node.op_type == "Constant" and _standard(node) and attr is not None and attr.type == ir.AttributeType.TENSOR:
            if attr.as_tensor().dtype in NON_FLOAT32:
                candidates.append((node.outputs[0], attr.as_tensor(), node))
    for value, tensor, node in candidates:
        path = _widening_path(value, unknown_ok)
        if path is not None and value.uses():
            found.append(_Fold(value, tensor, node, *path))
    return found


def read_float32(source: ir.TensorProtocol) -> np.ndarray:
    """``source``'s elements as a new float32 array. External data is read through a memory map of
    this call's own, closed again: the pages read do not stay resident, and two reads share nothing."""
    if not isinstance(source, ir.ExternalTensor):
        return np.asarray(source.numpy()).astype(np.float32)
    view = ir.ExternalTensor(source.location, source.offset, source.length, source.dtype, shape=source.shape,
                             name=source.name, base_dir=source.base_dir)  # fmt: skip
    try:
        return view.numpy().astype(np.float32)
    finally:
        view.release()


def _read_widened(source: ir.TensorProtocol, name: str | None) -> ir.Tensor:
    """A lazily widened constant's contents: read-only, since a write would be lost."""
    array = read_float32(source)
    array.flags.writeable = False
    return ir.Tensor(array, name=name)


def _widened(source: ir.TensorProtocol, name: str | None) -> ir.TensorProtocol:
    """The float32 constant replacing ``source`` (module doc, step 1): lazy when large."""
    if source.size * FLOAT.itemsize < LAZY_BYTES:
        return ir.Tensor(read_float32(source), name=name)
    shape = ir.Shape(source.shape.numpy())
    return ir.LazyTensor(functools.partial(_read_widened, source, name), dtype=FLOAT, shape=shape, name=name)


def widened_source(tensor: ir.TensorProtocol) -> ir.TensorProtocol | None:
    """The float16 / bfloat16 / float64 tensor that a lazily widened constant reads, or None when
    ``tensor`` is not one (e.g. to re-point an external source whose directory moved)."""
    func = tensor.raw if isinstance(tensor, ir.LazyTensor) else None
    if isinstance(func, functools.partial) and func.func is _read_widened:
        return func.args[0]
    return None


def fold_float_storage(model: ir.Model) -> int:
    """Step 1 of the module docstring; returns how many constants became float32. Reads no
    constant of :data:`LAZY_BYTES` or more (in float32)."""
    folds = _foldable(model)
    for fold in folds:
        widened = _widened(fold.tensor, fold.value.name)
        if fold.constant_node is None:
            fold.value.const_value = widened
        else:
            fold.constant_node.attributes["value"] = ir.AttrTensor("value", widened)
        fold.value.type = ir.TensorType(FLOAT)
        for node in fold.moves:
            node.outputs[0].type = ir.TensorType(FLOAT)
        for cast in fold.casts:
            out = cast.outputs[0]
            if out.is_graph_output():
                continue  # float -> float now: a no-op that keeps the output's name
            out.replace_all_uses_with(cast.inputs[0])
            cast.graph.remove(cast, safe=True)
    return len(folds)


def _graphs(model: ir.Model):
    """The main graph's nodes (subgraphs included, in order), then every function's."""
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _node_label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def first_non_float32(model: ir.Model, exempt: Collection[ir.Value] = (),
                      exempt_nodes: Collection[ir.Node] = ()) -> str | None:  # fmt: skip
    """Where the first float16 / bfloat16 / float64 tensor of ``model`` is, in words, or None
    (``exempt``: values and Constant nodes known to become float32)."""
    for v in model.graph.inputs:
        if v.dtype in NON_FLOAT32:
            return f"graph input '{v.name}' is {NON_FLOAT32[v.dtype]}"
    for node in _graphs(model):
        for v in node.inputs:
            if v is not None and v.dtype in NON_FLOAT32 and v not in exempt:
                return f"tensor '{v.name}' (input of {_node_label(node)}) is {NON_FLOAT32[v.dtype]}"
        for name, attr in node.attributes.items():
            if node in exempt_nodes:
                break
            if attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype in NON_FLOAT32:
                return f"{_node_label(node)} holds a {NON_FLOAT32[attr.as_tensor().dtype]} tensor ({name})"
            if name in _DTYPE_ATTRS and attr.type == ir.AttributeType.INT and attr.as_int() in NON_FLOAT32:
                out = node.outputs[0].name if node.outputs else ""
                return f"{_node_label(node)} makes '{out}' {NON_FLOAT32[ir.DataType(attr.as_int())]}"
        for v in node.outputs:
            if v.dtype in NON_FLOAT32 and v not in exempt:
                return f"tensor '{v.name}' (output of {_node_label(node)}) is {NON_FLOAT32[v.dtype]}"
    for v in model.graph.outputs:
        if v.dtype in NON_FLOAT32:
            return f"graph output '{v.name}' is {NON_FLOAT32[v.dtype]}"
    return None


def _refuse(where: str) -> LowbitError:
    return LowbitError(f"{where}: lowbit compiles float32 models (float16/bfloat16 weights Cast to float32 "
                       "before use are fine); export the model in float32")  # fmt: skip


def check_float_types(model: ir.Model) -> None:
    """The refusal of step 2 without changing the model, for a caller that must refuse before the
    pipeline runs (e.g. before ``--verify`` runs the input). Types need not be inferred: it never
    refuses a model the pass accepts (a CastLike to an untyped tensor counts as a float32 cast;
    the pass, after type inference, may still refuse such a model)."""
    folds = _foldable(model, unknown_ok=True)
    exempt = {f.value for f in folds} | {n.outputs[0] for f in folds for n in f.moves}
    where = first_non_float32(model, exempt, {f.constant_node for f in folds if f.constant_node is not None})
    if where is not None:
        raise _refuse(where)


class FloatTypesPass(ir.passes.InPlacePass):
    """Fold float16 / bfloat16 weight storage into float32; refuse other non-float32 floats."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = fold_float_storage(model)
        if folded:
            logger.info("float types: %d float16/bfloat16/float64 constants widened to float32", folded)
        where = first_non_float32(model)
        if where is not None:
            raise _refuse(where)
        return ir.passes.PassResult(model, modified=bool(folded))
