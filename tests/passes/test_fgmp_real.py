"""FGMP on the real SmolLM2-135M export (slow): the dynamo export's [in, out] weights, the exact
FP8 block count and the bit-exact two-branch emission, on the first decoder layer's seven sites
(the others excluded to keep the test to seconds), with the diag(X^T X) proxy."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.compiler.api import load_onnx
from lowbit.core.context import CalibrationData, CompileContext
from lowbit.ort.session import ort_session
from lowbit.compiler.pipeline import run_pipeline
from lowbit.core.recipe import load_recipe
from lowbit.passes.precision import mixed_weight, n_fp8_blocks
from lowbit.passes.precision import PRECISION_ASSIGNMENT

pytestmark = pytest.mark.slow


def test_fgmp_on_smollm2_layer0(smollm2_export, calib_windows):
    windows = [w[:64] for w in calib_windows[:2]]
    recipe = load_recipe("fgmp-nvfp4-fp8", [
        "precision.sensitivity=proxy", "precision.fp8_fraction=0.2", "activations.format=none",
        'sites.exclude=["model.layers.[1-9]*", "lm_head"]'])  # fmt: skip
    ctx = CompileContext(load_onnx(smollm2_export / "model.onnx"), recipe, CalibrationData(windows))
    run_pipeline(ctx)
    a = ctx.analyses.get(PRECISION_ASSIGNMENT)
    assert sorted(a.sites) == sorted(f"model.layers.0.{m}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))  # fmt: skip
    # 576x576 x2, 576x192 x2, 576x1536 x2, 1536x576: blocks of 16 along the reduction axis
    assert a.total_blocks == (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) // 16
    assert a.fp8_blocks == n_fp8_blocks(a.total_blocks, 0.2)
    assert a.sites["model.layers.0.mlp.down_proj"].impact.shape == (96, 576)  # [in/16, out]
    by_name = {v.name: v for n in ctx.model.graph for v in n.outputs}
    values = {s: by_name.get(f"{s}.mixed_weight") or by_name[f"{s}.dequantized"] for s in a.sites}
    session = ort_session(ctx.model, list(values.values()))
    outs = session.run(None, {"input_ids": windows[0][None, :].astype(np.int64)})
    assert np.isfinite(outs[0]).all()
    for (name, _), got in zip(values.items(), outs[1:]):
        assert np.array_equal(got, mixed_weight(a.sites[name])), name
