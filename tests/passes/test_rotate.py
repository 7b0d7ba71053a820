"""Rotations (R1 residual stream, R2 per head, online Hadamard) preserve the model's function,
and say what they did or why not.

Tolerance: the issue's 1e-4 of the largest logit. Rotating by Q and back reassociates float32
sums of hidden-size length; measured ~3e-6 on SmolLM2, while a wrong rotation moves logits by O(1).
"""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from lowbit.compiler.api import compile as lowbit_compile
from lowbit.compiler.api import load_onnx
from lowbit.compiler.report import render_markdown
from lowbit.core.context import CompileContext
from lowbit.core.recipe import load_recipe
from lowbit.errors import LowbitError
from lowbit.models.synthetic_llm import SHAPES, write_decoder
from lowbit.ort.feeds import build_feeds
from lowbit.ort.session import ort_session, run_on_tokens
from lowbit.passes.canonicalize import canonicalize_passes
from lowbit.passes.rotate_heads import RotateHeadsPass
from lowbit.passes.rotate_online import RotateOnlinePass
from lowbit.passes.rotate_residual import RotateResidualPass

RTOL = 1e-4
ALL = ("rotate.residual=true", "rotate.heads=true", 'rotate.online=["gated_linear", "attention_qk"]')


def _rel(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(a).max())


