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
from lowbit.models.synthetic_llm import write_decoder
from lowbit.ort import observe as observation

SMALL_CALIBRATION = ("calibration.windows=2", "calibration.seq_len=32", "calibration.slac_windows=1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_decoder("tiny", tmp_path_factory.mktemp("blockwise") / "tiny", progress=False)


def _compile(source: Path, recipe: str, *, blockwise: bool, monkeypatch):
    recipe, _, target = recipe.partition("@")  # "recipe@target"
    with monkeypatch.context() as m:
        if blockwise:  # the tiny model counts as large, every norm starts a block
            m.setattr(observation, "WHOLE_MODEL_BYTES", 0)
            m.setattr(observation, "SEGMENT_BYTES", 1)
        return lowbit_compile(source, recipe, target=target or None, overrides=SMALL_CALIBRATION)


def _weights(model: ir.Model) -> dict[str, bytes]:
    return {name: v.const_value.tobytes() for name, v in model.graph.initializers.items()}


@pytest.mark.parametrize("recipe", ["w8a8-rptq", "w4a8-dint4", "w8a8-smooth", "w4a8-dint4@ort-cpu"])
def test_blockwise_output_equals_whole_model_output(tiny_dir, recipe, monkeypatch):
    whole = _compile(tiny_dir, recipe, blockwise=False, monkeypatch=monkeypatch)
    block = _compile(tiny_dir, recipe, blockwise=True, monkeypatch=monkeypatch)
    assert "blockwise" not in whole.report and block.report["blockwise"]["segments"] > 4
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
    assert len(info["resident_mb"]) == info["segments"]
    assert set(info["passes"]) == {"SmoothPass", "ReorderPass", "OptqPass", "EncodeWeightsPass", "EmitQDQPass"}
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
