"""Capture: fed by the same observation run as calibration, it yields what a separate run over
the same windows yields, so the pipeline runs the windows once; X^T X (symmetric rank-k updates,
upper triangle, float32 flushed to float64) equals the float64 X^T X."""

import numpy as np
import pytest

from lowbit.core.context import CalibrationData, CompileContext
from lowbit.core.recipe import load_recipe
from lowbit.models.synthetic import tiny_decoder
from lowbit.ort.observe import ObservePass, Window, observe
from lowbit.passes.calibrate import CalibrationAccumulator
from lowbit.passes.canonicalize import canonicalize_passes
from lowbit.passes.capture import CaptureAccumulator
from lowbit.core.statistics import ACTIVATION_STATS, SITE_CAPTURE


def _context(windows):
    model = tiny_decoder(norm="rms", norm_form="fused")
    ctx = CompileContext(model, load_recipe("w4a8-dint4"), CalibrationData(windows))
    for p in canonicalize_passes():
        p(model)
    return ctx, model


def test_capture_during_calibration_equals_a_separate_capture(token_windows):
    separate, model_a = _context(token_windows)
    observe(separate, model_a, [CalibrationAccumulator()])
    observe(separate, model_a, [CaptureAccumulator(40)], why="the test compares with a separate run")
    assert separate.report["observation"]["runs"] == 2
    merged, model_b = _context(token_windows)
    ObservePass(merged, [CalibrationAccumulator(), CaptureAccumulator(40)])(model_b)
    assert merged.report["observation"] == {"runs": 1, "sessions": 1, "why_extra": [],
                                            "windows": len(token_windows)}  # no probes given  # fmt: skip
    a, b = separate.analyses.get(SITE_CAPTURE), merged.analyses.get(SITE_CAPTURE)
    assert list(a) == list(b) and len(a) == len(separate.sites.input_groups())
    for name in a:
        # the same windows through the same graph: equal up to ORT's float32 (extra tapped
        # outputs may change which kernels run), and the same random rows
        np.testing.assert_allclose(b[name].hessian, a[name].hessian, rtol=1e-5, atol=1e-6 * np.abs(a[name].hessian).max())
        np.testing.assert_allclose(b[name].sample, a[name].sample, rtol=1e-5, atol=1e-6)
        assert b[name].tokens == a[name].tokens == sum(len(w) for w in token_windows)
    assert merged.report["capture"] == separate.report["capture"]
    stats_a, stats_b = separate.analyses.get(ACTIVATION_STATS), merged.analyses.get(ACTIVATION_STATS)
    for name, s in stats_a.by_value.items():
        np.testing.assert_array_equal(stats_b[name].absmax, s.absmax)


def test_accumulated_hessian_equals_float64_x_transpose_x_across_flushes():
    # 19 windows: two float32 flushes of FLUSH_WINDOWS plus a partial one at publish
    rng = np.random.default_rng(3)
    windows = [rng.integers(0, 64, 24) for _ in range(19)]
    ctx, _ = _context(windows)
    acc = CaptureAccumulator(40)
    taps = acc.taps(ctx)
    xs = {name: [] for name in taps}
    for i, ids in enumerate(windows):
        outs = {name: rng.standard_normal((1, 24, v.shape[-1])).astype(np.float32) * 30.0 for name, v in taps.items()}
        for name, x in outs.items():
            xs[name].append(x[0].astype(np.float64))
        acc.add(Window(i, ids), outs)
    acc.finish(ctx)
    for name, capture in ctx.analyses.get(SITE_CAPTURE).items():
        x = np.concatenate(xs[name])
        expected = x.T @ x
        assert capture.hessian.dtype == np.float64 and capture.tokens == 19 * 24
        np.testing.assert_array_equal(capture.hessian, capture.hessian.T)  # both triangles filled
        np.testing.assert_allclose(capture.hessian, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("k", [1, 5, 511, 512, 513, 1300])
def test_upper_triangle_is_mirrored_band_by_band(k):
    """X^T X comes from rank-k updates of its upper triangle; the band-wise mirror (no K^2/2
    index arrays) gives what mirroring through tril_indices gives."""
    from lowbit.passes.capture import _mirror_upper

    h = np.triu(np.random.default_rng(k).standard_normal((k, k)))
    expected = h.copy()
    lower = np.tril_indices(k, -1)
    expected[lower] = expected.T[lower]
    _mirror_upper(h)
    np.testing.assert_array_equal(h, expected)


@pytest.mark.parametrize("k", [1, 7, 300])
def test_capture_transforms_in_place_equal_the_copying_formulas(k):
    """A fold's scale and a reorder's permutation rewrite X^T X in place (no K x K temporary at
    an 8B down_proj) with exactly the elements of the copying formulas."""
    from lowbit.core.statistics import GroupCapture

    rng = np.random.default_rng(k)
    x = rng.standard_normal((50, k))
    h, sample = x.T @ x, x[:5].astype(np.float32)
    scale, perm = rng.uniform(0.3, 3.0, k), rng.permutation(k)
    capture = GroupCapture(h.copy(), sample.copy())
    buffer = capture.hessian
    capture.transform(scale, None)
    capture.transform(None, perm)
    inv = 1.0 / scale
    expected = (h * inv[:, None] * inv[None, :])[np.ix_(perm, perm)]
    assert capture.hessian is buffer
    np.testing.assert_array_equal(capture.hessian, expected)
    np.testing.assert_array_equal(capture.sample, (sample / scale.astype(np.float32))[:, perm])
