"""Scale refit after OPTQ: codes unchanged, scales positive, every column's proxy error no higher
(and the total lower) than OPTQ's, and the returned error equal to tr(D^T H_damped D) measured
directly. On synthetic problems (a dead channel, a block of zero codes, K not a multiple of the
block) and through the pass on the tiny decoder's graph; a real SmolLM2 site is checked in
test_optq.py's slow real-site test."""

import numpy as np
import pytest

from lowbit import formats
from lowbit.core.recipe import load_recipe
from lowbit.encode.optq import _optq_solve, _proxy_errors
from lowbit.encode.scale_refit import refit_block_scales


def _problem(k, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1500, k)) * np.exp(rng.standard_normal(k))
    x[:, : k // 2] += 0.7 * x[:, k // 2 :]
    x[:, 3] = 0.0  # a channel that never fires
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    return x.T.astype(np.float64) @ x, w


@pytest.mark.parametrize("fmt,k,block", [("dint4", 128, 32), ("int4", 100, 32), ("int4", 96, None)])
def test_refit_keeps_the_codes_and_never_raises_a_columns_error(fmt, k, block):
    h, w = _problem(k, 40, seed=k)
    (q, scale, err), = _optq_solve([w], [h], fmt, block, damp=0.01, scale_method="mse", act_order=False)
    if block:
        q[32:64, 0] = 0.0  # a block whose codes are all zero (still on the grid)
        err = _proxy_errors(w, q, h, 0.01)
    q2, scale2, err2 = refit_block_scales(w, q.copy(), scale, h, 0.01, block, err)
    rows = np.arange(k) // (block or k)
    np.testing.assert_array_equal(np.rint(2 * q2 / scale2[rows]), np.rint(2 * q / scale[rows]))
    assert np.all(np.isfinite(scale2)) and np.all(scale2 > 0)
    before, after = _proxy_errors(w, q, h, 0.01), _proxy_errors(w, q2, h, 0.01)
    assert np.all(after <= before * (1 + 1e-5))
    assert after.sum() < 0.99 * before.sum()
    np.testing.assert_allclose(err2, after, rtol=1e-4)
    if block:
        assert scale2[1, 0] == scale[1, 0]  # the all-zero block keeps its scale
    enc = formats.encode(q2, fmt, axis=0, block_size=block, scale=scale2)
    np.testing.assert_array_equal(formats.decode(enc), q2)  # still codes x scales on the grid


def test_the_pass_refits_by_default_and_lowers_the_reported_error(optq_rounded):
    errors = {}
    for refit in (False, True):
        ctx, _ = optq_rounded(f"rounding.refit_scales={str(refit).lower()}")
        errors[refit] = {n: r["optq_proxy_error"] for n, r in ctx.report["optq"]["sites"].items()}
    assert load_recipe("w4a8-dint4").rounding.refit_scales
    assert all(errors[True][n] <= errors[False][n] * (1 + 1e-6) for n in errors[False])
    assert sum(errors[True].values()) < sum(errors[False].values())


def test_wide_problems_are_refit_in_column_slices(monkeypatch):
    """A vocabulary-sized head is refit in slices of output columns (bounded normal equations):
    the codes are unchanged and the scales agree with one solve to float32 rounding."""
    from lowbit.encode import optq, scale_refit

    rng = np.random.default_rng(0)
    k, n = 256, 700
    x = rng.standard_normal((1000, k)).astype(np.float32)
    x[:, 5] = 0.0
    h = (x.T @ x).astype(np.float64)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, s, e = optq._optq_solve([w], [h], "dint4", 32, damp=0.01, scale_method="mse", act_order=False)[0]
    monkeypatch.setattr(scale_refit, "_MIN_SLICES", 1)
    whole = scale_refit.refit_block_scales(w, q.copy(), s, h, 0.01, 32, e)
    monkeypatch.setattr(scale_refit, "_SLICE_BYTES", 16 * 8 * 8 * 100)  # 100 columns per slice
    sliced = scale_refit.refit_block_scales(w, q, s, h, 0.01, 32, e)
    assert sliced[0] is q  # written in place: no second (K, N) array for a vocabulary head
    expand = np.arange(k) // 32
    np.testing.assert_array_equal(np.rint(2 * sliced[0] / sliced[1][expand]), np.rint(2 * whole[0] / whole[1][expand]))
    np.testing.assert_allclose(sliced[1], whole[1], rtol=1e-6)
    np.testing.assert_allclose(sliced[2], whole[2], rtol=1e-5, atol=1e-3 * float(np.abs(whole[2]).max()))


def test_slices_on_threads_give_the_sequential_result():
    """The refit's slices run side by side give, bit for bit, what they give one after another:
    the partition is the shape's, and every slice's products are the same."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    h, w = _problem(96, 301, seed=3)
    q, s, e = _optq_solve([w], [h], "dint4", 32, damp=0.01, scale_method="mse", act_order=False)[0]
    with threadpool_limits(1, user_api="blas"):
        alone = refit_block_scales(w, q.copy(), s, h, 0.01, 32, e)
        with ThreadPoolExecutor(2) as pool:
            side_by_side = refit_block_scales(w, q.copy(), s, h, 0.01, 32, e, pool=pool)
    for a, b in zip(alone, side_by_side):
        np.testing.assert_array_equal(a, b)
