"""One observation run per compile: every shipped recipe runs the calibration windows (and the
SLAC probe windows) through ONNX Runtime exactly once, in one session; the documented second runs
(FGMP activations whose statistics cannot be carried) are counted and say why. Also: one place
decides whether a recipe needs calibration data (a K/V-only recipe with float activations gets
its windows from the model directory's tokenizer)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lowbit.compiler.api import compile
from lowbit.compiler.pipeline import observers
from lowbit.core.recipe import available_recipes, load_recipe
from lowbit.passes.calibrate import CalibrationAccumulator

FAST = ["calibration.seq_len=64", "calibration.windows=2"]
WINDOWS, PROBES = 2, 4  # probes: slac_lengths (64, 128, 256) other than 64, 2 windows each


def _make_model_dir(directory: Path) -> Path:
    path = Path(__file__).parents[1] / "adversarial" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_adversarial_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_model_dir(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _make_model_dir(tmp_path_factory.mktemp("observe") / "model")


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """ORT InferenceSession constructions and run() calls during the test."""
    counts = {"sessions": 0, "runs": 0}

    class Counting(ort.InferenceSession):
        def __init__(self, *args, **kwargs):
            counts["sessions"] += 1
            super().__init__(*args, **kwargs)

        def run(self, *args, **kwargs):
            counts["runs"] += 1
            return super().run(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Counting)
    return counts


def _expected_windows(recipe) -> int:
    return WINDOWS + (PROBES if any(isinstance(a, CalibrationAccumulator) for a in observers(recipe)) else 0)


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_shipped_recipe_observes_once(name, model_dir, counted):
    recipe = load_recipe(name, FAST)
    report = compile(model_dir, recipe).report
    if not recipe.needs_calibration:
        assert "observation" not in report and counted == {"sessions": 0, "runs": 0}
        return
    expected = _expected_windows(recipe)
    assert report["observation"] == {"runs": 1, "sessions": 1, "windows": expected, "why_extra": []}
    assert counted == {"sessions": 1, "runs": expected}  # nothing else in a compile runs ORT


@pytest.mark.parametrize("overrides,runs", [
    (["precision.activations=runtime"], 1),  # perturbations gathered in the first run
    (["precision.activations=runtime", "smooth.method=smoothquant"], 2),  # smoothing changed the inputs
    (["precision.activations=runtime", "kv.format=int8"], 2),  # K/V quantization changed them
    (["precision.activations=static"], 2),  # the scale grid needs the first run's final absmax
])  # fmt: skip
def test_fgmp_activation_runs_are_counted_and_explained(overrides, runs, model_dir, counted):
    recipe = load_recipe("fgmp-nvfp4-fp8", [*FAST, "activations.format=none", "precision.sensitivity=proxy", *overrides])
    obs = compile(model_dir, recipe).report["observation"]
    assert obs["runs"] == runs and len(obs["why_extra"]) == runs - 1
    assert all("FGMP" in why for why in obs["why_extra"])
    assert obs["sessions"] == counted["sessions"] == runs
    assert obs["windows"] == counted["runs"] == _expected_windows(recipe) + (runs - 1) * WINDOWS


def test_kv_only_recipe_with_float_activations_calibrates(model_dir, counted):
    recipe = load_recipe("w8", [*FAST, "kv.format=int8"])
    assert recipe.needs_calibration and not load_recipe("w8").needs_calibration
    report = compile(model_dir, recipe).report
    assert report["observation"]["runs"] == 1 and report["calibration"]["windows"] == WINDOWS
    assert report["kv"]  # K/V ranges came from the run


def test_observation_session_drops_nodes_that_feed_only_the_logits(tmp_path):
    import onnx

    from lowbit.models.synthetic import tiny_decoder
    from lowbit.ort.session import ort_session

    model = tiny_decoder(norm="rms", norm_form="fused")
    tap = model.graph.node(0).outputs[0]
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "seen.onnx")  # what ORT loaded
    session = ort_session(model, [tap], outputs_only=True, session_options=opts)
    assert len(onnx.load(str(tmp_path / "seen.onnx"), load_external_data=False).graph.node) == 1
    assert [o.name for o in session.get_outputs()] == [tap.name]
    ids = np.arange(8, dtype=np.int64)[None]
    full = ort_session(model, [tap])
    np.testing.assert_array_equal(session.run(None, {"input_ids": ids})[0], full.run([tap.name], {"input_ids": ids})[0])
    assert [o.name for o in model.graph.outputs] == ["logits"]  # the model itself is unchanged
