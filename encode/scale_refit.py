"""Least-squares refit of OPTQ's block scales with the codes held fixed.

OPTQ chooses a block's scale when its rounding reaches the block, from the error-compensated
weights and a weight-error criterion, and then rounds the block's channels on that scale while it
pushes their errors onto later channels. Once every code is known, the objective OPTQ minimises,
``tr((W - Q)^T H (W - Q))`` with ``Q = codes * scale`` (H damped as OPTQ damps it), is a quadratic
in the scales alone: per output column, ``nb = ceil(K / block)`` unknowns with normal equations

    M s = r,  M[b, c] = codes_b^T H[b, c] codes_c,  r[b] = codes_b^T (H w)_b.

Assumes: ``q`` is on the format's grid times the given scales (OPTQ's output, element values
multiples of 1/2 as for INT-b and dINT-b), ``h`` is the site input's X^T X. Guarantees: the codes
are unchanged; a column's scales change only if that lowers its proxy error (the change is
evaluated in float64 from M and r, no further K x K product), and every scale stays positive
and finite. A block whose codes are all zero keeps its scale (a ridge of 1e-6 of M's diagonal
pulls toward the old scales, which also keeps the solve well posed).

Measured (dINT4 blocks of 32): 4.4-10.8 % lower proxy error on SmolLM2's layer 3 and 20 q/k/v,
gate/up and down_proj inputs (H from 4 windows, no smoothing), ~3.6 % on the tests' synthetic problems;
SmolLM2 w4a8-dint4 ppl 17.12 -> 16.96 (QDQ in float, 8 x 512 windows; a float64 prototype of
the same solve gave 17.00: downstream discrete choices move 4-bit perplexity by a few hundredths).
Cost: 3 K x K x N multiply-adds per problem (M and H W), ~8 CPU-seconds for SmolLM2 and ~90
for a Llama-3-8B down_proj on one thread. Columns are refit in slices: at least two (OPTQ's pass
runs them on its two threads, one BLAS thread each), and narrower where the normal equations
would exceed ``_SLICE_BYTES`` (Llama-3-8B's head would need 17 GB at once). The slices agree with
one solve to the float32 rounding of the products; the partition is fixed by the shape, so the
result does not depend on the thread count.
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np

__all__ = ["refit_block_scales"]

_RIDGE = 1e-6
_SLICE_BYTES = 256 << 20  # float64 normal equations held at once (8B's head: 128256 columns x 128 blocks)
# one (K, columns) float32 temporary; a slice makes about six, and two slices run side by side
# (a 3B head's refit at 256 MB held 2 GB of them). SmolLM2's 576 x 49152 head (113 MB) is split
# in two by _MIN_SLICES either way, so its scales do not depend on this.
_COLUMN_BYTES = 64 << 20
# Every problem is refit in at least this many column slices, run side by side on the caller's
# pool. A constant, not the thread count: float32 products of a subset of columns round
# differently from the whole product, so the partition must depend on the problem's shape only
# (a block-wise compile and a whole one, one core or two, give the same scales).
_MIN_SLICES = 2


def refit_block_scales(w: np.ndarray, q: np.ndarray, scales: np.ndarray, h: np.ndarray, damp: float,
                       block: int | None, error: np.ndarray, pool: Executor | None = None,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(q, scales, per-column proxy error) after the refit of the (K, N) problem ``w`` rounded
    to ``q`` on ``scales`` (ceil(K / block), N) with per-column proxy error ``error`` (OPTQ's
    loop figure); ``block=None``: one scale per column. A float32 ``q`` is overwritten with the
    refit codes and returned (no second (K, N) array: 1 GB for a 1B model's head).

    Columns are independent: they are refit in slices of a width fixed by the shape (bounded
    normal equations and temporaries), on ``pool``'s threads when given (each slice's products
    on the BLAS threads the caller set, one for a bit-reproducible result). H's damped float32
    copy is made once and shared by the slices."""
    k, n = w.shape
    block = block or k
    nb = -(-k // block)
    # columns refit at once: M (and its ridge copy) per slice, and each (K, columns) float32
    # temporary (codes, weights, H products; an 8-bit per-channel head has one block, so M alone
    # would not slice a 1B head's 1 GB copies)
    width = max(1, min(_SLICE_BYTES // (16 * nb * nb), _COLUMN_BYTES // (4 * nb * block), -(-n // _MIN_SLICES)))
    hd, dead = _damped_hessian(h, damp, k, nb * block)
    out = (q if q.dtype == np.float32 else np.empty_like(q, dtype=np.float32),
           np.empty_like(scales, dtype=np.float32), np.empty(n))  # fmt: skip

    def refit(cols: slice) -> None:  # reads its own columns of ``q`` before it writes them
        part = _refit_columns(w[:, cols], q[:, cols], scales[:, cols], hd, dead, block, error[cols])
        for whole, piece in zip(out, part):
            whole[..., cols] = piece

    slices = [slice(c, min(c + width, n)) for c in range(0, n, width)]
    list(pool.map(refit, slices) if pool is not None else map(refit, slices))
    return out


def _damped_hessian(h: np.ndarray, damp: float, k: int, kp: int) -> tuple[np.ndarray, np.ndarray]:
    """H as OPTQ damps it, float32, padded with zero rows and columns to ``kp`` (whole blocks:
    block sums become reshapes), dead channels (never fire) given a unit diagonal; and those
    channels' indices."""
    hd = np.zeros((kp, kp), np.float32)
    hd[:k, :k] = h
    dead = np.flatnonzero(np.diag(hd)[:k] <= 0)  # as OPTQ: channels that never fire carry no error
    hd[dead, dead] = 1.0
    hd.flat[:: kp + 1] += np.float32(damp * float(np.mean(np.diag(hd)[:k])))
    return hd, dead


def _refit_columns(w: np.ndarray, q: np.ndarray, scales: np.ndarray, hd: np.ndarray, dead: np.ndarray,
                   block: int, error: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The refit of a slice of columns (new arrays) given :func:`_damped_hessian`'s ``hd``."""
    k, n = w.shape
    kp = len(hd)
    nb = kp // block
    expand = np.arange(k) // block
    codes = np.zeros((kp, n), np.float32)
    np.divide(q, scales[expand], out=codes[:k])
    codes *= 2.0
    np.rint(codes, out=codes)
    codes *= 0.5  # element values: multiples of 1/2 for INT-b and dINT-b
    wd = np.zeros((kp, n), np.float32)
    wd[:k] = w
    wd[dead] = 0.0
    m = np.empty((n, nb, nb))

    def block_sums(t: np.ndarray) -> np.ndarray:  # (N, blocks): per block, sum of codes * t
        np.multiply(t, codes[: len(t)], out=t)
        return t.reshape(-1, block, n).sum(axis=1).T

    # K x K x N products on the caller's BLAS threads (OPTQ's pass refits slices side by side,
    # one BLAS thread each: on a shared 2-core machine two BLAS threads per product ran 3x slower)
    for c in range(nb):  # M is symmetric: blocks b <= c, mirrored
        rows = slice(c * block, (c + 1) * block)
        m[:, : c + 1, c] = block_sums(hd[: rows.stop, rows] @ codes[rows])
        m[:, c, :c] = m[:, :c, c]
    r = block_sums(hd @ wd).astype(np.float64)
    old = scales.T.astype(np.float64)
    ridge = _RIDGE * np.einsum("nbb->nb", m) + 1e-30
    m_ridge = m.copy()
    m_ridge[:, np.arange(nb), np.arange(nb)] += ridge
    new = np.linalg.solve(m_ridge, (r + ridge * old)[:, :, None])[:, :, 0]
    new = np.where(np.isfinite(new) & (new > 0), new, old).astype(np.float32).astype(np.float64)
    # objective(s) = w^T H w - 2 s^T r + s^T M s, so the change needs no K x K product
    change = (np.einsum("nb,nbc,nc->n", new, m, new) - np.einsum("nb,nbc,nc->n", old, m, old)
              - 2.0 * np.einsum("nb,nb->n", new - old, r))  # fmt: skip
    better = change < 0
    scales_out = np.where(better[None], new.T, old.T).astype(np.float32)
    q_out = np.where(better[None], codes[:k] * scales_out[expand], q).astype(np.float32)
    return q_out, scales_out, np.where(better, error + change, error)
