"""Upgrade the model's default-domain opset to the one lowbit writes, before any pass reads an op.

lowbit inserts nodes in a recent opset's form (blocked Q/DQ and INT4 need opset 21, FLOAT4E2M1
and the standard Attention / RotaryEmbedding 23). Raising the opset *number* alone would leave the
model's own nodes in their old form, which is invalid under the new number (a ReduceMean with an
``axes`` attribute is opset < 18; at 18 ``axes`` became an input). So the compile's output opset
is decided once, from the recipe's target (:func:`output_opset`), and the whole model is
converted to it first.

Assumes: any ONNX model (opset 7 and up, as ``onnx.version_converter`` supports); model-local
functions are inlined first (the converter converts the main graph only).
Guarantees, function-preserving: every default-domain node is in the target opset's form (checked
with ``onnx.checker`` on the converted graph); the model's signature, initializers (the same tensor
objects: external data is never read) and other domains' nodes are kept; a model already at or
above the target is untouched (never downgraded). When the converter changes no node (e.g. an
optimum opset-18 export going to 21) the opset is renumbered in place and every node and value
stays the same object; otherwise the model gets the converted graph (new objects, so this runs
before any analysis holds one). A conversion that fails raises one line naming the op.

How: ``onnx.version_converter`` (the C++ converter, the reference) runs on a copy of the graph
without tensor data -- initializers that are external or above :data:`INLINE_LIMIT` elements
become typed graph inputs for the call -- so a model of any size converts in the memory of its
graph, then the converted graph takes the original tensors back. onnxscript's
``version_converter`` works on onnx_ir directly but converts only from opset 18 up (optimum's 14,
torch's legacy 13-17 are the models that need it) and logs and skips nodes it cannot convert.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import onnx
import onnx.version_converter
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass

from lowbit.errors import LowbitError

__all__ = ["FP4_OUTPUT_OPSET", "ORT_CPU_OUTPUT_OPSET", "OUTPUT_OPSET", "UpgradeOpsetPass", "default_opset", "output_opset",
           "upgrade_opset"]  # fmt: skip

logger = logging.getLogger(__name__)

OUTPUT_OPSET = 21  # INT4/UINT4 and Q/DQ block_size (FACTS.md: "ONNX types and Q/DQ")
FP4_OUTPUT_OPSET = 23  # FLOAT4E2M1 and DQ output_dtype: target qdq-fp4
ORT_CPU_OUTPUT_OPSET = 23  # the standard Attention and RotaryEmbedding: target ort-cpu
INLINE_LIMIT = 1024  # in-memory initializers up to this many elements go to the converter as data
CONVERTER = f"onnx.version_converter (onnx {onnx.__version__})"


def output_opset(target: str) -> int:
    """The default-domain opset a compile for ``target`` writes (models above it keep theirs)."""
    return {"qdq-fp4": FP4_OUTPUT_OPSET, "ort-cpu": ORT_CPU_OUTPUT_OPSET}.get(target, OUTPUT_OPSET)


def default_opset(model: ir.Model) -> int:
    imports = model.graph.opset_imports
    return imports.get("", imports.get("ai.onnx", 1))


def _weightless_proto(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, ir.Value]]:
    """The model as a proto whose external or large initializers are typed graph inputs instead
    (no tensor data is read or copied); the model is left as it was. Returns the proto and the
    initializers moved out."""
    graph = model.graph
    moved = {name: value for name, value in graph.initializers.items() if value.const_value is not None
             and (isinstance(value.const_value, ir.ExternalTensor) or value.const_value.size > INLINE_LIMIT)}  # fmt: skip
    tensors = {name: value.const_value for name, value in moved.items()}
    inputs = list(graph.inputs)
    try:
        for name, value in moved.items():
            value.shape = value.shape or tensors[name].shape
            value.dtype = value.dtype or tensors[name].dtype
            graph.initializers.pop(name)
            value.const_value = None
            if value not in inputs:
                graph.inputs.append(value)
        return ir.serde.serialize_model(model), moved
    finally:
        graph.inputs.clear()
        graph.inputs.extend(inputs)
        for name, value in moved.items():
            value.const_value = tensors[name]
            graph.register_initializer(value)


def _proto_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _failing_node(proto: onnx.ModelProto, target: int) -> onnx.NodeProto | None:
    """The first default-domain node that does not convert on its own (the failure path only:
    the converter's own messages do not reliably name the op)."""
    g = proto.graph
    infos = {v.name: v for v in (*g.input, *g.value_info, *g.output)}
    for t in g.initializer:
        infos.setdefault(t.name, onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    tried: set[str] = set()
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in tried:
            continue
        tried.add(node.op_type)
        ins = [infos.get(i) or onnx.helper.make_value_info(i, onnx.TypeProto()) for i in node.input if i]
        outs = [infos.get(o) or onnx.helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o]
        single = onnx.helper.make_model(onnx.helper.make_graph([node], "op", ins, outs), ir_version=proto.ir_version,
                                        opset_imports=[onnx.helper.make_opsetid("", _proto_opset(proto))])  # fmt: skip
        try:
            onnx.version_converter.convert_version(single, target)
        except Exception:  # noqa: BLE001 - whatever the converter raises, this op is the one
            return node
    return None


def _reason(e: BaseException) -> str:
    """The converter's message on one line, without its source location and assertion text."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    line = re.sub(r"^\S+:\d+: \w+: (Assertion `.*` failed: )?", "", line)
    return line[:200]


def upgrade_opset(model: ir.Model, target: int) -> bool:
    """Convert ``model`` in place to default-domain opset ``target``; False if already there."""
    current = default_opset(model)
    if current >= target:
        return False
    if model.functions:  # the converter converts the main graph only
        InlinePass()(model)
        RemoveUnusedFunctionsPass()(model)
    proto, moved = _weightless_proto(model)
    min_ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)], ignore_unknown=True)
    proto.ir_version = max(proto.ir_version, min_ir)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
        onnx.checker.check_model(converted)  # every node valid in the target opset
    except Exception as e:  # noqa: BLE001 - the C++ converter raises RuntimeError, IndexError, ...
        node = _failing_node(proto, target)
        where = f"op {node.op_type} (node '{node.name}')" if node is not None else "the graph"
        raise LowbitError(f"cannot upgrade the model from opset {current} to {target} (the opset lowbit writes): "
                          f"onnx.version_converter fails at {where}: {_reason(e)}") from e  # fmt: skip
    if _same_nodes(proto.graph, converted.graph):  # already in the target form: renumber in place,
        imports = model.graph.opset_imports  # so values and nodes held by the caller stay valid
        for domain in {"", *(imports.keys() & {"ai.onnx"})}:
            imports[domain] = target
    else:
        _adopt(model, converted, moved)
    model.ir_version = proto.ir_version
    return True


def _same_nodes(before: onnx.GraphProto, after: onnx.GraphProto) -> bool:
    return len(before.node) == len(after.node) and all(
        a.SerializeToString() == b.SerializeToString() for a, b in zip(before.node, after.node))


def _adopt(model: ir.Model, converted: onnx.ModelProto, moved: dict[str, ir.Value]) -> None:
    """Make the converted graph the model's, holding the original tensors again (a new graph:
    values and nodes taken from the old one are stale)."""
    graph = ir.serde.deserialize_model(converted).graph
    inputs = {v.name: v for v in graph.inputs}
    for name, old in moved.items():  # the same tensor objects: external data stays unread
        value = inputs[name]
        value.const_value = old.const_value
        graph.register_initializer(value)
    signature = {v.name for v in model.graph.inputs}
    kept = [v for v in graph.inputs if v.name in signature]
    graph.inputs.clear()
    graph.inputs.extend(kept)
    model.graph = graph


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Convert the model to ``target_opset`` (see the module docstring); records
    ``report["opset"] = {"from", "to", "converter"}`` when given a report."""

    def __init__(self, target_opset: int = OUTPUT_OPSET, report: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.target_opset = target_opset
        self.report = report

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = default_opset(model)
        modified = upgrade_opset(model, self.target_opset)
        after = default_opset(model)
        if self.report is not None:
            self.report["opset"] = {"from": before, "to": after, "converter": CONVERTER if modified else None}
        if modified:
            logger.info("default-domain opset %d -> %d (%s)", before, after, CONVERTER)
        return ir.passes.PassResult(model, modified=modified)
