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
