"""FgmpActQuant: per-16-block FP8/NVFP4 choice, bit-exact against lowbit.formats rules."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from lowbit import formats
from lowbit import runtime_ext as rx
from lowbit.runtime_ext import reference as ref


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    c = 64
    x = (rng.standard_normal((2, 3, c)) * np.exp(rng.uniform(-6, 6, (1, 1, c)))).astype(np.float32)
    x[0, 0, :16] = 0.0  # a zero block
    x[0, 1, 16:32] *= np.float32(1e-30)  # a block whose NVFP4 scale underflows E4M3
    g2 = rng.uniform(0, 3, c).astype(np.float32)
    return x, g2


def _threshold_between_blocks(x, g2, global_scale):
    """A threshold half-way between two sorted perturbations: no block sits on it."""
    _, mask_all = ref.fgmp_act_quant(x, g2, -1.0, global_scale)
    assert mask_all.all()
    xb = x.reshape(-1, 16)
    p = []
    for blk, ch in zip(xb, np.tile(np.arange(x.shape[-1] // 16), xb.shape[0] // (x.shape[-1] // 16))):
        w = g2[ch * 16:(ch + 1) * 16]
        a, _ = ref.fgmp_act_quant(blk[None], w, np.inf, global_scale)
        b, _ = ref.fgmp_act_quant(blk[None], w, -1.0, global_scale)
        p.append(float((w.astype(np.float64) * (a[0].astype(np.float64) - b[0]) ** 2).sum()))
    p = np.sort(np.unique(p))
    mid = len(p) // 2
    return float((p[mid - 1] + p[mid]) / 2)


def test_reference_candidates_are_formats_fake_quantize():
    x, g2 = _inputs(0)
    y4, m4 = ref.fgmp_act_quant(x, g2, np.inf)
    y8, m8 = ref.fgmp_act_quant(x, g2, -1.0)
    assert not m4.any() and m8.all()
    np.testing.assert_array_equal(y4, formats.fake_quantize(x, "nvfp4", -1, 16))
    np.testing.assert_array_equal(y8, formats.fake_quantize(x, "fp8_e4m3", -1, 16))


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("native", [True, False])
def test_fgmp_matches_reference_bit_for_bit(lb, static, native):
    x, g2 = _inputs(1)
    gscale = float(np.abs(x).max() / 2688 * 1.5) if static else None
    thr = _threshold_between_blocks(x, g2, gscale)
    inits = {"g2": g2, "thr": np.float32(thr)}
    if static:
        inits["gs"] = np.float32(gscale)
    node = rx.make_fgmp_node("x", "g2", "thr", "Y", global_scale="gs" if static else None)
    model = lb.one_node_model(node, {"x": (TensorProto.FLOAT, ["B", "S", 64])}, ("Y", None),
                              inits)
    y = lb.session(model, native).run(None, {"x": x})[0]
    want, mask = ref.fgmp_act_quant(x, g2, thr, gscale)
    assert 0 < mask.sum() < mask.size  # both precisions occur
    np.testing.assert_array_equal(y, want)
