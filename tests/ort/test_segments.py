"""lowbit.ort.segments: a model run segment by segment gives every tap exactly what the whole
model gives, reads its weights in place, and keeps only what crosses a cut."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.compiler.api import load_onnx
from lowbit.core.linear_sites import NORM_OPS, find_linear_sites
from lowbit.errors import LowbitError
from lowbit.models.synthetic_llm import write_decoder
from lowbit.ort.observe import WholeModel, Window
from lowbit.ort.segments import Segmented, _segment_model, split_segments
from lowbit.passes.canonicalize import canonicalize_passes


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny synthetic Llama (rotary, GQA, causal mask, tied head; external weights)."""
    return write_decoder("tiny", tmp_path_factory.mktemp("seg") / "tiny", progress=False)


def _canonical(directory) -> ir.Model:
    model = load_onnx(directory / "model.onnx")
    for p in canonicalize_passes():
        p(model)
    return model


@pytest.fixture(scope="module")
def canonical(tiny_dir) -> ir.Model:
    return _canonical(tiny_dir)


def _site_taps(model: ir.Model) -> dict[str, ir.Value]:
    taps = {}
    for i, group in enumerate(find_linear_sites(model.graph).input_groups()):
        x = group[0].input
        x.name = x.name or f"tap{i}"
        taps[x.name] = x
    return taps


def _run(runner, model, taps, windows) -> dict:
    out = {}
    for run in runner.subgraphs(model, taps):
        for w in windows:
            out.update({(w.index, k): v for k, v in run(w).items() if k in taps})
    return out


def test_segmented_taps_equal_the_whole_model(canonical):
    taps = _site_taps(canonical)
    rng = np.random.default_rng(0)
    windows = [Window(0, rng.integers(0, 49152, 16)), Window(1, rng.integers(0, 49152, 9), probe=True)]
    whole = _run(WholeModel(), canonical, taps, windows)
    runner = Segmented(budget_bytes=1)  # every norm starts a segment
    cut = _run(runner, canonical, taps, windows)
    norms = sum((n.domain, n.op_type) in NORM_OPS for n in canonical.graph)
    assert runner.segments == norms + 1  # the embedding, then one per norm
    assert set(cut) == set(whole) and len(whole) == 2 * len(taps)
    for key, value in whole.items():
        np.testing.assert_array_equal(cut[key], value)


def test_cuts_carry_only_the_residual_stream_and_shared_values(canonical):
    segments = split_segments(canonical, budget_bytes=1)
    residual = [s.keeps for s in segments[1:-1]]
    # a block half hands on one value (its residual sum); the first hands on what every block
    # shares as well (mask, rotary tables) -- a handful of values, not the block's insides
    assert all(len(k) == 1 for k in residual[1:])
    assert 1 <= len(segments[0].keeps) <= 6
    assert all(len(s.reads) <= 8 for s in segments)


def test_segment_weights_are_borrowed_from_the_input_file(canonical):
    seg = max(split_segments(canonical, budget_bytes=1)[1:-1], key=lambda s: s.weight_bytes)  # an MLP half
    proto, borrowed = _segment_model(canonical, seg, seg.keeps, {})
    assert borrowed and all(isinstance(a, np.memmap) for a in borrowed.values())  # mapped, not read
    assert proto.ByteSize() < 64 << 10  # headers only
    for name, array in borrowed.items():
        np.testing.assert_array_equal(array, canonical.graph.initializers[name].const_value.numpy())


def test_budget_merges_pieces(canonical):
    assert len(split_segments(canonical, budget_bytes=1 << 40)) == 1
    small = split_segments(canonical, budget_bytes=1)
    mid = split_segments(canonical, budget_bytes=2 * max(s.weight_bytes for s in small[1:-1]))
    assert 1 < len(mid) < len(small)


def test_unsorted_graph_is_refused(canonical):
    model = ir.from_proto(ir.to_proto(canonical))
    nodes = list(model.graph)
    model.graph.remove(nodes[0])
    model.graph.append(nodes[0])  # the embedding Gather after its readers
    assert split_segments(model, 1) is None
    with pytest.raises(LowbitError, match="topological"):
        next(Segmented(1).subgraphs(model, _site_taps(model)))


def test_nodes_no_output_needs_are_not_run(canonical):
    """The head segment observed for its norm output only: the tied lm_head (Transpose of the
    embedding, MatMul) is left out, so ONNX Runtime neither copies the table nor computes logits."""
    last = split_segments(canonical, budget_bytes=1)[-1]
    assert last.keeps == []  # the graph's logits are not needed by observation
    norm_out = last.nodes[0].outputs[0]
    proto, borrowed = _segment_model(canonical, last, [norm_out], {})
    assert [n.op_type for n in proto.graph.node] == [last.nodes[0].op_type]
    assert not any("embed" in name for name in borrowed)


def _scale_activations(model: ir.Model, nodes: list[ir.Node]) -> None:
    """A stand-in for quantizing a segment: every MatMul's activation input goes through a new Mul."""
    for node in [n for n in nodes if n.op_type == "MatMul" and n.inputs[1].is_initializer()]:
        half = ir.Value(name=f"{node.name}.half", const_value=ir.tensor(np.float32(0.5), name=f"{node.name}.half"))
        model.graph.register_initializer(half)
        mul = ir.node("Mul", [node.inputs[0], half], name=f"{node.name}.mul")
        model.graph.insert_before(node, mul)
        node.replace_input_with(0, mul.outputs[0])


@pytest.mark.parametrize("requantized", [True, False])
def test_requantized_segments_read_the_rewritten_model_before_them(canonical, tiny_dir, requantized):
    """Sequential calibration: each segment's taps are what the model, rewritten up to that
    segment, computes -- the float model's when not requantized."""
    model = _canonical(tiny_dir)
    taps = _site_taps(model)
    windows = [Window(0, np.random.default_rng(1).integers(0, 49152, 16))]
    seen: dict = {}
    runner = Segmented(budget_bytes=1, requantized=requantized)
    for run in runner.subgraphs(model, taps):
        seen.update({k: v for k, v in run(windows[0]).items() if k in taps})
        run.close()
        _scale_activations(model, run.nodes)  # the consumer rewrites the segment it just observed
    assert runner.sessions == (2 * runner.segments - 1 if requantized else runner.segments)  # the head is not rerun
    rewritten = _run(WholeModel(), model, taps, windows)
    floats = _run(WholeModel(), canonical, taps, windows)
    moved = [k for k in taps if not np.array_equal(seen[k], floats[(0, k)])]
    # all but the first attention half's two inputs (q/k/v and o_proj), observed before any rewrite
    assert len(moved) == (len(taps) - 2 if requantized else 0)
    # a segment's inputs (its norm's output) are what the model rewritten up to it computes (a
    # tap after a rewritten node of its own segment was observed before the rewrite, as it must be)
    inputs = [k for k, v in taps.items() if (v.producer().domain, v.producer().op_type) in NORM_OPS]
    assert len(inputs) == 2 * 2 + 1  # two per layer, and the final norm (the head's input)
    for name in inputs:
        np.testing.assert_allclose(seen[name], (rewritten if requantized else floats)[(0, name)], rtol=1e-5, atol=1e-6)
