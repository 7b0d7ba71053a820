"""FGMP activations: the perturbation the pass calibrates on is the one FgmpActQuant thresholds,
the global threshold keeps exactly k blocks, and the inserted op (ONNX function fallback in ORT)
equals the numpy reference bit for bit on the compiled tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.core.context import CalibrationData, CompileContext
from lowbit.ort.feeds import make_feed
from lowbit.ort.session import ort_session
from lowbit.compiler.pipeline import run_pipeline
from lowbit.core.recipe import load_recipe
from lowbit.errors import LowbitError
from lowbit.models.synthetic import tiny_decoder
from lowbit.emit.fgmp_act import activation_perturbation, calibrated_threshold
from lowbit.runtime_ext.reference import fgmp_act_quant


def test_perturbation_is_what_the_op_thresholds():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 5, 48)) * np.exp(rng.uniform(-3, 3, 48))).astype(np.float32)
    g2 = rng.uniform(0, 2, 48).astype(np.float32)
    p = activation_perturbation(x, g2)
    assert p.shape == (2, 5, 3)
    for t in np.quantile(p, [0.1, 0.5, 0.9]):
        _, mask = fgmp_act_quant(x, g2, float(t))
        np.testing.assert_array_equal(mask, p > t)


def test_calibrated_threshold_keeps_exactly_k():
    p = np.array([0.5, 3.0, 1.0, 2.0, 0.0])
    assert calibrated_threshold(p, 0.4) == 1.0  # k = 2: 3.0 and 2.0 are above
    assert int((p > calibrated_threshold(p, 0.4)).sum()) == 2
    assert int((p > calibrated_threshold(p, 0.0)).sum()) == 0
    assert int((p > calibrated_threshold(p, 1.0)).sum()) == 5


def test_runtime_activations_match_the_reference(token_windows):
    recipe = load_recipe("fgmp-nvfp4-fp8", ["precision.sensitivity=proxy", "precision.activations=runtime",
                                            "activations.format=none", "precision.act_fp8_fraction=0.25"])
    ctx = CompileContext(tiny_decoder(), recipe, CalibrationData(token_windows))
    run_pipeline(ctx)
    rep = ctx.report["precision"]["activations"]
    nodes = [n for n in ctx.model.graph if n.op_type == "FgmpActQuant"]
    assert len(nodes) == rep["groups"] > 0
    assert abs(rep["calibration_fp8_fraction"] - 0.25) < 0.01
    values = [v for n in nodes for v in (n.inputs[0], n.outputs[0])]
    session = ort_session(ctx.model, values)  # no native library registered: the function fallback
    masks = []
    for ids in token_windows:
        outs = session.run([v.name for v in values], make_feed(session.get_inputs(), ids))
        for node, x, y in zip(nodes, outs[0::2], outs[1::2]):
            g2, thr = node.inputs[1].const_value.numpy(), float(node.inputs[2].const_value.numpy())
            expected, mask = fgmp_act_quant(x, g2, thr)
            assert np.array_equal(y, expected)
            masks.append(mask.reshape(-1))
    # calibrated on the float model; the compiled model's inputs carry quantization error upstream
    assert np.concatenate(masks).mean() == pytest.approx(0.25, abs=0.03)


def test_runtime_activations_refuse_static_activation_qdq(token_windows):
    with pytest.raises(LowbitError, match="recipe key 'activations.format'"):  # at load, before any model
        load_recipe("fgmp-nvfp4-fp8", ["precision.sensitivity=proxy", "precision.activations=runtime"])
