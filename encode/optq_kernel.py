"""The sequential core of OPTQ as one compiled loop (numba): round a batch of input channels,
choosing each block's scales when the rounding reaches it, and push every rounding error onto the
remaining channels of the batch.

Written to reproduce, operation for operation, what the numpy formulation computes (the one in
``tests/encode/test_optq.py``): float32 ``x / s`` and ``round(.) * s``, float64 error feedback as
one product and one subtraction per element (no fused multiply-add), the chooser's candidate
scales ``float32(amax * r) / element_max`` with the first of equal errors winning. The chooser's
float64 error sums run in index order where numpy sums pairwise, so two candidates whose errors
tie to the last bit may be ordered differently -- the only place the two can disagree.

Element rounding (``round_element``) is the definition of :mod:`lowbit.formats` for the two kinds
OPTQ accepts, symmetric (narrow) INT-b and dINT-b; a test checks it against ``element.round`` on
every bucket edge of float32.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats.dint import DintElement
from lowbit.formats.integer import IntElement
from lowbit.encode.jit import numba  # with its cache in a private, writable directory

__all__ = ["KIND_DINT", "KIND_INT", "element_kind", "optq_batch", "round_element", "rtn_round"]

KIND_INT, KIND_DINT = 0, 1


def element_kind(element) -> tuple[int, float]:
    """(kind, max magnitude) of an element format the kernel rounds to."""
    if isinstance(element, DintElement):
        return KIND_DINT, float(element.max_value)
    if isinstance(element, IntElement):
        return KIND_INT, float(element.qmax)  # narrow: [-qmax, qmax]
    raise LowbitError(f"optq: no rounding kernel for element format {element.name!r}")


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _round_int(y: np.float32, vmax: np.float32) -> np.float32:
    """``IntElement.round(y, narrow=True)``: rint, clamp to [-qmax, qmax], -0 -> +0."""
    return min(max(np.float32(np.rint(y)), -vmax), vmax) + np.float32(0.0)


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _round_dint(y: np.float32, vmax: np.float32) -> np.float32:
    """``DintElement.round(y)``: 0, the half-step, or an integer with ties to the odd one."""
    a = min(np.abs(y), vmax)
    whole = np.float32(np.rint(a - np.float32(1.0))) + np.float32(1.0)
    small = np.float32(0.5) if a > np.float32(0.25) else np.float32(0.0)
    m = whole if a >= np.float32(0.75) else small
    return np.float32(np.copysign(m, y)) + np.float32(0.0)  # -0 -> +0


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def round_element(y: np.float32, kind: int, vmax: np.float32) -> np.float32:
    """``element.round(y, narrow=True)`` of the INT-b (``KIND_INT``) or dINT-b element with max
    magnitude ``vmax``; ``kind`` is loop-invariant in the callers, so the compiler unswitches the
    branch and each loop stays branch-free and vectorizable."""
    if kind == KIND_DINT:
        return _round_dint(y, vmax)
    return _round_int(y, vmax)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _choose_scales(w, r0, r1, c0, c1, ratios, elem_max, kind, vmax, out):
    """Per column n in c0:c1, the candidate scale of rows r0:r1 with the smallest squared error."""
    width = c1 - c0
    amax = np.zeros(width, np.float32)
    for i in range(r0, r1):
        row = w[i, c0:c1]
        for n in range(width):
            a = np.abs(np.float32(row[n]))
            amax[n] = a if a > amax[n] else amax[n]
    best = np.empty(width, np.float64)
    s = np.empty(width, np.float32)
    err = np.empty(width, np.float64)
    chosen = out[c0:c1]
    for c in range(ratios.shape[0]):
        for n in range(width):
            v = np.float32(amax[n] * ratios[c]) / elem_max
            s[n] = v if v > 0 else np.float32(1.0)
            err[n] = 0.0
        for i in range(r0, r1):
            row = w[i, c0:c1]
            for n in range(width):
                x = np.float32(row[n])
                d = round_element(x / s[n], kind, vmax) * s[n] - x
                err[n] += np.float64(d * d)
        for n in range(width):
            if c == 0 or err[n] < best[n]:
                best[n] = err[n]
                chosen[n] = s[n]


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _axpy(y, x, c):
    """``y -= x * c`` elementwise: a product and a subtraction per element (no fused multiply-add)."""
    for n in range(y.shape[0]):
        y[n] -= x[n] * c


_CHUNK = 512  # columns per parallel task: output channels are independent
_SUB = 32  # rows whose errors reach each other as rank-1 updates; the rest of the batch per sub-block


@numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def optq_batch(w, u, b0, b1, block, choose, ratios, elem_max, kind, vmax, scales, q, err):
    """Rows b0:b1 of every problem p: ``w`` (P, K, N) float64 error-compensated weights, updated
    in place on rows b0:b1; ``u`` (P, K, K) inverse-Hessian factors; ``scales`` (P, K // block,
    N) float32, chosen here at block starts when ``choose``; writes ``q`` (P, K, N) float32
    rounded weights and ``err`` (P, b1 - b0, N) float64 scaled errors for the caller's update of
    the rows after b1. Tasks (problem, chunk of columns) run on numba's threads.

    The batch is walked in sub-blocks of ``_SUB`` rows (whole scale blocks): rank-1 updates
    inside a sub-block, then the sub-block's errors reach each later row of the batch in one
    pass over that row. Every element still receives its updates one product and one
    subtraction at a time in row order, so the result is the row-by-row loop's to the bit; the
    loops run over 1-D row views from 0 so that LLVM vectorizes them (3x faster on SmolLM2)."""
    n_prob, k, n_cols = w.shape
    chunks = (n_cols + _CHUNK - 1) // _CHUNK
    for t in numba.prange(n_prob * chunks):
        p = t // chunks
        c0 = (t % chunks) * _CHUNK
        c1 = min(c0 + _CHUNK, n_cols)
        wp, up, qp, ep, sp = w[p], u[p], q[p], err[p], scales[p]
        width = c1 - c0
        sub = block * max(1, _SUB // block) if choose else _SUB
        for s0 in range(b0, b1, sub):
            s1 = min(s0 + sub, b1)
            for j in range(s0, s1):
                g = j // block
                if choose and j % block == 0:
                    _choose_scales(wp, j, min(j + block, k), c0, c1, ratios, elem_max, kind, vmax, sp[g])
                ujj = up[j, j]
                wrow, qrow, erow, srow = wp[j, c0:c1], qp[j, c0:c1], ep[j - b0, c0:c1], sp[g, c0:c1]
                for n in range(width):
                    s = srow[n]
                    x = wrow[n]
                    qv = round_element(np.float32(x) / s, kind, vmax) * s
                    qrow[n] = qv
                    erow[n] = (x - np.float64(qv)) / ujj
                for jj in range(j + 1, s1):
                    _axpy(wp[jj, c0:c1], erow, up[j, jj])
            for jj in range(s1, b1):
                target = wp[jj, c0:c1]
                for j in range(s0, s1):
                    _axpy(target, ep[j - b0, c0:c1], up[j, jj])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def rtn_round(w, block, ratios, elem_max, kind, vmax):
    """Round-to-nearest of float32 ``w`` (K, N) with the chooser's scale per block of ``block``
    rows and column: what ``formats.fake_quantize(w, fmt, axis=0, block_size=block)`` returns
    (the same caveat on exactly tied candidate errors as above)."""
    k, n_cols = w.shape
    q = np.empty((k, n_cols), np.float32)
    s = np.empty(n_cols, np.float32)
    for r0 in range(0, k, block):
        r1 = min(r0 + block, k)
        _choose_scales(w, r0, r1, 0, n_cols, ratios, elem_max, kind, vmax, s)
        for i in range(r0, r1):
            for n in range(n_cols):
                q[i, n] = round_element(w[i, n] / s[n], kind, vmax) * s[n]
    return q
