"""FuseAttentionPass (lowbit.emit.attention) on SmolLM2's optimum KV-cache export: the fused graph
computes the export's function up to float32 rounding on a prompt, a decode step with the cache,
and a left-padded batch of two; blocks it cannot prove equal are kept and reported."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lowbit.core.context import CompileContext
from lowbit.core.recipe import load_recipe
from lowbit.emit.attention import FuseAttentionPass
from lowbit.passes.canonicalize import canonicalize_passes
from lowbit.passes.opset import output_opset

pytestmark = pytest.mark.slow
OPSET = output_opset("ort-cpu")  # Attention and RotaryEmbedding are opset 23

LAYERS, KV_HEADS, HEAD = 30, 3, 64
RTOL = 1e-5  # relative to the largest |output|: float32 reassociation only


@pytest.fixture(scope="module")
def graphs(smollm2_with_past_export, tmp_path_factory):
    """(path of the export after canonicalization, path of the same fused, the pass's report)."""
    root = tmp_path_factory.mktemp("attention")
    model = ir.load(smollm2_with_past_export / "model.onnx")
    for p in canonicalize_passes(target_opset=OPSET, report={}):
        p(model)
    before, after = _save(model, root / "before"), root / "after"
    ctx = _context(model)
    assert FuseAttentionPass(ctx)(model).modified
    return before, _save(model, after), ctx.report["attention"]


def _save(model: ir.Model, directory) -> str:
    directory.mkdir()
    ir.save(model, directory / "model.onnx", external_data="model.onnx.data")
    return str(directory / "model.onnx")


def _context(model: ir.Model) -> CompileContext:
    return CompileContext(model, load_recipe("w4a8-dint4", ["target=ort-cpu"]))


def _session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _feeds(ids, mask, positions, past):
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for i in range(LAYERS):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    return feeds


def _empty(batch):
    return [np.zeros((batch, KV_HEADS, 0, HEAD), np.float32)] * (2 * LAYERS)


def _close(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b) == 1 + 2 * LAYERS
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert np.abs(x.astype(np.float64) - y).max() <= RTOL * max(np.abs(x).max(), 1e-6)


def test_every_block_fused(graphs):
    _, after, report = graphs
    model = ir.load(after)
    ops = [n.op_type for n in model.graph]
    assert report["fused"] == LAYERS and not report["kept"]
    assert ops.count("Attention") == LAYERS and ops.count("RotaryEmbedding") == 2 * LAYERS
    assert all(n.domain == "" for n in model.graph if n.op_type in ("Attention", "RotaryEmbedding"))
    assert "Softmax" not in ops and "Expand" not in ops[ops.index("Attention"):]
    assert report["nodes_after"] < report["nodes_before"] - 40 * LAYERS
    outputs = [v.name for v in model.graph.outputs]
    assert outputs[0] == "logits" and outputs[1:3] == ["present.0.key", "present.0.value"]


def test_prompt_then_decode_match_the_export(graphs):
    before, after, _ = graphs
    a, b = _session(before), _session(after)
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 40000, (1, 11))
    mask, positions = np.ones((1, 11), np.int64), np.arange(11)[None]
    ra, rb = a.run(None, _feeds(ids, mask, positions, _empty(1))), b.run(None, _feeds(ids, mask, positions, _empty(1)))
    _close(ra, rb)
    step = np.array([[int(ra[0][0, -1].argmax())]])
    mask, positions = np.ones((1, 12), np.int64), np.array([[11]])
    _close(a.run(None, _feeds(step, mask, positions, ra[1:])), b.run(None, _feeds(step, mask, positions, ra[1:])))


def test_left_padded_batch_matches_on_real_tokens(graphs):
    before, after, _ = graphs
    a, b = _session(before), _session(after)
    ids = np.random.default_rng(1).integers(100, 40000, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :4] = 0  # the second row is left-padded
    positions = np.where(mask == 1, np.cumsum(mask, 1) - 1, 1)
    ra, rb = a.run(None, _feeds(ids, mask, positions, _empty(2))), b.run(None, _feeds(ids, mask, positions, _empty(2)))
    scale = np.abs(ra[0]).max()
    assert np.abs(ra[0][0] - rb[0][0]).max() <= RTOL * scale
    assert np.abs(ra[0][1, 4:] - rb[0][1, 4:]).max() <= RTOL * scale  # padding rows are read by no token
    assert np.isfinite(rb[0]).all()
    step, mask = np.array([[5], [7]]), np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    da = a.run(None, _feeds(step, mask, positions[:, -1:] + 1, ra[1:]))
    db = b.run(None, _feeds(step, mask, positions[:, -1:] + 1, rb[1:]))
    assert np.abs(da[0] - db[0]).max() <= RTOL * np.abs(da[0]).max()


