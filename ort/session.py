"""Run an in-memory ``onnx_ir`` model in ONNX Runtime (optionally exposing inner values).

Always goes through a temporary file with external data, so models over 2 GB work too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from lowbit.files.scratch import scratch_dir

__all__ = ["ort_session", "run_on_tokens"]


def ort_session(model: ir.Model, extra_outputs: Iterable[ir.Value] = (), *, outputs_only: bool = False,
                session_options: ort.SessionOptions | None = None) -> ort.InferenceSession:  # fmt: skip
    """A CPU session over ``model`` whose outputs are the graph outputs plus ``extra_outputs``
    (with ``outputs_only``: ``extra_outputs`` alone, so ORT drops every node that feeds only the
    graph outputs, e.g. a tied lm_head -- what an observation run that reads taps wants; ORT
    itself keeps and runs such nodes. SmolLM2, 512 tokens: 1.50 vs 1.75 s CPU per window).

    The model is left exactly as it was (outputs are changed only while serializing).
    Without ``session_options``, ORT's worker threads do not spin after a run: every caller here
    does numpy work between runs, and on 2 cores the spinning threads took a third of the BLAS
    time of calibration's X^T X (SmolLM2: 0.76 vs 0.56 s per window, ORT's run time unchanged).
    """
    graph = model.graph
    original = list(graph.outputs)
    wanted = list(dict.fromkeys(extra_outputs))
    added = wanted if outputs_only else [v for v in wanted if v not in original]
    for v in added:
        if v.type is None:
            v.type = ir.TensorType(ir.DataType.FLOAT)
    if outputs_only:
        graph.outputs.clear()
    graph.outputs.extend(added)
    try:
        with scratch_dir("ort-") as tmp:  # removed even when the run is killed (the next run sweeps it)
            path = tmp / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            if outputs_only:
                _prune_to_outputs(path)
            opts = session_options
            if opts is None:
                opts = ort.SessionOptions()
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.log_severity_level = 3
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    finally:
        graph.outputs.clear()
        graph.outputs.extend(original)


def _prune_to_outputs(path: Path) -> None:
    """Drop the nodes of the saved model that no graph output depends on (ORT keeps them and runs
    them). Works on the small protobuf only: the weights stay in the external data file, and the
    initializers nothing reads any more are left for ORT to skip."""
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_reads(node))
    if len(kept) == len(graph.node):
        return
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    onnx.save(proto, str(path))


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every value name read inside the node's subgraphs (outer-scope reads among them)."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in g.node:
                names.update(inner.input)
                names.update(_subgraph_reads(inner))
    return names


def run_on_tokens(model: ir.Model, ids, *, as_written: bool = False) -> list:
    """All graph outputs of ``model`` for one token window (feeds built from its inputs).

    ``as_written``: at ORT_ENABLE_BASIC, below the level of ORT's QDQ fusions, which rewrite
    some quantized patterns into kernels that compute something else (lowbit.emit.fusion_barrier).
    """
    from lowbit.ort.feeds import build_feeds

    options = None
    if as_written:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort_session(model, session_options=options)
    return session.run(None, build_feeds(session, ids))
