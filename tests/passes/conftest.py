import numpy as np
import pytest


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