def _rotated(path, *overrides):
    model = load_onnx(path / "model.onnx")
    for p in canonicalize_passes():
        p(model)
    ctx = CompileContext(model, load_recipe("w4a8-dint4", list(overrides)))
    reference = ort_session(model)
    for cls in (RotateResidualPass, RotateHeadsPass, RotateOnlinePass):
        cls(ctx)(model)
    return reference, ort_session(model), model, ctx.report["rotate"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rotate")
    qwen = replace(SHAPES["tiny"], name="tiny-qwen", family="qwen2", qkv_bias=True, tied=False)
    return {"llama": write_decoder("tiny", root / "llama", progress=False),
            "qwen": write_decoder(qwen, root / "qwen", progress=False)}


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_rotations_preserve_tiny_decoders(tiny_dirs, family):
    before, after, model, report = _rotated(tiny_dirs[family], *ALL)
    ids = np.random.default_rng(0).integers(5, 40000, (2, 24))
    for a, b in zip(before.run(None, build_feeds(before, ids)), after.run(None, build_feeds(after, ids))):
        assert _rel(a, b) < RTOL
    assert report["residual"]["rotated"] and report["residual"]["writers"] == 2 * 2
    # the shipped recipe keeps the tied head (llama) on its table, behind a float bridge
    assert report["residual"]["tied_head_bridge"] == (family == "llama") and not report["residual"]["untied_head"]
    assert report["residual"]["matrix"] == "hadamard 1 x 64"
    # Qwen's v_proj bias is rotated with its columns: its heads, Q and K are rotated as Llama's
    attentions = 2
    assert report["heads"]["rotated_groups"] == attentions
    assert report["online"]["rotated"][:2] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(report["online"]["rotated"]) == 2 + attentions and not report["online"]["skipped"]
    hadamards = Counter(n.overload for n in model.graph if n.op_type == "Hadamard")
    # 96 = 12 x 8 before down_proj; Q and K over the head size 16
    assert hadamards == ({"n96": 2, "n16": 4} if attentions else {"n96": 2})
    norms = [n for n in model.graph if "RMSNormalization" in n.op_type]
    assert all(np.all(n.inputs[1].const_value.numpy() == 1) for n in norms)  # gammas folded away


@pytest.mark.parametrize("sliced", [False, True])
def test_rotations_of_a_large_model_defer_or_spill_what_they_rewrite(tiny_dirs, tmp_path, sliced, monkeypatch):
    """With a spill (a model too large to hold twice), no weight a rotation rewrites is held in
    memory when the passes end: the block weights' rewrites are deferred to their reads (nothing
    on disk either: 32 GB of float32 at 8B) and give the eager rotations' bytes -- also where R1
    rotates a wide reader a slice of columns at a time (an 8B gate/up_proj) --, the table is on
    disk, and the function is the same."""
    import onnx_ir as ir

    from lowbit.core.tensor_spill import TensorSpill
    from lowbit.passes import rotate_residual

    if sliced:
        monkeypatch.setattr(rotate_residual, "_SLICE_BYTES", 8 * 64 * 40)  # 40 columns per product

    def rotated(spill: bool):
        model = load_onnx(tiny_dirs["llama"] / "model.onnx")
        for p in canonicalize_passes():
            p(model)
        ctx = CompileContext(model, load_recipe("w4a8-dint4", list(ALL)))
        if spill:
            ctx.spill = TensorSpill(tmp_path, min_bytes=1)
        reference = ort_session(model)
        for cls in (RotateResidualPass, RotateHeadsPass, RotateOnlinePass):
            cls(ctx)(model)
        return ctx, model, reference

    ctx, model, reference = rotated(spill=True)
    assert ctx.defer_rewrites
    table = model.graph.initializers["model.embed_tokens.weight"]
    assert isinstance(table.const_value, ir.ExternalTensor) and table.const_value.base_dir == tmp_path
    blocks = [s for s in ctx.sites if s.weight is not table]  # the tied head reads the table
    assert len(blocks) == 14 and all(isinstance(s.weight.const_value, ir.LazyTensor) for s in blocks)
    eager_ctx, eager, _ = rotated(spill=False)
    for site, eager_site in zip(ctx.sites, eager_ctx.sites):
        assert site.weight.const_value.tobytes() == eager_site.weight.const_value.tobytes(), site.name
    ids = np.arange(5, 29)[None]
    after = ort_session(model)
    assert _rel(reference.run(None, build_feeds(reference, ids))[0], after.run(None, build_feeds(after, ids))[0]) < RTOL


def test_wide_readers_are_rotated_a_slice_of_columns_at_a_time(tiny_dirs, monkeypatch):
    """An untied head (Llama-3-8B's: 4 GB in float64 whole) is rotated a slice of its output
    columns at a time, in either stored layout: the same weights as one product, to float32
    rounding, and the same function."""
    from lowbit.passes import rotate_residual

    _, _, whole, _ = _rotated(tiny_dirs["qwen"], "rotate.residual=true")
    monkeypatch.setattr(rotate_residual, "_SLICE_BYTES", 8 * 64 * 100)  # 100 columns of hidden 64
    before, after, sliced, report = _rotated(tiny_dirs["qwen"], "rotate.residual=true")
    assert sliced.graph.initializers["lm_head.weight"].const_value.shape == (64, 49152)  # 492 slices of its columns
    for name, value in whole.graph.initializers.items():
        np.testing.assert_allclose(sliced.graph.initializers[name].const_value.numpy(), value.const_value.numpy(),
                                   rtol=0, atol=1e-6, err_msg=name)  # fmt: skip
    ids = np.random.default_rng(2).integers(5, 40000, (1, 16))
    assert _rel(before.run(None, build_feeds(before, ids))[0], after.run(None, build_feeds(after, ids))[0]) < RTOL


def test_a_transposed_wide_reader_is_sliced_in_its_own_layout(monkeypatch):
    """A weight stored [N, K] (a Gemm with transB, torch's Linear layout) is written back [N, K]."""
    import onnx_ir as ir

    from lowbit.core.linear_sites import LinearSite
    from lowbit.passes import rotate_residual
    from lowbit.runtime_ext.hadamard import rotation

    rng = np.random.default_rng(4)
    w_nk = rng.normal(0, 1, (300, 64)).astype(np.float32)
    gamma, rot = rng.uniform(0.5, 2, 64), rotation(64, 0)
    site = LinearSite(None, ir.Value(name="w", const_value=ir.tensor(w_nk, name="w")), (), 1, "w")
    monkeypatch.setattr(rotate_residual, "_SLICE_BYTES", 8 * 64 * 100)
    rotate_residual._rotate_reader(site, gamma, rot)
    expected = (rot.matrix.T @ (gamma[:, None] * w_nk.T.astype(np.float64))).T
    np.testing.assert_allclose(site.weight.const_value.numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_a_float16_table_is_rotated_from_its_source_not_a_widened_copy(tmp_path, monkeypatch, tied):
    """A float16-stored model: R1 reads the table's rows (and an untied head's columns) from the
    float16 source a chunk at a time (an 8B table is 2 GB widened), and writes what rotating the
    widened table writes."""
    from lowbit.core.float_types import widened_source
    from lowbit.passes import rotate_residual

    shape = replace(SHAPES["tiny"], name="tiny-untied", tied=False) if not tied else "tiny"
    directory = write_decoder(shape, tmp_path / "fp16", dtype="float16", progress=False)
    rotated = {}
    for chunked in (True, False):
        model = load_onnx(directory / "model.onnx")
        for p in canonicalize_passes():
            p(model)
        table = model.graph.initializers["model.embed_tokens.weight"].const_value
        assert widened_source(table) is not None  # lazily widened
        with monkeypatch.context() as m:
            m.setattr(rotate_residual, "_SLICE_BYTES", 8 * 64 * 1000)  # the untied head: 50 slices
            if not chunked:  # the whole widened table and head, as before
                m.setattr(rotate_residual, "_rows_of", lambda tensor: tensor.numpy())
            RotateResidualPass(CompileContext(model, load_recipe("w4a8-dint4", ["rotate.residual=true"])))(model)
        rotated[chunked] = {n: v.const_value.numpy() for n, v in model.graph.initializers.items()}
    assert rotated[True].keys() == rotated[False].keys()
    for name, array in rotated[True].items():
        np.testing.assert_array_equal(array, rotated[False][name], err_msg=name)


def test_each_rotation_alone_preserves_function(tiny_dirs):
    ids = np.random.default_rng(1).integers(5, 40000, 16)
    for one in (*ALL[:2], 'rotate.online=["gated_linear"]', 'rotate.online=["attention_qk"]'):
        before, after, _, report = _rotated(tiny_dirs["llama"], one)
        assert _rel(before.run(None, build_feeds(before, ids))[0], after.run(None, build_feeds(after, ids))[0]) < RTOL


def test_npu_target_refuses_online_rotation():
    with pytest.raises(LowbitError, match="rotate.online.*standard ops"):
        load_recipe("npu-w8a8", ['rotate.online=["gated_linear"]'])
    assert load_recipe("npu-w8a8", ["rotate.residual=true", "rotate.heads=true"]).rotate.residual
    with pytest.raises(LowbitError, match="rotate.online"):
        load_recipe("w4a8-dint4", ['rotate.online=["attention_v"]'])


def test_compiled_rotated_model_runs_and_verifies(tiny_dirs):
    # --verify checks every rotation pass numerically inside the pipeline
    result = lowbit_compile(tiny_dirs["llama"], "w4a8-dint4", verify=True,
                            overrides=[*ALL, "calibration.windows=2", "calibration.seq_len=32", "calibration.slac_windows=1"])
    passes = {p["pass"]: p for p in result.report["passes"]}
    for name in ("RotateResidualPass", "RotateHeadsPass", "RotateOnlinePass"):
        assert passes[name]["modified"] and passes[name]["verified_rel_diff"] < RTOL
    ids = np.arange(5, 37)
    assert np.isfinite(run_on_tokens(result.model, ids)[0]).all()
    md = render_markdown(result.report)
    assert "## Rotations" in md and ("- R1 residual stream: rotated by hadamard 1 x 64 (4 writers, 5 norms folded, "
                                     "LM head kept tied behind a float hidden x hidden MatMul)") in md
    assert "- online Hadamard (gated_linear, attention_qk): 4 places" in md


def test_npu_target_keeps_weight_only_rotations_in_standard_ops(tiny_dirs):
    result = lowbit_compile(tiny_dirs["llama"], "npu-w8a8", verify=True,
                            overrides=["rotate.residual=true", "rotate.heads=true", "calibration.windows=2",
                                       "calibration.seq_len=32", "calibration.slac_windows=1"])  # fmt: skip
    assert result.report["rotate"]["residual"]["rotated"] and result.report["rotate"]["heads"]["rotated_groups"] == 2
    # no lowbit op: only norm fusion's model-local RMSNormalization function of this opset-18 model
    assert {(n.domain, n.op_type) for n in result.model.graph if n.domain not in ("", "ai.onnx")} == {
        ("lowbit", "RMSNormalization")}
    assert np.isfinite(run_on_tokens(result.model, np.arange(5, 37))[0]).all()


@pytest.mark.slow
def test_smollm2_rotations_preserve_logits(smollm2_export, calib_windows):
    before, after, model, report = _rotated(smollm2_export, *ALL)
    ids = np.asarray(calib_windows[0][:64])
    assert _rel(before.run(None, build_feeds(before, ids))[0], after.run(None, build_feeds(after, ids))[0]) < RTOL
    assert report["residual"] == {"rotated": True, "hidden": 576, "matrix": "hadamard 36 x 16", "writers": 60,
                                  "norms": 61, "readers": 151, "untied_head": False, "tied_head_bridge": True}
    assert report["heads"]["rotated_groups"] == 30 and len(report["online"]["rotated"]) == 60
    tables = [v for v in model.graph.initializers.values() if v.const_value.shape == (49152, 576)]
    assert len(tables) == 1  # the lookup and the int8 head read one (rotated) table


def _decode_two_steps(session, prompt, next_id):
    """Logits of a prefill and of one decode step fed the prefill's own KV cache."""
    feeds = build_feeds(session, prompt)
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    step = build_feeds(session, np.array([next_id]))
    for name in list(step):
        if name.startswith("past_key_values"):
            step[name] = outs[name.replace("past_key_values", "present")]
    step["attention_mask"] = np.ones((1, prompt.size + 1), np.int64)
    if "position_ids" in step:
        step["position_ids"] = np.array([[prompt.size]], np.int64)
    return outs["logits"], session.run(["logits"], step)[0]


@pytest.mark.slow
def test_smollm2_with_past_rotated_cache_decodes_the_same(smollm2_with_past_export, calib_windows):
    before, after, _, report = _rotated(smollm2_with_past_export, *ALL)
    prompt = np.asarray(calib_windows[1][:40])
    for a, b in zip(_decode_two_steps(before, prompt, 1234), _decode_two_steps(after, prompt, 1234)):
        assert _rel(a, b) < RTOL
    assert report["heads"]["rotated_groups"] == 30  # the cache holds rotated V


@pytest.mark.slow
def test_minilm_says_what_applies(minilm_export):
    before, after, _, report = _rotated(minilm_export, *ALL)
    ids = np.random.default_rng(0).integers(1000, 20000, (1, 40))
    assert _rel(before.run(None, build_feeds(before, ids))[0], after.run(None, build_feeds(after, ids))[0]) < RTOL
    assert not report["residual"]["rotated"] and "LayerNorm" in report["residual"]["reason"]
    # R2 and Q/K need no norm: every layer's V heads rotate, BERT's v_proj bias with them, and
    # each attention's Q and K (no gated MLP: nothing before a down_proj)
    assert report["heads"]["rotated_groups"] == 6 and not report["heads"]["skipped"]
    assert len(report["online"]["rotated"]) == 6 and not report["online"]["skipped"]
