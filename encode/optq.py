"""OPTQ / GPTQ weight rounding: quantize input channels one at a time and push each channel's
rounding error onto the not-yet-quantized channels, weighted by the inverse Hessian of the
layer's output error (H = X^T X from calibration, Frantar et al.).

Assumes the linear-site map and ``site_capture`` (X^T X per input group, kept exact by the smooth
and reorder passes), and a symmetric INT or dINT weight format (per-channel or blocked along the
reduction axis). Does not edit the graph: it stores ``ctx.analyses.get(WEIGHT_ENCODINGS)[site name]``,
codes and scales that QDQ emission writes instead of round-to-nearest. Guarantees: the codes lie on
the recipe's grid with the recipe's block layout, so emission is unchanged otherwise.

Blocked scales are chosen when the rounding reaches a block, from the error-compensated weights
(as GPTQ's grouped variant does), with the recipe's scale chooser; with ``rounding.refit_scales``
they are then refit to the final codes (:mod:`lowbit.encode.scale_refit`). The report records,
per site, the proxy output error tr(dW^T H dW) of RTN and of OPTQ, H damped as OPTQ damps it
(OPTQ's comes from its own loop, updated by the refit; RTN's is estimated on up to 128 evenly
spaced output columns per site).

Speed: the algorithm is K sequential steps per problem, so the cost was numpy calls per step.

- Output channels are rounded independently given H: the sites sharing an input (q/k/v, gate/up)
  are one problem, and problems of the same shape (the same projection in every layer) are
  stacked and stepped together, each with its own H.
- The sequential part -- round a channel, choose a block's scales when the rounding reaches it,
  push the error onto the rest of the lazy batch -- is one compiled loop
  (:mod:`lowbit.encode.optq_kernel`, numba, parallel over problems and column chunks); the
  batch's errors reach the later channels as one matrix product (GPTQ's lazy batch update).
- The inverse-Hessian factor comes from one Cholesky factorization and a triangular inverse.
- Threads (one BLAS thread each): the problems of a batch are factored side by side (K >= 2048:
  one at a time on two BLAS threads), their lazy batch products split between the threads, each
  problem's refit runs in column slices side by side, and report and encoding per problem. The
  work is partitioned by the problem's shape, never by the thread count or the batch, so the
  result does not depend on either.
- Memory: a problem's weight is read a slice of output columns at a time
  (:class:`lowbit.core.weight_io.KnColumns`) and never held whole, so a vocabulary head costs its
  float32 codes and one slice's float64 copy, not its mapped or widened pages as well.

The result equals the plain numpy formulation kept in ``tests/encode/test_optq.py`` (the first
implementation; ~2000 s for SmolLM2 where this takes ~100 s on the same loaded machine): same codes and scales on synthetic problems and on a real SmolLM2
site; only float64 sums are reassociated, so a value within rounding noise of a grid midpoint, or
two scale candidates whose errors tie to the last bit, could in principle come out differently.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir
import scipy.linalg
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from lowbit import formats
from lowbit.core.analyses import WEIGHT_ENCODINGS
from lowbit.core.linear_sites import selected_sites
from lowbit.core.pass_base import LowbitPass
from lowbit.core.resume import code_digest, content_key
from lowbit.core.statistics import SITE_CAPTURE, permute_symmetric
from lowbit.core.weight_io import KnColumns
from lowbit.core.workers import call_on, worker_pool
from lowbit.errors import LowbitError
from lowbit.formats.choosers import search_ratios
from lowbit.encode.optq_kernel import element_kind, optq_batch, rtn_round
from lowbit.encode.scale_refit import refit_block_scales

__all__ = ["OptqPass", "optq_round", "optq_round_batch"]

logger = logging.getLogger(__name__)

_LAZY_BATCH = 128  # per-channel scales: rows whose updates are applied lazily, as one matrix product
_RTN_REPORT_COLUMNS = 128  # output columns per site on which the report estimates RTN's error
_BATCH_BYTES = 384 << 20  # float64 weights and inverse-Hessian factors stepped together (bounds the pass's extra memory)
# float64 weights of one step through the columns (a wider problem -- an 8B down_proj, a head -- is
# stepped in slices of columns; the slice's updates and codes scale with it)
_SLICE_BYTES = 128 << 20
_READ_BYTES = 16 << 20  # float32 columns of a problem's weight read at a time into its float64 copy
# the code whose results the resume store keeps (rounding, refit, formats): a change misses
_CODE = code_digest("lowbit.encode", "lowbit.formats")
_THREADS = os.cpu_count() or 1  # problems factored, updated and refit side by side, one BLAS thread each
# A factor of K >= this many channels runs alone on _FACTOR_THREADS BLAS threads (1.9x faster at
# K = 8192 on 2 cores; an 8B down_proj's is a minute on one). A constant, not the core count:
# OpenBLAS's Cholesky gives other bits on another thread count (the same on every run), and the
# rounding must not depend on the machine's cores or on how the compile batched its sites.
_THREADED_FACTOR_MIN = 2048
_FACTOR_THREADS = 2


def _inverse_hessian_factor(h: np.ndarray, damp: float, out: np.ndarray) -> None:
    """Write into ``out`` the upper Cholesky factor U of (H + damp * mean(diag) I)^-1, i.e.
    U^T U = H_damped^-1 (:func:`_factor_in_place` with H's diagonal as it is, in its order)."""
    diag = np.diag(h).astype(np.float64)
    out[...] = h[::-1, ::-1]
    _factor_in_place(out, diag[::-1] + damp * float(np.mean(diag)))


def _factor_in_place(buf: np.ndarray, damped_diag: np.ndarray) -> None:
    """``buf`` holds J H J (H's rows and columns reversed, C order) with ``damped_diag`` its
    diagonal to use; it is overwritten with U, the upper Cholesky factor of H_damped^-1.

    Without forming the inverse: H = U^-1 U^-T, so with J the index reversal, J H J = (J U^-1 J)
    (J U^-1 J)^T is a lower Cholesky factorization, and U = J L^-1 J for L = chol(J H J). One
    factorization and one triangular inverse, a quarter of the work of inverting H and factoring
    the inverse (the result is the same matrix up to rounding).

    Layout: LAPACK wants Fortran order. The C-order J H J read as Fortran order is its transpose,
    whose upper triangle holds J H J's lower one; factoring that as R^T R gives R = L^T in place,
    R^-1 in place, and R^-1 read back in C order is L^-1, whose reversal J L^-1 J is U: a reversal
    of the flat buffer. Everything happens in ``buf`` -- at K = 14336 (an 8B down_proj) each K x K
    float64 copy is 1.6 GB, and H itself stays alive for the refit.
    """
    k = len(buf)
    buf.flat[:: k + 1] = damped_diag
    upper = scipy.linalg.cholesky(buf.T, lower=False, overwrite_a=True, check_finite=False)
    if not np.shares_memory(upper, buf):  # LAPACK worked on a copy after all
        buf.T[...] = upper
        upper = buf.T
    inv, info = scipy.linalg.lapack.dtrtri(upper, lower=0, overwrite_c=1)
    if info != 0:
        raise LowbitError(f"optq: the damped Hessian is singular (dtrtri info {info}); raise rounding.damp")
    if not np.shares_memory(inv, buf):
        buf.T[...] = inv
    _reverse_in_place(buf.reshape(-1))


def _reverse_in_place(flat: np.ndarray, chunk: int = 1 << 20) -> None:
    """``flat[:] = flat[::-1]`` without numpy's whole temporary copy: mirrored chunks swapped."""
    n = flat.size
    for a in range(0, n // 2, chunk):
        b = min(a + chunk, n // 2)
        head = flat[a:b].copy()
        flat[a:b] = flat[n - b:n - a][::-1]
        flat[n - b:n - a] = head[::-1]


def _row_scales(rows: np.ndarray, fmt: str, scale_method: str) -> np.ndarray:
    """(P, N) scales of the (P, g, N) rows, as the format's chooser picks them per output channel."""
    p, g, n = rows.shape
    # the chooser sees contiguous (P * N, g) blocks: the layout RTN's chooser reduces over
    w = np.ascontiguousarray(rows.transpose(0, 2, 1), dtype=np.float32).reshape(p * n, g)
    return formats.choose_scale(w, fmt, axis=1, block_size=None, scale_method=scale_method).scale.reshape(p, n)


def _factor(hessian: np.ndarray, damp: float, order: bool, u_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Write one problem's inverse-Hessian factor into ``u_out``; returns the input-channel order
    (by decreasing H_jj with ``order``) and which channels are dead (H_jj <= 0, taken as 1), in
    that order. ``hessian`` is only read and its reversed (reordered) copy made in ``u_out``, or
    ``u_out`` is ``hessian``'s own buffer, reordered in place (the same elements)."""
    diag = np.diag(hessian).astype(np.float64)
    dead = diag <= 0
    diag[dead] = 1.0
    perm = np.argsort(-diag, kind="stable") if order else np.arange(len(diag))
    diag, dead = diag[perm], dead[perm]
    if np.shares_memory(hessian, u_out):  # J P^T H P J in place
        if order:
            permute_symmetric(u_out, perm[::-1])
        else:
            _reverse_in_place(u_out.reshape(-1))
    elif order:  # J P^T H P J, a slice of rows at a time (no second K x K temporary)
        rows = perm[::-1]
        step = max(1, (64 << 20) // (8 * len(rows)))
        for r in range(0, len(rows), step):
            u_out[r:r + step] = hessian[rows[r:r + step]][:, rows]
    else:
        u_out[...] = hessian[::-1, ::-1]
    _factor_in_place(u_out, diag[::-1] + damp * float(np.mean(diag)))
    return perm, dead


def _columns(w_kn: np.ndarray | KnColumns, perm: np.ndarray, dead: np.ndarray, cols: slice, out: np.ndarray) -> None:
    """Write the problem's float64 weights of output columns ``cols`` (rows in ``perm`` order, dead
    rows zero) into ``out``, read a narrow slice of columns at a time (a streamed weight's float32
    copies stay small)."""
    k = out.shape[0]
    start, stop, _ = cols.indices(w_kn.shape[1])
    step = max(1, _READ_BYTES // (4 * k))
    for c in range(start, stop, step):
        out[:, c - start:min(c + step, stop) - start] = w_kn[:, c:min(c + step, stop)][perm]
    out[dead, :] = 0.0


def optq_round_batch(weights: list[np.ndarray | KnColumns], hessians: list[np.ndarray], fmt: str, block: int | None, *,
                     damp: float = 0.01, scale_method: str = "absmax", act_order: bool = False,
                     ) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """:func:`optq_round` of P problems of one shape (K, N), stepped together."""
    results = _optq_solve(weights, list(hessians), fmt, block, damp=damp, scale_method=scale_method,
                          act_order=act_order, consume=False)  # fmt: skip
    return [(q, scale) for q, scale, _ in results]


def _optq_solve(weights: list[np.ndarray | KnColumns], hessians: list[np.ndarray], fmt: str, block: int | None, *,
                damp: float, scale_method: str, act_order: bool, consume: bool = False,
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:  # fmt: skip
    """(rounded weights, scales, proxy error per output column) of each problem. The proxy error
    tr(D^T H_damped D) comes free from the loop: it is the sum over steps of the squared scaled
    errors ((w_j - q_j) / U_jj)^2 (the Cholesky form of GPTQ's objective).

    ``hessians`` is narrowed in place: its entries become the float32 X^T X, all that the refit
    and the report read. With ``consume`` the caller gives up its float64 arrays (it holds no
    other reference): a lone problem's factor is then built inside X^T X's own buffer once the
    float32 copy is taken, so an 8B down_proj holds 1.6 + 0.8 GB instead of 1.6 (H) + 1.6 (factor)
    + 0.8; a batch's float64 X^T X is freed as each factor is built."""
    n_prob, (k, n) = len(weights), weights[0].shape
    own = consume and n_prob == 1
    if own:  # the factor replaces X^T X in its buffer
        sources = [hessians[0]]
        hessians[0] = sources[0].astype(np.float32)
        u = sources[0].reshape(1, k, k)
    else:
        sources, u = hessians, np.empty((n_prob, k, k))
    # output columns round independently given H: a wide problem (a vocabulary-sized head) is
    # stepped in slices of columns, so its float64 copy stays within the batch budget
    width = max(1, min(n, _SLICE_BYTES // (8 * k * n_prob)))
    with worker_pool(_THREADS) as pool:  # LAPACK and BLAS release the GIL
        order = act_order and block is None
        if k >= _THREADED_FACTOR_MIN:  # one problem at a time, on a fixed number of BLAS threads
            with threadpool_limits(_FACTOR_THREADS, user_api="blas"):
                factored = []
                for p in range(n_prob):
                    factored.append(call_on(pool, _factor, sources[p], damp, order, u[p]))  # a signal stops the wait
                    if not own:
                        hessians[p] = hessians[p].astype(np.float32)
        else:
            factored = list(pool.map(lambda p: _factor(sources[p], damp, order, u[p]), range(n_prob)))
            if not own:
                hessians[:] = [h.astype(np.float32) for h in hessians]
        perms = [perm for perm, _ in factored]
        if width == n:
            w = np.empty((n_prob, k, n))  # float64, error-compensated in place
            for p, (perm, dead) in enumerate(factored):
                _columns(weights[p], perm, dead, slice(None), w[p])
            return _optq_steps(w, u, perms, fmt, block, scale_method, pool)
        # per problem: codes (K, N) and scales (blocks, N) filled slice by slice, proxy errors (N,)
        out = [(np.empty((k, n), np.float32), np.empty((-(-k // (block or k)), n), np.float32), np.empty(n))
               for _ in range(n_prob)]  # fmt: skip
        for c0 in range(0, n, width):
            cols = slice(c0, min(c0 + width, n))
            w = np.empty((n_prob, k, cols.stop - c0))
            for p, (perm, dead) in enumerate(factored):
                _columns(weights[p], perm, dead, cols, w[p])
            for p, part in enumerate(_optq_steps(w, u, perms, fmt, block, scale_method, pool)):
                for whole, piece in zip(out[p], part):
                    whole[..., cols] = piece
            del w
    return out


def _optq_steps(w: np.ndarray, u: np.ndarray, perms: list[np.ndarray], fmt: str, block: int | None,
                scale_method: str, pool: ThreadPoolExecutor) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The rounding loop of :func:`_optq_solve` on the prepared (P, K, N) weights ``w`` and
    factors ``u``; the lazy batch updates are split over ``pool``'s threads by problem (by output
    column for fewer problems than threads): each element is the same product as in one call."""
    n_prob, k, n = w.shape
    if n_prob >= _THREADS:
        parts = [(slice(a[0], a[-1] + 1), slice(None)) for a in np.array_split(np.arange(n_prob), _THREADS)]
    else:
        parts = [(slice(None), slice(a[0], a[-1] + 1)) for a in np.array_split(np.arange(n), _THREADS) if len(a)]
    g = block or k
    element = formats.get_format(fmt).element
    kind, vmax = element_kind(element)
    scales = np.zeros((n_prob, -(-k // g), n), np.float32)
    if block is None:
        scales[:, 0] = _row_scales(w, fmt, scale_method)
    q = np.empty((n_prob, k, n), np.float32)
    step = g * max(1, _LAZY_BATCH // g) if block else _LAZY_BATCH
    err = np.empty((n_prob, step, n))
    ratios = search_ratios(scale_method)
    proxy = np.zeros((n_prob, n))
    for b0 in range(0, k, step):
        b1 = min(b0 + step, k)
        optq_batch(w, u, b0, b1, g, block is not None, ratios, np.float32(element.scale_max), kind,
                   np.float32(vmax), scales, q, err)  # fmt: skip
        # the batch's errors reach the later rows as one matrix product (lazy batch update)
        def update(part: tuple[slice, slice], b0: int = b0, b1: int = b1) -> None:
            p, cols = part
            w[p, b1:, cols] -= np.matmul(u[p, b0:b1, b1:].transpose(0, 2, 1), err[p, : b1 - b0, cols])

        list(pool.map(update, parts))
        proxy += np.einsum("pbn,pbn->pn", err[:, : b1 - b0], err[:, : b1 - b0])
    return [(np.ascontiguousarray(q[p][np.argsort(perm)]), scales[p], proxy[p]) for p, perm in enumerate(perms)]


def optq_round(w_kn: np.ndarray, hessian: np.ndarray, fmt: str, block: int | None, *,
               damp: float = 0.01, scale_method: str = "absmax", act_order: bool = False,
               ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Rounded weights (K, N) on the grid and their scales (ceil(K / g), N), g = block or K."""
    return optq_round_batch([w_kn], [hessian], fmt, block, damp=damp, scale_method=scale_method, act_order=act_order)[0]


def _proxy_errors(w: np.ndarray, q: np.ndarray, h: np.ndarray, damp: float) -> np.ndarray:
    """tr(D^T H_damped D) of each output column, D = W - Q, with OPTQ's damping (float32 products:
    a report figure)."""
    d = (w - q).astype(np.float32)
    dead = np.diag(h) <= 0  # as OPTQ's _factor: dead channels carry no error
    d[dead] = 0.0
    lam = damp * float(np.mean(np.where(dead, 1.0, np.diag(h).astype(np.float64))))
    quadratic = np.einsum("kn,kn->n", d, h.astype(np.float32) @ d, dtype=np.float64)
    return quadratic + lam * np.einsum("kn,kn->n", d, d, dtype=np.float64)


class OptqPass(LowbitPass):
    """Round every selected site's weight with OPTQ into ``ctx``'s ``weight_encodings``."""

    REQUIRES = (SITE_CAPTURE,)
    ENSURES = (WEIGHT_ENCODINGS,)
    PRESERVES_FUNCTION = True  # analysis only: the graph is not edited
    BLOCKWISE = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        recipe = self.ctx.recipe
        captures = self.ctx.analyses.get(SITE_CAPTURE)  # the recipe was checked: symmetric int/dint weights
        # A large model's weights that earlier passes rewrote in memory (smoothed, permuted) go to
        # the scratch file first: the problems read them a slice at a time from there, so an 8B
        # head permuted by the reorder is not 2.1 GB of float32 beside its own codes.
        self.ctx.release_rewritten()
        # one problem per input group (its sites' columns side by side), batched by shape
        by_shape: dict[tuple[int, int], list[list]] = defaultdict(list)
        for group in self.ctx.sites.input_groups():
            sites = selected_sites(group, (*recipe.sites.exclude, *recipe.sites.int8_weights))  # int8: RTN
            if sites and group[0].input.name in captures:  # weights are read batch by batch
                shape = (sites[0].in_features, sum(s.out_features for s in sites))
                by_shape[shape].append([sites, None, captures[group[0].input.name]])
        batches = []
        for (k, n), problems in by_shape.items():
            size = max(1, _BATCH_BYTES // (8 * k * (n + k)))  # each problem: (K, N) weights and a K x K factor
            batches += [problems[i:i + size] for i in range(0, len(problems), size)]
        # a block-wise compile calls the pass once per block: earlier blocks' entries stay
        encodings = self.ctx.analyses.find(WEIGHT_ENCODINGS) or {}
        report = self.ctx.report.get("optq", {}).get("sites", {})
        # One BLAS thread: the factorizations and products here are small, and on a shared
        # 2-core machine OpenBLAS's threads made this pass 3x slower (211 s vs 68 s, SmolLM2).
        with tqdm(total=sum(len(b) for b in batches), desc="OPTQ", unit="group", leave=False, disable=None) as bar, \
                threadpool_limits(1, user_api="blas"):
            for batch in batches:
                for problem in batch:  # read a slice of columns at a time: no whole copy of a head
                    problem[1] = KnColumns(problem[0])
                # Still one BLAS thread for a batch of one problem (one block of a block-wise
                # compile): on two threads OpenBLAS's Haswell kernels give other bits (measured: a
                # 576 x 576 Cholesky; the tiny decoder's lm_head refit), and the rounding must not
                # depend on how the compile batched its sites. The second core then idles here (a 1B model's
                # down_proj factor and refit: 24 s on one thread).
                self._round(batch, encodings, report)
                for problem in batch:
                    problem[1] = None  # at most one batch of weights in memory
                bar.update(len(batch))
        self.ctx.analyses.put(WEIGHT_ENCODINGS, encodings)
        gains = [r["rtn_proxy_error"] / r["optq_proxy_error"] for r in report.values() if r["optq_proxy_error"] > 0]
        self.ctx.report["optq"] = {"sites": report, "median_error_reduction": float(np.median(gains)) if gains else None}
        logger.info("optq: rounded %d sites (median proxy error reduction x%.2f)", len(encodings), np.median(gains) if gains else 0)
        return ir.passes.PassResult(model, modified=False)

    def _round(self, batch: list[list], encodings: dict, report: dict) -> None:
        wspec, rspec = self.ctx.recipe.weights, self.ctx.recipe.rounding
        k = batch[0][1].shape[0]  # one shape per batch
        block = min(wspec.block_size, k) if wspec.block_size else None  # a longer block is the whole axis
        memo, keys = self.ctx.resume, {}
        if memo is not None:  # an interrupted compile's results, reused where nothing they came from changed
            settings = (_CODE, wspec.format, block, wspec.scale_method, rspec.damp, rspec.act_order, rspec.refit_scales)
            todo = []
            for problem in batch:
                sites, w, capture = problem
                key = content_key("optq", settings, [(s.name, s.out_features, s.reduction_axis) for s in sites],
                                  w.digest(), capture.hessian)  # fmt: skip
                stored = memo.load(key)
                if stored is None:
                    keys[id(problem)] = key
                    todo.append(problem)
                    continue
                for name, enc, entry in _unpack_entries(stored):
                    encodings[name], report[name] = enc, entry
            batch = todo
            if not batch:
                return
        # OPTQ is X^T X's last reader: the solve holds the only reference to each float64 one (it
        # builds a factor in its buffer); the captures get float32 ones back
        hessians = [capture.hessian for _, _, capture in batch]
        for _, _, capture in batch:
            capture.hessian = None
        try:
            results = _optq_solve([w for _, w, _ in batch], hessians, wspec.format, block, damp=rspec.damp,
                                  scale_method=wspec.scale_method, act_order=rspec.act_order, consume=True)  # fmt: skip
        finally:
            for (_, _, capture), h in zip(batch, hessians):
                capture.hessian = h
        element = formats.get_format(wspec.format).element
        kind, vmax = element_kind(element)
        ratios, elem_max, vmax = search_ratios(wspec.scale_method), np.float32(element.scale_max), np.float32(vmax)

        def finish(problem: tuple[list, tuple]) -> list[tuple[str, object, dict]]:
            """Report and encode one problem (its sites' entries, in order)."""
            (sites, w, capture), (q_all, scale_all, optq_err) = problem
            out = []
            # RTN's error for the report, on evenly spaced columns of each site (columns round
            # independently): the exact figure cost a fifth of the pass
            sample = [np.linspace(0, s.out_features - 1, min(s.out_features, _RTN_REPORT_COLUMNS)).astype(np.int64)
                      for s in sites]  # fmt: skip
            offsets = np.cumsum([0] + [s.out_features for s in sites])
            cols_all = np.concatenate([c + o for c, o in zip(sample, offsets)])
            w_sample = np.ascontiguousarray(w[:, cols_all], dtype=np.float32)
            rtn = rtn_round(w_sample, block or w.shape[0], ratios, elem_max, kind, vmax)
            rtn_err = _proxy_errors(w_sample, rtn, capture.hessian, rspec.damp)
            start = 0
            per_site = np.split(rtn_err, np.cumsum([len(c) for c in sample])[:-1])
            for site, picked, sampled_err in zip(sites, sample, per_site):
                cols = slice(start, start + site.out_features)
                start = cols.stop
                rtn_site = float(sampled_err.sum()) * site.out_features / len(picked)
                q, scale = q_all[:, cols], scale_all[:, cols]
                stored, stored_scale = (q, scale) if site.reduction_axis == 0 else (q.T, scale.T)
                # a slice of output channels at a time: a vocabulary head's float32 copies are 1-2 GB
                enc = formats.encode_sliced(stored, wspec.format, axis=site.reduction_axis,
                                            block_size=block, scale=stored_scale)  # fmt: skip
                out.append((site.name, enc, {"rtn_proxy_error": rtn_site, "optq_proxy_error": float(optq_err[cols].sum())}))
            if memo is not None:
                memo.save(keys[id(problem[0])], _pack_entries(out))
            return out

        # BLAS threads as the caller set them (one): each problem's refit in column slices side by
        # side (a block-wise compile's batch is one problem), then the problems' reports and codes
        with worker_pool(_THREADS) as pool:
            if rspec.refit_scales:
                results = [refit_block_scales(w, q, scale, capture.hessian, rspec.damp, block, err, pool=pool)
                           for (_, w, capture), (q, scale, err) in zip(batch, results)]  # fmt: skip
            for entries in pool.map(finish, zip(batch, results)):
                for name, enc, entry in entries:
                    encodings[name], report[name] = enc, entry


def _pack_entries(entries: list[tuple[str, formats.Encoded, dict]]) -> dict[str, np.ndarray]:
    """One problem's sites (name, encoding, report entry) as arrays for the resume store; 4-bit
    codes two per byte."""
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for i, (name, enc, entry) in enumerate(entries):
        nibbles = formats.get_format(enc.fmt).bits <= 4
        arrays[f"{i}.codes"] = formats.pack_nibbles(enc.codes) if nibbles else enc.codes
        arrays[f"{i}.scale"] = enc.scale
        if enc.zero_point is not None:
            arrays[f"{i}.zero_point"] = enc.zero_point
        meta.append({"name": name, "fmt": enc.fmt, "shape": list(enc.shape), "axis": enc.axis, "block_size": enc.block_size,
                     "global_scale": float(enc.global_scale), "nibbles": nibbles, "report": entry})  # fmt: skip
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def _unpack_entries(arrays: dict[str, np.ndarray]) -> list[tuple[str, formats.Encoded, dict]]:
    out = []
    for i, m in enumerate(json.loads(str(arrays["meta"]))):
        shape = tuple(m["shape"])
        codes = arrays[f"{i}.codes"]
        if m["nibbles"]:
            codes = formats.unpack_nibbles(codes, int(np.prod(shape))).reshape(shape)
        enc = formats.Encoded(m["fmt"], shape, m["axis"], m["block_size"], codes, arrays[f"{i}.scale"],
                              np.float32(m["global_scale"]), arrays.get(f"{i}.zero_point"))  # fmt: skip
        out.append((m["name"], enc, m["report"]))
    return out
