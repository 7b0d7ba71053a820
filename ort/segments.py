"""Block-wise observation: the model cut into segments at its residual stream, run one segment at
a time over every window, so ONNX Runtime never holds more than one segment's weights.

Where it cuts: right before each norm node (``core.linear_sites.NORM_OPS``, after norm fusion), so
a pre-LN decoder falls into its embedding, one segment per attention half and per MLP half, and
its head; consecutive pieces are merged while their weights stay under ``budget_bytes``. Any cut
of a topologically ordered graph is correct: what crosses it (the residual stream, and values
shared by every block such as the attention mask and rotary tables) is kept in memory per window
and fed to the segments that read it, and dropped after its last reader.

Assumes the graph is topologically ordered (ONNX requires it; a model that is not is refused
with one line). Weights are not copied: a segment's session is built from a protobuf of headers
only, and ONNX Runtime borrows every weight array (``add_external_initializers``) -- a read-only
memory map of the input's own external data file, or the in-memory (or lazily widened) array --
for as long as the session lives. (Linking the input's data file into a scratch directory does not
work: ONNX Runtime resolves links and refuses a data file outside the model's directory.)

Each segment's session computes only what its taps and the later segments need: the graph's own
outputs are never computed (a tied lm_head would cost a transposed copy of the embedding).

Guarantees: each segment's taps equal the whole model's up to ONNX Runtime's float32 rounding of
fusions that a cut prevents (e.g. a norm fused with the residual Add before it); on the tiny
synthetic Llama they are bit-identical (tests).

Sequential (``requantized=True``, GPTQ-style calibration): once the consumer has rewritten a
segment (the block-wise compile quantizes it between two segments), the segment is run again, as
rewritten, over every window, and what later segments read from it is replaced by those outputs:
each segment is then observed on the outputs of the quantized model before it, not the float one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from lowbit.core.linear_sites import NORM_OPS
from lowbit.errors import LowbitError
from lowbit.ort.feeds import make_feed

__all__ = ["Segment", "Segmented", "model_weight_bytes", "split_segments"]

logger = logging.getLogger(__name__)

_INLINE_BYTES = 1024  # smaller constants are written into the segment's protobuf


@dataclass
class Segment:
    """Nodes in graph order, the non-constant values they read from outside (graph inputs or an
    earlier segment's outputs) and the values they produce that something after them reads."""

    nodes: list[ir.Node]
    reads: list[ir.Value]
    keeps: list[ir.Value]
    weight_bytes: int


def model_weight_bytes(model: ir.Model) -> int:
    """Weight bytes as the passes hold them: 16-bit float storage counts at float32 size (the
    canonicalization widens it, lazily; before it has run the model still stores float16)."""
    wide = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    return sum(v.const_value.nbytes * (2 if v.const_value.dtype in wide else 1)
               for v in model.graph.initializers.values() if v.const_value is not None)  # fmt: skip


def _node_reads(node: ir.Node) -> list[ir.Value]:
    """Values the node reads, outer-scope reads of its subgraphs included."""
    reads = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])  # fmt: skip
        for g in graphs:
            inner = {v for n in g.all_nodes() for v in n.outputs} | set(g.inputs)
            reads += [v for n in g.all_nodes() for v in n.inputs if v is not None and v not in inner]
    return reads


def _is_constant(value: ir.Value) -> bool:
    return value.is_initializer() and not value.is_graph_input()


