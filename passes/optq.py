"""OPTQ / GPTQ weight rounding: quantize input channels one at a time and push each channel's
rounding error onto the not-yet-quantized channels, weighted by the inverse Hessian of the
layer's output error (H = X^T X from calibration, Frantar et al.).

Assumes the linear-site map and ``site_capture`` (X^T X per input group, kept exact by the smooth
and reorder passes), and a symmetric INT or dINT weight format (per-channel or blocked along the
reduction axis). Does not edit the graph: it stores ``ctx.get("weight_encodings")[site name]``,
codes and scales that QDQ emission writes instead of round-to-nearest. Guarantees: the codes lie on
the recipe's grid with the recipe's block layout, so emission is unchanged otherwise.

Blocked scales are chosen when the rounding reaches a block, from the error-compensated weights
(as GPTQ's grouped variant does), with the recipe's scale chooser. The report records, per site,
the proxy output error tr(dW^T H dW) of RTN and of OPTQ.
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import onnx_ir as ir
import scipy.linalg

from lowbit import formats
from lowbit.compiler.context import CompileContext
from lowbit.errors import LowbitError
from lowbit.passes.folding import weight_kn

__all__ = ["OptqPass", "optq_round"]

logger = logging.getLogger(__name__)

_LAZY_BATCH = 128  # columns whose updates are applied lazily, as one matrix product


def _inverse_hessian_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of (H + damp * mean(diag) I)^-1."""
    h = h + np.eye(len(h)) * damp * float(np.mean(np.diag(h)))
    factor = scipy.linalg.cho_factor(h)
    h_inv = scipy.linalg.cho_solve(factor, np.eye(len(h)))
    return scipy.linalg.cholesky(h_inv, lower=False)


def _group_scale(w_block: np.ndarray, fmt: str, scale_method: str) -> np.ndarray:
    """(N, 1) scale of the (N, g) slice, as the format's chooser picks it."""
    return formats.choose_scale(w_block, fmt, axis=1, block_size=None, scale_method=scale_method).scale


def optq_round(w_kn: np.ndarray, hessian: np.ndarray, fmt: str, block: int | None, *,
               damp: float = 0.01, scale_method: str = "absmax", act_order: bool = False,
               ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Rounded weights (K, N) on the grid and their scales (ceil(K / g), N), g = block or K."""
    k, n = w_kn.shape
    wt = np.array(w_kn.T, dtype=np.float64)  # (N, K): columns are input channels
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order and block is None else np.arange(k)
    wt, h = wt[:, perm], h[np.ix_(perm, perm)]
    u = _inverse_hessian_factor(h, damp)
    g = block or k
    element = formats.get_format(fmt).element
    scales = np.zeros((n, -(-k // g)), np.float32)
    if block is None:
        scales[:, 0] = _group_scale(wt.astype(np.float32), fmt, scale_method)[:, 0]
    q = np.zeros_like(wt)
    lazy = g * max(1, _LAZY_BATCH // g) if block else _LAZY_BATCH
    for b0 in range(0, k, lazy):
        b1 = min(b0 + lazy, k)
        err = np.zeros((n, b1 - b0))
        for j in range(b0, b1):
            if block and j % g == 0:
                scales[:, j // g] = _group_scale(wt[:, j:j + g].astype(np.float32), fmt, scale_method)[:, 0]
            s = scales[:, j // g]
            col = wt[:, j].astype(np.float32)
            qj = element.round(col / s, narrow=True) * s
            q[:, j] = qj
            e = (wt[:, j] - qj) / u[j, j]
            wt[:, j + 1:b1] -= np.outer(e, u[j, j + 1:b1])
            err[:, j - b0] = e
        wt[:, b1:] -= err @ u[b0:b1, b1:]
    inv = np.argsort(perm)
    return np.ascontiguousarray(q[:, inv].T, dtype=np.float32), np.ascontiguousarray(scales.T)


def _proxy_error(w_kn: np.ndarray, q_kn: np.ndarray, h: np.ndarray) -> float:
    d = (w_kn - q_kn).astype(np.float64)
    return float(np.sum(d * (h @ d)))  # tr(D^T H D) as one matrix product


class OptqPass(ir.passes.InPlacePass):
    """Round every selected site's weight with OPTQ into ``ctx``'s ``weight_encodings``."""

    def __init__(self, ctx: CompileContext) -> None:
        super().__init__()
        self.ctx = ctx

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        recipe = self.ctx.recipe
        wspec, rspec = recipe.weights, recipe.rounding
        if not wspec.format.startswith(("int", "dint")) or not wspec.symmetric:
            raise LowbitError(f"rounding.method = optq needs symmetric int or dint weights, not {wspec.format!r}"
                              f"{'' if wspec.symmetric else ' (asymmetric)'}")  # fmt: skip
        captures = self.ctx.get("site_capture")
        block = wspec.block_size or None
        encodings, report = {}, {}
        for site in self.ctx.sites:
            if any(fnmatch.fnmatch(site.name, p) for p in recipe.sites.exclude) or site.input.name not in captures:
                continue
            h = captures[site.input.name].hessian
            w = weight_kn(site)
            q, scale = optq_round(w, h, wspec.format, block, damp=rspec.damp,
                                  scale_method=wspec.scale_method, act_order=rspec.act_order)  # fmt: skip
            stored, stored_scale = (q, scale) if site.reduction_axis == 0 else (q.T, scale.T)
            encodings[site.name] = formats.encode(stored, wspec.format, axis=site.reduction_axis,
                                                  block_size=block, scale=stored_scale)  # fmt: skip
            rtn = formats.fake_quantize(w, wspec.format, axis=0, block_size=block, scale_method=wspec.scale_method)
            report[site.name] = {"rtn_proxy_error": _proxy_error(w, rtn, h), "optq_proxy_error": _proxy_error(w, q, h)}
        self.ctx.put("weight_encodings", encodings)
        gains = [r["rtn_proxy_error"] / r["optq_proxy_error"] for r in report.values() if r["optq_proxy_error"] > 0]
        self.ctx.report["optq"] = {"sites": report, "median_error_reduction": float(np.median(gains)) if gains else None}
        logger.info("optq: rounded %d sites (median proxy error reduction x%.2f)", len(encodings), np.median(gains) if gains else 0)
        return ir.passes.PassResult(model, modified=False)
