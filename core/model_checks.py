"""Checks of a model's data, made where lowbit first reads the model: a corrupt or mismatched input
fails with one line naming the tensor, file or size at fault, not deep inside onnx_ir, ONNX Runtime
or numpy.

- **external data** (:func:`check_external_data`): an initializer stored outside the ``.onnx``
  names a regular file inside the model's directory (no ``..``, no absolute path, not a link out of
  it, one hard link -- what onnx_ir and ONNX Runtime insist on when they read it), and its bytes lie
  inside that file: ``offset + length <= file size`` and ``length`` = the tensor's byte size.
  :func:`check_ir_external_data` applies it to an ``onnx_ir`` model (compile),
  :func:`check_onnx_graph` to a ``ModelProto`` loaded without its external data (eval).
- **tensor types** (:func:`check_onnx_graph`): every initializer and declared graph value has a
  ``data_type`` that ONNX defines.
- **cycles** (:func:`check_onnx_graph`): no node depends, through node inputs, on its own output.
- **token ids** (:func:`check_token_ids`): the largest id a tokenizer produced is below the model's
  embedding table rows and its logits size, checked before the model runs on them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from lowbit.errors import LowbitError, printable

__all__ = [
    "check_external_data",
    "check_ir_external_data",
    "check_onnx_graph",
    "check_token_ids",
    "ir_vocab_limits",
    "onnx_vocab_limits",
]

# data_type numbers ONNX defines (UNDEFINED excluded: no tensor holds data of no type)
_KNOWN_TYPES = frozenset(v for v in onnx.TensorProto.DataType.values() if v != onnx.TensorProto.UNDEFINED)
_SUBBYTE_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.FLOAT4E2M1: 4}
for _name, _bits in (("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)):
    if hasattr(onnx.TensorProto, _name):
        _SUBBYTE_BITS[getattr(onnx.TensorProto, _name)] = _bits


def _q(name: object) -> str:
    return repr(printable(str(name)))


def check_external_data(label: str, base: Path | None, tensor: str, location: str, offset: int | None,
                        length: int | None, nbytes: int | None, *, single_link: bool = False) -> None:
    """One initializer's external data reference (see the module docstring): ``label`` starts the
    message (the model file), ``base`` is the model's directory (None: a tensor built in memory
    whose ``location`` is a path of its own, not confined to a directory); ``single_link`` also
    refuses a file with several hard links (onnx_ir does, ONNX Runtime does not)."""
    where = f"{printable(label)}: initializer {_q(tensor)}"
    loc = Path(location)
    if not location or (base is not None and (loc.is_absolute() or ".." in loc.parts)):
        raise LowbitError(f"{where}: external data location {_q(location)} is not a file inside the model's directory")
    path = loc if base is None else base / loc
    try:
        st = path.stat()  # follows links: a link must reach a regular file inside the directory
    except FileNotFoundError:
        raise LowbitError(f"{where}: its external data file {_q(location)} is missing") from None
    except OSError as e:
        raise LowbitError(f"{where}: cannot read its external data file {_q(location)} ({e.strerror})") from e
    if not path.is_file():
        raise LowbitError(f"{where}: its external data {_q(location)} is not a regular file")
    if base is not None and not os.path.realpath(path).startswith(os.path.join(os.path.realpath(base), "")):
        raise LowbitError(f"{where}: its external data {_q(location)} links outside the model's directory")
    if single_link and st.st_nlink > 1:
        raise LowbitError(f"{where}: its external data file {_q(location)} has {st.st_nlink} hard links, which "
                          "onnx refuses to read: copy the file (cp, not cp -l)")  # fmt: skip
    offset = offset or 0
    if offset < 0 or (length is not None and length < 0):
        raise LowbitError(f"{where}: negative external data offset/length ({offset}, {length})")
    if length is not None and nbytes is not None and length != nbytes:
        raise LowbitError(f"{where}: external data length {length} does not match the tensor's {nbytes} bytes")
    need = length if length is not None else nbytes
    if need is not None and offset + need > st.st_size:
        raise LowbitError(f"{where}: external data bytes {offset}..{offset + need} run past the end of "
                          f"{printable(location)} ({st.st_size} bytes)")  # fmt: skip


def _proto_nbytes(tensor: onnx.TensorProto) -> int | None:
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    bits = _SUBBYTE_BITS.get(tensor.data_type)
    if bits is None:
        bits = 8 * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.ceil(math.prod(tensor.dims) * bits / 8)


def _int_field(model_file: Path, tensor: str, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LowbitError(f"{printable(str(model_file))}: initializer {_q(tensor)}: external data {key} "
                          f"{_q(value)} is not an integer") from None  # fmt: skip


def _graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies), iteratively."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def _check_types(model_file: Path, graph: onnx.GraphProto) -> None:
    for t in graph.initializer:
        if t.data_type not in _KNOWN_TYPES:
            raise LowbitError(f"{printable(str(model_file))}: initializer {_q(t.name)} has data_type {t.data_type}, "
                              "which is not an ONNX tensor type")  # fmt: skip
    for kind, values in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
        for v in values:
            elem = v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else 0
            if elem and elem not in _KNOWN_TYPES:
                raise LowbitError(f"{printable(str(model_file))}: graph {kind} {_q(v.name)} has data_type {elem}, "
                                  "which is not an ONNX tensor type")  # fmt: skip


def _check_acyclic(model_file: Path, graph: onnx.GraphProto) -> None:
    """Kahn's algorithm over the nodes' explicit inputs (order in the file does not matter)."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    users: dict[int, list[int]] = {}
    pending = [0] * len(graph.node)
    for i, node in enumerate(graph.node):
        for src in {producer[x] for x in node.input if x in producer}:
            users.setdefault(src, []).append(i)
            pending[i] += 1
    ready = [i for i, n in enumerate(pending) if n == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for j in users.get(i, ()):
            pending[j] -= 1
            if pending[j] == 0:
                ready.append(j)
    if done < len(graph.node):
        # every node left waits on another node left: walk back along those until one repeats
        preds: dict[int, int] = {}
        for src, dests in users.items():
            for j in dests:
                if pending[src] and pending[j]:
                    preds.setdefault(j, src)
        i, seen = next(i for i, n in enumerate(pending) if n), set()
        while i not in seen:
            seen.add(i)
            i = preds[i]
        node = graph.node[i]
        label = node.name or (node.output[0] if node.output else node.op_type)
        raise LowbitError(f"{printable(str(model_file))}: the graph has a cycle (node {_q(label)}, "
                          f"{node.op_type}, depends on its own output)")  # fmt: skip


def check_onnx_graph(model_file: Path, model: onnx.ModelProto) -> None:
    """Types, external data references and acyclicity of a model loaded without its external
    data (``onnx.load(..., load_external_data=False)``); LowbitError naming what is wrong."""
    for graph in _graphs(model.graph):
        _check_types(model_file, graph)
        _check_acyclic(model_file, graph)
        for t in graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            entries = {e.key: e.value for e in t.external_data}
            offset = _int_field(model_file, t.name, "offset", entries["offset"]) if "offset" in entries else None
            length = _int_field(model_file, t.name, "length", entries["length"]) if "length" in entries else None
            check_external_data(str(model_file), model_file.parent, t.name, entries.get("location", ""), offset,
                                length, _proto_nbytes(t))


def check_ir_external_data(model: ir.Model) -> None:
    """:func:`check_external_data` for every external initializer of an ``onnx_ir`` model (the
    compile input), before any pass reads one."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if not isinstance(t, ir.ExternalTensor):
                continue
            base = Path(t.base_dir) if t.base_dir else None  # onnx_ir confines reads to base_dir only
            check_external_data(str(t.path), base, t.name or value.name or "?", str(t.location), t.offset,
                                t.length, t.nbytes, single_link=True)


# ---- token ids vs the model's vocabulary -------------------------------------------------------

_DQ_OPS = ("DequantizeLinear",)


def ir_vocab_limits(model: ir.Model) -> tuple[int | None, int | None]:
    """(embedding table rows, logits size) of a causal LM's graph, each None when not static:
    rows of the initializer a ``Gather`` on ``input_ids`` reads (directly or through a
    DequantizeLinear of stored codes), and the last dimension of a rank-3 ``logits`` output."""
    graph = model.graph
    rows = None
    for node in graph:
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2 \
                and node.inputs[1] is not None and node.inputs[1].name == "input_ids" \
                and node.inputs[1].producer() is None:  # fmt: skip
            data = node.inputs[0]
            if data is not None and data.const_value is None and data.producer() is not None \
                    and data.producer().op_type in _DQ_OPS:  # fmt: skip
                data = data.producer().inputs[0]
            shape = data.const_value.shape if data is not None and data.const_value is not None else None
            if shape is not None and len(shape) == 2 and isinstance(shape[0], int):
                rows = int(shape[0]) if rows is None else min(rows, int(shape[0]))
    logits = None
    for out in graph.outputs:
        # [batch, seq, vocab]: a classifier's [batch, classes] logits are not a vocabulary
        if out.name == "logits" and out.shape is not None and len(out.shape) == 3 and isinstance(out.shape[-1], int) \
                and out.shape[-1] > 0:  # fmt: skip
            logits = int(out.shape[-1])
    return rows, logits


def onnx_vocab_limits(model: onnx.ModelProto) -> tuple[int | None, int | None]:
    """:func:`ir_vocab_limits` of a ``ModelProto`` loaded without its external data (the IR view
    of it reads no weight bytes)."""
    return ir_vocab_limits(ir.serde.deserialize_model(model))


def check_token_ids(windows: Iterable[np.ndarray], limits: tuple[int | None, int | None], *, what: str,
                    model: str, vocab_size: int | None = None) -> None:
    """Every id in ``windows`` must index the model's embedding table and its logits.

    ``what`` names the ids' origin ("calibration text"), ``model`` the model, ``vocab_size`` the
    tokenizer's vocabulary size when known. Raises one line naming both sizes.
    """
    largest = max((int(np.max(w)) for w in windows if np.size(w)), default=None)
    if largest is None:
        return
    smallest = min(int(np.min(w)) for w in windows if np.size(w))
    tokenizer = f"the tokenizer's vocabulary ({vocab_size} ids)" if vocab_size else "the tokenizer"
    if smallest < 0:
        raise LowbitError(f"{what}: token id {smallest} is negative: {tokenizer} does not match {model}")
    rows, logits = limits
    for size, table in ((rows, "embedding table"), (logits, "logits dimension")):
        if size is not None and largest >= size:
            raise LowbitError(f"{what}: token id {largest} from {tokenizer} is past {printable(model)}'s {table} "
                              f"({size} entries): the tokenizer does not belong to this model")  # fmt: skip
