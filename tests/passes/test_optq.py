"""OPTQ: lower output error than round-to-nearest on correlated inputs, codes on the recipe grid,
and QDQ emission writes exactly the OPTQ-rounded weights."""

import numpy as np
import pytest

from lowbit import formats
from lowbit.compiler.context import CalibrationData, CompileContext
from lowbit.compiler.ortrun import ort_session
from lowbit.compiler.feeds import build_feeds
from lowbit.compiler.recipe import load_recipe
from lowbit.errors import LowbitError
from lowbit.models.synthetic import tiny_decoder
from lowbit.passes.calibrate import CalibratePass
from lowbit.passes.canonicalize import canonicalize_passes
from lowbit.passes.capture import CapturePass
from lowbit.passes.emit_qdq import EmitQDQPass
from lowbit.passes.linear_sites import find_linear_sites
from lowbit.passes.optq import OptqPass, optq_round


def _problem(k=128, n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1500, k)) * np.exp(rng.standard_normal(k))
    x[:, : k // 2] += 0.7 * x[:, k // 2 :]  # correlated channels: where error feedback pays off
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    return x.astype(np.float32), w


@pytest.mark.parametrize("fmt,block", [("dint4", 32), ("int4", 32), ("int4", None), ("int8", None), ("dint4", None)])
def test_optq_beats_rtn_and_lies_on_the_grid(fmt, block):
    x, w = _problem()
    q, scale = optq_round(w, x.T.astype(np.float64) @ x, fmt, block)
    rtn = formats.fake_quantize(w, fmt, axis=0, block_size=block)
    err_optq = np.sum((x @ w - x @ q) ** 2)
    err_rtn = np.sum((x @ w - x @ rtn) ** 2)
    assert err_optq < 0.9 * err_rtn
    enc = formats.encode(q, fmt, axis=0, block_size=block, scale=scale)
    np.testing.assert_array_equal(formats.decode(enc), q)  # exactly representable: codes x scales


def test_act_order_helps_per_channel():
    x, w = _problem(seed=1)
    h = x.T.astype(np.float64) @ x
    plain, _ = optq_round(w, h, "int4", None)
    ordered, _ = optq_round(w, h, "int4", None, act_order=True)
    assert np.sum((x @ w - x @ ordered) ** 2) < np.sum((x @ w - x @ plain) ** 2)


def test_emission_writes_the_optq_codes(token_windows):
    model = tiny_decoder(norm="rms", norm_form="fused")
    recipe = load_recipe("w4a8-dint4", ["smooth.method=none", "reorder.clusters=0", "activations.format=none"])
    ctx = CompileContext(model, recipe, CalibrationData(token_windows))
    ctx.register_analysis("linear_sites", lambda c: find_linear_sites(c.model.graph))
    for p in canonicalize_passes():
        p(model)
    CapturePass(ctx, 64)(model)
    OptqPass(ctx)(model)
    encodings = ctx.get("weight_encodings")
    sites = list(ctx.sites)
    assert len(encodings) == len(sites) == 15
    assert ctx.report["optq"]["median_error_reduction"] > 1.0
    EmitQDQPass(ctx)(model)
    outputs = [v for n in model.graph for v in n.outputs if v.name.endswith(".dequantized")]
    session = ort_session(model, outputs)
    got = session.run([v.name for v in outputs], build_feeds(session, np.arange(4)))
    for value, decoded in zip(outputs, got):
        site_name = value.name.removesuffix(".dequantized")
        np.testing.assert_array_equal(decoded, formats.decode(encodings[site_name]))


def test_optq_rejects_formats_it_cannot_round(token_windows):
    model = tiny_decoder()
    ctx = CompileContext(model, load_recipe("w4a8-dint4", ["weights.format=nvfp4", "weights.block_size=16"]), CalibrationData(token_windows))
    ctx.register_analysis("linear_sites", lambda c: find_linear_sites(c.model.graph))
    with pytest.raises(LowbitError, match="optq needs symmetric int or dint"):
        OptqPass(ctx).call(model)
