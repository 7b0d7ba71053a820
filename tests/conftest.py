"""Shared session fixtures: real-model exports and data windows, built once per test session.

Exports go through :func:`lowbit.models.export.export_model`, which caches under
``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``): a CI run exports each model once, later runs
reuse it. The fixtures are lazy, so ``pytest -m "not slow"`` never exports anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SEQ_LEN = 512
N_WINDOWS = 8  # 8 x 512 tokens: the bench's evaluation and calibration size


@pytest.fixture(scope="session")
def smollm2_export() -> Path:
    """FP32 SmolLM2-135M, torch dynamo export (opset 23, input_ids -> logits)."""
    from lowbit.models.export import export_model

    return export_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_with_past_export() -> Path:
    """FP32 SmolLM2-135M, optimum export with KV cache (opset 18)."""
    from lowbit.models.export import export_model

    return export_model("smollm2-135m", with_past=True)


@pytest.fixture(scope="session")
def minilm_export() -> Path:
    """FP32 all-MiniLM-L6-v2, torch dynamo export (opset 23, -> last_hidden_state)."""
    from lowbit.models.export import export_model

    return export_model("minilm-l6")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_export: Path):
    from lowbit.models.registry import load_tokenizer

    return load_tokenizer(smollm2_export)


@pytest.fixture(scope="session")
def calib_windows(smollm2_tokenizer) -> np.ndarray:
    """SmolLM2 calibration windows: 8 x 512 tokens of the calibration split."""
    from lowbit.models.data import calibration_windows

    return calibration_windows(smollm2_tokenizer, SEQ_LEN, N_WINDOWS)


@pytest.fixture(scope="session")
def eval_windows(smollm2_tokenizer) -> np.ndarray:
    """SmolLM2 evaluation windows: 8 x 512 tokens of the evaluation split."""
    from lowbit.models.data import evaluation_windows

    return evaluation_windows(smollm2_tokenizer, SEQ_LEN, N_WINDOWS)


# Unit-test data for the tiny synthetic decoder (lowbit.models.synthetic): 4 windows of 24 token ids.
@pytest.fixture(scope="session")
def token_windows() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 64, 24) for _ in range(4)]


@pytest.fixture
def optq_rounded(token_windows):
    """(ctx, model) of the fused-RMSNorm tiny decoder after canonicalization, X^T X capture and
    OPTQ under ``w4a8-dint4`` without smoothing or reordering, plus the given overrides."""
    from lowbit.core.context import CalibrationData, CompileContext
    from lowbit.core.recipe import load_recipe
    from lowbit.models.synthetic import tiny_decoder
    from lowbit.passes.canonicalize import canonicalize_passes
    from lowbit.ort.observe import ObservePass
    from lowbit.passes.capture import CaptureAccumulator
    from lowbit.encode.optq import OptqPass

    def build(*overrides: str):
        model = tiny_decoder(norm="rms", norm_form="fused")
        recipe = load_recipe("w4a8-dint4", ["smooth.method=none", "reorder.clusters=0", *overrides])
        ctx = CompileContext(model, recipe, CalibrationData(token_windows))
        for p in canonicalize_passes():
            p(model)
        ObservePass(ctx, [CaptureAccumulator(64)])(model)
        OptqPass(ctx)(model)
        return ctx, model

    return build


@pytest.fixture
def holes_supported(tmp_path) -> bool:
    """Whether the temporary directory's file system frees a punched range (the spill's reclaim;
    tmpfs, ext4 and xfs do)."""
    import os

    from lowbit.core import tensor_spill

    probe = tmp_path / "hole-probe"
    probe.write_bytes(b"\1" * (1 << 20))
    fd = os.open(probe, os.O_WRONLY)
    try:
        return tensor_spill._punch_hole(fd, 0, 1 << 20)
    finally:
        os.close(fd)
        probe.unlink()
