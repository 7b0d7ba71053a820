"""lowbit.compiler.blockwise: a model compiled block by block is the model the whole-model
pipeline writes, byte for byte, and memory is released block by block."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lowbit.compiler.api import compile as lowbit_compile
from lowbit.core import tensor_spill
from lowbit.models.synthetic_llm import write_decoder
from lowbit.ort import observe as observation

SMALL_CALIBRATION = ("calibration.windows=2", "calibration.seq_len=32", "calibration.slac_windows=1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_decoder("tiny", tmp_path_factory.mktemp("blockwise") / "tiny", progress=False)


def _compile(source: Path, recipe: str, *, blockwise: bool, monkeypatch):
    recipe, _, target = recipe.partition("@")  # "recipe@target"
    with monkeypatch.context() as m:
        if blockwise:  # the tiny model counts as large, every norm starts a block, every rewrite is spilled
            m.setattr(observation, "WHOLE_MODEL_BYTES", 0)
            m.setattr(observation, "SEGMENT_BYTES", 1)
            m.setattr(tensor_spill, "MIN_BYTES", 1)
        return lowbit_compile(source, recipe, target=target or None, overrides=SMALL_CALIBRATION)


def _weights(model: ir.Model) -> dict[str, bytes]:
    return {name: v.const_value.tobytes() for name, v in model.graph.initializers.items()}


@pytest.mark.parametrize("recipe", ["w8a8-rptq", "w4a8-dint4", "w8a8-smooth", "w4a8-dint4@ort-cpu"])
def test_blockwise_output_equals_whole_model_output(tiny_dir, recipe, monkeypatch, holes_supported):
    whole = _compile(tiny_dir, recipe, blockwise=False, monkeypatch=monkeypatch)
    block = _compile(tiny_dir, recipe, blockwise=True, monkeypatch=monkeypatch)
    assert "blockwise" not in whole.report and block.report["blockwise"]["segments"] > 4
    if recipe.startswith("w4a8-dint4") and holes_supported:  # spilled tensors that later
        assert block.report["blockwise"]["reclaimed_bytes"] > 0  # rewrites replaced were punched out, unread since
    assert _weights(block.model) == _weights(whole.model)
    assert Counter((n.domain, n.op_type) for n in block.model.graph) == Counter((n.domain, n.op_type) for n in whole.model.graph)
    for section in ("sites", "smooth", "reorder", "optq", "capture", "calibration", "slac", "ort_cpu", "merged_matmuls"):
        assert (section in block.report) == (section in whole.report)
        if section in ("sites", "calibration", "slac", "ort_cpu", "merged_matmuls") and section in whole.report:
            assert block.report[section] == whole.report[section], section
    assert block.report["observation"]["runs"] == 1


def test_blockwise_spills_and_drops_as_it_goes(tiny_dir, tmp_path, monkeypatch):
    compiled = _compile(tiny_dir, "w4a8-dint4", blockwise=True, monkeypatch=monkeypatch)
    info = compiled.report["blockwise"]
    assert info["dropped_initializers"] >= 7 * 2 and info["spilled_bytes"] > 0
    assert info["materialized_bytes"] > 0  # deferred rotations, computed once per block
    assert len(info["resident_mb"]) == info["segments"]
    assert set(info["passes"]) == {"MaterializeDeferred", "SmoothPass", "ReorderPass", "OptqPass", "EncodeWeightsPass", "EmitQDQPass"}
    in_memory = [n for n, v in compiled.model.graph.initializers.items()
                 if not isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes >= 64 << 10]  # fmt: skip
    # codes and scales went to the spill file as each block finished; the int8 embedding's row
    # scales (4 bytes per vocabulary entry) are written after the blocks, by a whole-model step
    assert in_memory == ["model.embed_tokens.weight.row_scale"]
    out = compiled.save(tmp_path / "out")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.arange(12, dtype=np.int64)[None]
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert np.isfinite(logits).all()


def test_optq_reads_rewritten_weights_from_the_spill_file(tiny_dir, monkeypatch):
    """Block by block, the weights that smoothing or the reorder rewrote in memory are spilled
    before OPTQ, which then reads them a slice at a time: none is an in-memory array there."""
    from lowbit.encode import optq

    kinds = []

    class Recording(optq.KnColumns):
        def __init__(self, sites):
            kinds.extend(type(s.weight.const_value).__name__ for s in sites)
            super().__init__(sites)

    monkeypatch.setattr(optq, "KnColumns", Recording)
    _compile(tiny_dir, "w8a8-rptq", blockwise=True, monkeypatch=monkeypatch)
    assert kinds and set(kinds) <= {"ExternalTensor", "LazyTensor"}


def test_recipe_with_a_model_wide_step_runs_whole(tiny_dir, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        compiled = _compile(tiny_dir, "fgmp-nvfp4-fp8", blockwise=True, monkeypatch=monkeypatch)
    assert "blockwise" not in compiled.report
    assert "cannot run block by block" in caplog.text


def test_each_block_releases_its_statistics_and_encodings(tiny_dir, monkeypatch):
    """After a block, nothing of it is left in the heavy analyses: X^T X and row samples (SITE_CAPTURE)
    and codes (WEIGHT_ENCODINGS) of the next block start from empty maps."""
    from lowbit.compiler import blockwise
    from lowbit.core.analyses import WEIGHT_ENCODINGS
    from lowbit.core.statistics import SITE_CAPTURE

    left: list[tuple[int, int]] = []
    release = blockwise.BlockwisePass._release

    def checked(self, sites):
        release(self, sites)
        left.append((len(self.ctx.analyses.find(SITE_CAPTURE) or {}), len(self.ctx.analyses.find(WEIGHT_ENCODINGS) or {})))

    monkeypatch.setattr(blockwise.BlockwisePass, "_release", checked)
    _compile(tiny_dir, "w4a8-dint4", blockwise=True, monkeypatch=monkeypatch)
    assert len(left) > 4 and set(left) == {(0, 0)}


@pytest.mark.parametrize("recipe", ["w8a8-rptq", "w4a8-dint4@ort-cpu"])
def test_sequential_calibration_compiles_block_by_block_whatever_the_size(tiny_dir, recipe, tmp_path, monkeypatch):
    """calibration.sequential: a model small enough to run whole is compiled one half-layer at a
    time, each observed on the quantized outputs before it (one extra session per block)."""
    name, _, target = recipe.partition("@")
    compiled = lowbit_compile(tiny_dir, name, target=target or None,
                              overrides=(*SMALL_CALIBRATION, "calibration.sequential=true"))  # fmt: skip
    info = compiled.report["blockwise"]
    assert info["sequential"] and info["segments"] == 2 * 2 + 2  # embedding, two halves per layer, head
    assert info["sessions"] == 2 * info["segments"] - 1 and compiled.report["observation"]["runs"] == 1
    whole = _compile(tiny_dir, recipe, blockwise=False, monkeypatch=monkeypatch)
    assert _weights(compiled.model).keys() == _weights(whole.model).keys()
    assert _weights(compiled.model) != _weights(whole.model)  # later blocks saw quantized inputs
    out = compiled.save(tmp_path / "out")
    opts = ort.SessionOptions()
    if target == "ort-cpu":
        from lowbit.runtime_ext.library import session_options

        session_options(opts)
    session = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ids = np.arange(12, dtype=np.int64)[None]
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert np.isfinite(logits).all()


def test_sequential_calibration_of_a_model_wide_recipe_is_refused_before_calibrating(tiny_dir):
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match=r"calibration.sequential needs .*AssignPrecisionPass"):
        lowbit_compile(tiny_dir, "fgmp-nvfp4-fp8", overrides=(*SMALL_CALIBRATION, "calibration.sequential=true"))


def test_an_interrupted_compile_resumes_to_the_same_bytes(tiny_dir, monkeypatch, tmp_path, caplog):
    """A block-wise compile stopped after its third block keeps what it rounded; the same compile
    started again reuses it (no OPTQ for those blocks) and writes the uninterrupted compile's
    bytes; once it succeeds, nothing is left in the cache."""
    from lowbit.compiler import blockwise
    from lowbit.encode import optq

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    uninterrupted = _compile(tiny_dir, "w4a8-dint4", blockwise=True, monkeypatch=monkeypatch)
    assert uninterrupted.report["resume"]["reused"] == 0
    assert not list((tmp_path / "cache" / "resume").iterdir())  # removed on success

    release, done = blockwise.BlockwisePass._release, []

    def stop_after_three(self, sites):
        release(self, sites)
        done.append(len(sites))
        if len(done) == 3:  # the embedding, then two blocks with sites
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(blockwise.BlockwisePass, "_release", stop_after_three)
        with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
            _compile(tiny_dir, "w4a8-dint4", blockwise=True, monkeypatch=monkeypatch)
    assert "the same command resumes" in caplog.text
    kept = list((tmp_path / "cache" / "resume").glob("*/*.npz"))
    assert len(kept) == 4  # q/k/v and o_proj of layer 0, gate/up and down_proj of layer 0

    solved = []
    solve = optq._optq_solve
    monkeypatch.setattr(optq, "_optq_solve", lambda w, *a, **k: solved.append(len(w)) or solve(w, *a, **k))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resumed = _compile(tiny_dir, "w4a8-dint4", blockwise=True, monkeypatch=monkeypatch)
    assert "resuming an interrupted compile: 4 rounded site groups" in caplog.text
    assert resumed.report["resume"] == {"reused": 4, "computed": uninterrupted.report["resume"]["computed"] - 4}
    assert sum(solved) == uninterrupted.report["resume"]["computed"] - 4  # only the unfinished blocks were rounded
    assert _weights(resumed.model) == _weights(uninterrupted.model)
    assert resumed.report["optq"] == uninterrupted.report["optq"]
    assert not list((tmp_path / "cache" / "resume").iterdir())


def test_a_changed_setting_does_not_reuse_kept_results(tmp_path):
    from lowbit.core.resume import ResumeStore, content_key

    store = ResumeStore(tmp_path / "store")
    store.save(content_key("a", np.zeros(3, np.float32)), {"x": np.arange(3)})
    assert store.load(content_key("a", np.zeros(3, np.float32)))["x"].tolist() == [0, 1, 2]
    assert store.load(content_key("a", np.zeros(3, np.float64))) is None  # same values, other dtype
    assert store.load(content_key("b", np.zeros(3, np.float32))) is None
    (tmp_path / "store" / f"{content_key('c')}.npz").write_bytes(b"truncated")
    assert store.load(content_key("c")) is None  # unreadable: computed again
    assert not list(tmp_path.glob("store/.*.tmp.npz"))


def test_only_stale_stores_are_swept(tmp_path):
    """Stores untouched for STALE_DAYS go; a fresh store, and anything not named like a store
    (not lowbit's), stay."""
    import os

    from lowbit.core.resume import STALE_DAYS, content_key, resume_store

    root = tmp_path / "resume"
    stale, fresh, other = root / content_key("old"), root / content_key("new"), root / "my notes"
    for d in (stale, fresh, other):
        d.mkdir(parents=True)
    old = os.stat(stale).st_mtime - (STALE_DAYS + 1) * 86400
    for d in (stale, other):
        os.utime(d, (old, old))
    store = resume_store("this compile", root=root)
    assert not stale.exists() and fresh.is_dir() and other.is_dir()
    assert store.directory.parent == root and store.found == 0
