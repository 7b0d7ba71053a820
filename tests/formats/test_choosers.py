"""Scale choosers: absmax, percentile, MSE and weighted-MSE clip searches."""

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.formats import choose_scale, fake_quantize


def _heavy_tailed(seed=0, shape=(8, 256)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, 0] = 40.0  # one outlier per row
    return x


def _sse(x, y, w=None):
    d = (x.astype(np.float64) - y) ** 2
    return float((d if w is None else d * w).sum())


def test_percentile_matches_numpy_per_block():
    x = _heavy_tailed()
    s = choose_scale(x, "int8", -1, 64, scale_method="percentile", percentile=90.0)
    want = np.percentile(np.abs(x).reshape(8, 4, 64), 90.0, axis=2).astype(np.float32)
    np.testing.assert_array_equal(s.scale, want / np.float32(127))


def test_percentile_on_a_shorter_last_block_ignores_padding():
    x = np.float32([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])  # blocks of 4: last block [9, 10]
    s = choose_scale(x, "int8", -1, 4, scale_method="percentile", percentile=50.0)
    np.testing.assert_array_equal(s.scale * np.float32(127), np.float32([[2.5, 6.5, 9.5]]))


def test_asymmetric_percentile_uses_both_tails():
    x = np.linspace(-1, 3, 101, dtype=np.float32)[None]
    s = choose_scale(x, "int8", symmetric=False, scale_method="percentile", percentile=90.0)
    lo, hi = np.percentile(x, 10.0), np.percentile(x, 90.0)
    assert s.scale.item() == np.float32(np.float32(hi) - np.float32(lo)) / np.float32(255)


@pytest.mark.parametrize("fmt", ["int4", "dint4", "fp4_e2m1", "nvfp4", "mxfp4"])
def test_mse_never_worse_than_absmax_and_gains_on_gaussians(fmt):
    x = np.random.default_rng(4).standard_normal((8, 256)).astype(np.float32)
    block = None if fmt in ("nvfp4", "mxfp4") else 32
    base = _sse(x, fake_quantize(x, fmt, -1, block))
    mse = _sse(x, fake_quantize(x, fmt, -1, block, scale_method="mse"))
    assert mse <= base
    if fmt in ("int4", "dint4", "fp4_e2m1"):  # smooth float32 scales: the search finds a gain
        assert mse < 0.97 * base


def test_mse_search_per_block_picks_the_best_ratio_on_the_grid():
    x = _heavy_tailed(shape=(2, 64))
    s = choose_scale(x, "int4", -1, 32, scale_method="mse", min_ratio=0.5, n_grid=11)
    amax = np.abs(x).reshape(2, 2, 32).max(axis=2)
    for i in range(2):
        for j in range(2):
            blk = x[i, 32 * j:32 * j + 32]
            errs = [_sse(blk, fake_quantize(blk, "int4", axis=None,
                                            scale=np.float32(amax[i, j] * r) / np.float32(7)))
                    for r in np.linspace(1.0, 0.5, 11, dtype=np.float32)]
            assert _sse(blk, fake_quantize(blk, "int4", axis=None, scale=s.scale[i, j])) == \
                min(errs)


def test_weighted_mse_follows_the_weights():
    x = _heavy_tailed(shape=(1, 256))
    w_outlier = np.full_like(x, 1e-3)
    w_outlier[:, 0] = 1e3  # the outlier matters: keep the full range
    s_keep = choose_scale(x, "int4", scale_method="weighted_mse", weights=w_outlier)
    assert s_keep.scale.item() == np.float32(40.0) / np.float32(7)
    w_bulk = np.ones_like(x)
    w_bulk[:, 0] = 0.0  # the outlier is irrelevant: clip as much as the grid allows
    s_clip = choose_scale(x, "int4", scale_method="weighted_mse", weights=w_bulk, n_grid=6,
                          min_ratio=0.5)
    assert s_clip.scale.item() == np.float32(40.0 * np.float32(0.5)) / np.float32(7)
    y = fake_quantize(x, "int4", scale_method="weighted_mse", weights=w_bulk)
    assert _sse(x, y, w_bulk) < _sse(x, fake_quantize(x, "int4"), w_bulk)


def test_nvfp4_clip_ratio_scales_block_amax_before_e4m3_rounding():
    x = _heavy_tailed(shape=(1, 16))
    s = choose_scale(x, "nvfp4", scale_method="mse", n_grid=1, min_ratio=1.0)
    assert s.scale.item() == 448.0  # ratio 1 only: the absmax block scale
    s2 = choose_scale(x, "nvfp4", scale_method="mse", n_grid=2, min_ratio=0.5)
    assert s2.global_scale == np.float32(40.0) / np.float32(2688)  # always from tensor amax
    assert s2.scale.item() in (448.0, 224.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(scale_method="nope"), "unknown scale_method 'nope'"),
    (dict(scale_method="absmax", percentile=99.0), "takes no option"),
    (dict(scale_method="mse", percentile=99.0), "takes no option"),
    (dict(scale_method="percentile", percentile=0.0), "percentile must be in"),
    (dict(scale_method="mse", min_ratio=1.5), "min_ratio"),
    (dict(scale_method="weighted_mse"), "weights= is required"),
    (dict(scale_method="mse", weights=np.ones((2, 8), np.float32)), "weights= is required"),
    (dict(scale_method="weighted_mse", weights=np.ones((2, 7), np.float32)), "weights shape"),
    (dict(scale_method="weighted_mse", weights=-np.ones((2, 8), np.float32)), ">= 0"),
])
def test_chooser_errors(kwargs, match):
    with pytest.raises(LowbitError, match=match):
        fake_quantize(np.ones((2, 8), np.float32), "int4", **kwargs)