def split_segments(model: ir.Model, budget_bytes: int) -> list[Segment] | None:
    """The segments (module doc), or None when the graph is not topologically ordered."""
    graph = model.graph
    nodes = list(graph)
    position = {node: i for i, node in enumerate(nodes)}
    produced_at: dict[ir.Value, int] = {}
    for i, node in enumerate(nodes):
        for v in node.outputs:
            produced_at[v] = i
    for i, node in enumerate(nodes):
        if any(produced_at.get(v, -1) >= i for v in _node_reads(node)):
            return None
    cuts = [0] + [i for i, n in enumerate(nodes) if (n.domain, n.op_type) in NORM_OPS and i > 0] + [len(nodes)]
    pieces = [nodes[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]

    def weights(piece: list[ir.Node]) -> int:
        seen = {v for n in piece for v in n.inputs if v is not None and _is_constant(v) and v.const_value is not None}
        return sum(v.const_value.nbytes for v in seen)

    merged: list[list[ir.Node]] = []
    for piece in pieces:
        if merged and weights(merged[-1]) + weights(piece) <= budget_bytes:
            merged[-1] = merged[-1] + piece
        else:
            merged.append(piece)
    last_read: dict[ir.Value, int] = {}  # observation never needs the graph's outputs (logits)
    for i, node in enumerate(nodes):
        for v in _node_reads(node):
            last_read[v] = max(last_read.get(v, -1), i)
    segments = []
    for piece in merged:
        end = position[piece[-1]]
        mine = {v for n in piece for v in n.outputs}
        reads = list(dict.fromkeys(v for n in piece for v in _node_reads(n) if v not in mine and not _is_constant(v)))
        keeps = [v for n in piece for v in n.outputs if last_read.get(v, -1) > end]
        segments.append(Segment(piece, reads, keeps, weights(piece)))
    return segments


def _needed(nodes: list[ir.Node], outputs: Sequence[ir.Value]) -> list[ir.Node]:
    """The nodes some output depends on, in order: ONNX Runtime would run the others too (e.g. a
    tied lm_head whose logits nobody observes: a transposed copy of the embedding and its GEMM)."""
    wanted, kept = set(outputs), []
    for node in reversed(nodes):
        if any(v in wanted for v in node.outputs):
            kept.append(node)
            wanted.update(_node_reads(node))
    return kept[::-1]


def _value_info(value: ir.Value, sample: np.ndarray | None) -> onnx.ValueInfoProto:
    """The value's declared type, else the type of what ONNX Runtime produced for it."""
    if value.type is None and sample is not None:
        value = ir.Value(name=value.name, type=ir.TensorType(ir.DataType.from_numpy(sample.dtype)),
                         shape=ir.Shape([None] * sample.ndim))  # fmt: skip
    elif value.type is None:
        value = ir.Value(name=value.name, type=ir.TensorType(ir.DataType.FLOAT), shape=value.shape)
    return ir.serde.serialize_value(value)


def _array(tensor: ir.TensorProtocol) -> np.ndarray | None:
    """The tensor as a numpy array ONNX Runtime can borrow: a read-only map of its external data
    file (nothing read until ORT touches it), or its in-memory array; None for element types
    numpy cannot hold (they are written into the protobuf)."""
    try:
        dtype = tensor.dtype.numpy()
    except TypeError:
        return None
    if dtype.kind not in "biuf":
        return None
    if isinstance(tensor, ir.ExternalTensor):
        shape = tuple(int(d) for d in tensor.shape)
        return np.memmap(tensor.path, dtype=dtype, mode="r", offset=tensor.offset or 0, shape=shape) if all(shape) else None
    return np.ascontiguousarray(tensor.numpy())


def _segment_model(model: ir.Model, seg: Segment, outputs: Sequence[ir.Value], samples: dict[str, np.ndarray],
                   ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:  # fmt: skip
    """A model of the segment's nodes (its reads are graph inputs, ``outputs`` its outputs) and
    the weights ONNX Runtime borrows for it by name: the protobuf holds only their headers."""
    graph = onnx.GraphProto(name="segment")
    nodes = _needed(seg.nodes, outputs)
    reads = list(dict.fromkeys(v for n in nodes for v in _node_reads(n)))
    graph.node.extend(ir.serde.serialize_node(n) for n in nodes)
    graph.input.extend(_value_info(v, samples.get(v.name)) for v in seg.reads if v in reads)
    graph.output.extend(_value_info(v, None) for v in outputs)
    borrowed: dict[str, np.ndarray] = {}
    for value in (v for v in reads if _is_constant(v)):
        tensor = value.const_value
        array = _array(tensor) if tensor.nbytes > _INLINE_BYTES else None
        if array is None:
            if isinstance(tensor, ir.ExternalTensor):  # a session from bytes cannot read a file
                tensor = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name)
            proto = ir.serde.serialize_tensor(tensor)
        else:
            proto = onnx.TensorProto(data_type=int(tensor.dtype), dims=list(array.shape), data_location=onnx.TensorProto.EXTERNAL)
            entry = proto.external_data.add()
            entry.key, entry.value = "location", "borrowed-from-session-options"
            borrowed[value.name] = array
        proto.name = value.name
        graph.initializer.append(proto)
    out = onnx.ModelProto(ir_version=model.ir_version, producer_name="lowbit.segment", graph=graph)
    for domain, version in model.opset_imports.items():
        entry = out.opset_import.add()
        entry.domain, entry.version = domain, version
    out.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return out, borrowed


def _rewritten(model: ir.Model, seg: Segment) -> Segment:
    """The segment as the graph holds it now: the nodes its kept values depend on, back to what
    it reads from outside (the rewrites inserted and replaced nodes but kept its boundary)."""
    boundary = {v.name for v in seg.reads}
    wanted, nodes = list(seg.keeps), set()
    while wanted:
        value = wanted.pop()
        node = value.producer()
        if value.name in boundary or node is None or node in nodes:
            continue
        nodes.add(node)
        wanted += [v for v in _node_reads(node) if not _is_constant(v)]
    return Segment([n for n in model.graph if n in nodes], seg.reads, seg.keeps, 0)


def _needs_native_ops(model: ir.Model, nodes: list[ir.Node]) -> bool:
    """Some node is a lowbit op with no function body in the model (a kernel of the native library)."""
    from lowbit.runtime_ext.functions import DOMAIN

    return any(n.domain == DOMAIN and (n.domain, n.op_type, n.overload) not in model.functions for n in nodes)


class _SegmentRun:
    def __init__(self, model: ir.Model, seg: Segment, outputs: list[ir.Value], cache: dict[int, dict[str, np.ndarray]],
                 graph_inputs: list) -> None:  # fmt: skip
        samples = next(iter(cache.values()), {})
        proto, self.borrowed = _segment_model(model, seg, outputs, samples)  # alive as long as the session
        opts = ort.SessionOptions()
        if _needs_native_ops(model, seg.nodes):  # a rewritten segment of the ort-cpu target
            from lowbit.runtime_ext.library import session_options

            session_options(opts)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as lowbit.ort.session
        opts.log_severity_level = 3
        if self.borrowed:
            opts.add_external_initializers(list(self.borrowed), [ort.OrtValue.ortvalue_from_numpy(a) for a in self.borrowed.values()])
        self.session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.reads = [i.name for i in self.session.get_inputs()]  # what the pruned segment reads
        self.names = [v.name for v in outputs]
        self.keeps = {v.name for v in seg.keeps}
        self.cache, self.graph_inputs = cache, graph_inputs
        self.nodes = seg.nodes
        self.windows: list = []  # every window run, in order (a sequential run replays them)

    def close(self) -> None:
        """Free the session and the weights it borrowed (every window has run)."""
        self.session = self.borrowed = None

    def __call__(self, window) -> dict[str, np.ndarray]:
        self.windows.append(window)
        known = self.cache.setdefault(window.index, {})
        missing = [n for n in self.reads if n not in known]
        feed = {n: known[n] for n in self.reads if n in known}
        if missing:  # graph inputs, built as every lowbit run builds them
            feed.update({k: v for k, v in make_feed(self.graph_inputs, window.ids).items() if k in missing})
        values = dict(zip(self.names, self.session.run(self.names, feed)))
        for name in self.keeps:
            known[name] = values[name]
        return values


class Segmented:
    """A :class:`lowbit.ort.observe.WindowRunner` that runs the model segment by segment (module
    doc). ``budget_bytes``: the weights merged into one segment at most (a piece that is larger on
    its own is its own segment). ``requantized``: later segments read each segment's outputs as
    rewritten by the consumer, not as the float model computed them (module doc, sequential)."""

    def __init__(self, budget_bytes: int, *, requantized: bool = False) -> None:
        self.budget_bytes = budget_bytes
        self.requantized = requantized
        self.sessions = 0
        self.segments = 0

    def subgraphs(self, model: ir.Model, taps: dict[str, ir.Value]) -> Iterator:
        segments = split_segments(model, self.budget_bytes)
        if segments is None:
            raise LowbitError("the model's nodes are not in topological order (ONNX requires it)")
        self.segments, self.sessions = len(segments), 0
        graph_inputs = [SimpleNamespace(name=v.name, type=_ort_type(v), shape=list(v.shape or [])) for v in model.graph.inputs]
        tap_values = set(taps.values())
        cache: dict[int, dict[str, np.ndarray]] = {}
        read_later = [{v.name for s in segments[i + 1:] for v in s.reads} for i in range(len(segments))]
        for i, seg in enumerate(segments):
            produced = {v for n in seg.nodes for v in n.outputs}
            outputs = list(dict.fromkeys([*seg.keeps, *(v for v in tap_values if v in produced)]))
            if not outputs:
                continue
            run = _SegmentRun(model, seg, outputs, cache, graph_inputs)
            self.sessions += 1
            logger.debug("segment %d/%d: %d nodes, %.0f MB of weights", i + 1, len(segments), len(seg.nodes), seg.weight_bytes / 2**20)
            yield run
            if self.requantized and seg.keeps and i + 1 < len(segments):
                self._rerun(model, seg, cache, graph_inputs, run.windows)
            del run
            for known in cache.values():  # values no later segment reads
                for name in [n for n in known if n not in read_later[i]]:
                    del known[name]

    def _rerun(self, model: ir.Model, seg: Segment, cache: dict[int, dict[str, np.ndarray]], graph_inputs: list,
               windows: list) -> None:  # fmt: skip
        """Run the segment as rewritten over ``windows``: its kept values in ``cache`` become the
        rewritten segment's outputs."""
        rerun = _SegmentRun(model, _rewritten(model, seg), list(seg.keeps), cache, graph_inputs)
        self.sessions += 1
        for window in windows:
            rerun(window)  # overwrites the window's kept values
        rerun.close()


_ORT_TYPES = {ir.DataType.FLOAT: "tensor(float)", ir.DataType.FLOAT16: "tensor(float16)",
              ir.DataType.INT64: "tensor(int64)", ir.DataType.INT32: "tensor(int32)"}  # fmt: skip


def _ort_type(value: ir.Value) -> str:
    """The ORT NodeArg type string of a graph input, what :func:`make_feed` reads."""
    return _ORT_TYPES.get(value.dtype, f"tensor({value.dtype})")