def test_unmatched_blocks_are_kept_with_a_reason(graphs):
    """A block whose mask is not the export's Where(m, 0, -inf) is left alone and reported."""
    before, _, _ = graphs
    model = ir.load(before)
    where = next(n for n in model.graph if n.op_type == "Where" and n.name.startswith("/model/layers.3/self_attn"))
    minus = ir.tensor(np.array([-1e4], np.float32))
    where.replace_input_with(2, ir.Value(name="minus_1e4", type=ir.TensorType(ir.DataType.FLOAT),
                                         shape=ir.Shape([1]), const_value=minus))
    model.graph.register_initializer(where.inputs[2])
    ctx = _context(model)
    FuseAttentionPass(ctx)(model)
    report = ctx.report["attention"]
    assert report["fused"] == LAYERS - 1
    assert report["kept"] == {"the mask is not Where(m, 0, -inf or the float32 minimum)": 1}


# -- the synthetic decoders (models/synthetic_llm.py): fast, with and without a KV cache ------------


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """{with_past: (path before, path fused, report)} for the tiny synthetic decoder."""
    from lowbit.models.synthetic_llm import write_decoder

    root, out = tmp_path_factory.mktemp("attention-tiny"), {}
    for with_past in (False, True):
        src = write_decoder("tiny", root / f"src-{with_past}", progress=False, with_past=with_past)
        model = ir.load(src / "model.onnx")
        for p in canonicalize_passes(target_opset=OPSET, report={}):
            p(model)
        before = _save(model, root / f"before-{with_past}")
        ctx = _context(model)
        FuseAttentionPass(ctx)(model)
        out[with_past] = before, _save(model, root / f"after-{with_past}"), ctx.report["attention"]
    return out


@pytest.mark.parametrize("with_past", [False, True])
def test_tiny_decoder_fused_and_equal(tiny_pair, with_past):
    before, after, report = tiny_pair[with_past]
    assert report["fused"] == 2 and not report["kept"]
    a, b = _session(before), _session(after)
    inputs = {i.name: i for i in a.get_inputs()}
    ids = np.random.default_rng(2).integers(5, 40000, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if with_past:
        kv, head = inputs["past_key_values.0.key"].shape[1], inputs["past_key_values.0.key"].shape[3]
        feeds["position_ids"] = np.where(mask == 1, np.cumsum(mask, 1) - 1, 1)
        feeds |= {n: np.zeros((2, kv, 0, head), np.float32) for n in inputs if n.startswith("past_key_values")}
    ra, rb = a.run(None, feeds), b.run(None, feeds)
    scale = np.abs(ra[0]).max()
    assert np.abs(ra[0][0] - rb[0][0]).max() <= RTOL * scale and np.abs(ra[0][1, 3:] - rb[0][1, 3:]).max() <= RTOL * scale
    for x, y in zip(ra[1:], rb[1:]):  # the caches, at the real tokens (padding rows are read by none)
        tol = RTOL * max(np.abs(x).max(), 1e-6)
        assert np.abs(x[0] - y[0]).max() <= tol and np.abs(x[1, :, 3:] - y[1, :, 3:]).max() <= tol
    assert {n.op_type for n in ir.load(after).graph} >= {"Attention", "RotaryEmbedding"}


def test_below_opset_23_every_block_is_kept(smollm2_with_past_export):
    """At the qdq targets' opset 21 there is no standard Attention: nothing changes, the report says why."""
    model = ir.load(smollm2_with_past_export / "model.onnx")
    for p in canonicalize_passes(report={}):  # opset 21
        p(model)
    before = len(model.graph)
    ctx = _context(model)
    assert not FuseAttentionPass(ctx)(model).modified
    assert len(model.graph) == before
    assert ctx.report["attention"]["kept"] == {"the model's opset 21 has no Attention (opset 23)": LAYERS}
