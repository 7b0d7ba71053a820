"""Scale choosers: which range statistic each block's scale is computed from.

``choose_scale`` supports four methods (the ``scale_method`` argument of encode/fake_quantize):

- ``"absmax"``: the block's max |x| (asymmetric: its min and max). Never clips.
- ``"percentile"`` (kwarg ``percentile=99.9``): the given percentile of |x| per block
  (asymmetric: the ``100 - p`` and ``p`` percentiles of x), linear interpolation as numpy's default.
- ``"mse"`` (kwargs ``min_ratio=0.5``, ``n_grid=26``): for each clip ratio r in
  ``linspace(1, min_ratio, n_grid)`` scale the absmax range by r, quantize, and keep per block the
  r with the smallest sum of squared errors (the first, i.e. largest, r wins ties). r = 1 is always
  a candidate, so the result is never worse than absmax.
- ``"weighted_mse"``: the same search minimising ``sum(weights * err^2)`` per block, with
  ``weights`` (same shape as x, finite, >= 0) the per-element importance (FGMP's Fisher weights).

For NVFP4 the ratio scales the block amax *before* the E4M3 rounding of the block scale; the
per-tensor scale always comes from the tensor's absmax. Unknown kwargs are errors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats.blocking import Blocking
from lowbit.formats.registry import ScaledFormat
from lowbit.formats.scales import BlockScales, quantize_values, scale_product, scales_from_range

__all__ = ["SCALE_METHODS", "choose_block_scales", "clip_ratios", "search_ratios"]

SCALE_METHODS = ("absmax", "percentile", "mse", "weighted_mse")
_KWARGS = {"absmax": {}, "percentile": {"percentile": 99.9},
           "mse": {"min_ratio": 0.5, "n_grid": 26},
           "weighted_mse": {"min_ratio": 0.5, "n_grid": 26}}


def choose_block_scales(fmt: ScaledFormat, xb: np.ndarray, blocking: Blocking, *,
                        symmetric: bool, method: str, weights: np.ndarray | None,
                        block_amax: np.ndarray, kwargs: dict[str, Any]) -> BlockScales:
    """Per-block scales for the block view ``xb`` (finite float32) by ``method``.

    ``block_amax`` is ``blocking.block_absmax(xb)``, which the caller has already computed.
    """
    opts = _options(fmt, method, weights, kwargs)
    tensor_amax = float(block_amax.max())
    if method == "percentile":
        return _percentile(fmt, xb, blocking, symmetric, opts["percentile"], tensor_amax)
    lo, hi, amax = _absmax_stats(xb, symmetric, block_amax)
    if method == "absmax":
        return scales_from_range(fmt, amax, tensor_amax=tensor_amax, lo=lo, hi=hi)
    wb = None
    if method == "weighted_mse":
        wb = blocking.to_blocks(np.asarray(weights, dtype=np.float32))
    return _search(fmt, xb, lo, hi, amax, wb, tensor_amax, opts)


def _options(fmt: ScaledFormat, method: str, weights: np.ndarray | None,
             kwargs: dict[str, Any]) -> dict[str, Any]:
    if method not in _KWARGS:
        raise LowbitError(f"{fmt.name}: unknown scale_method {method!r}; "
                          f"known: {', '.join(SCALE_METHODS)}")
    unknown = set(kwargs) - set(_KWARGS[method])
    if unknown:
        raise LowbitError(f"{fmt.name}: scale_method {method!r} takes no option(s) "
                          f"{sorted(unknown)}; it accepts {sorted(_KWARGS[method]) or 'none'}")
    if (weights is not None) != (method == "weighted_mse"):
        raise LowbitError(f"{fmt.name}: weights= is required by, and only used by, "
                          f"scale_method='weighted_mse' (got method {method!r})")
    opts = {**_KWARGS[method], **kwargs}
    if method == "percentile" and not 0 < float(opts["percentile"]) <= 100:
        raise LowbitError(f"{fmt.name}: percentile must be in (0, 100], got {opts['percentile']}")
    if method in ("mse", "weighted_mse"):
        if not 0 < float(opts["min_ratio"]) <= 1:
            raise LowbitError(f"{fmt.name}: min_ratio must be in (0, 1], got {opts['min_ratio']}")
        if int(opts["n_grid"]) < 1:
            raise LowbitError(f"{fmt.name}: n_grid must be >= 1, got {opts['n_grid']}")
    return opts


def _absmax_stats(xb: np.ndarray, symmetric: bool, block_amax: np.ndarray):
    if symmetric:
        return None, None, block_amax
    # Zero padding is harmless here: the asymmetric range always includes 0.
    return xb.min(axis=2, keepdims=True), xb.max(axis=2, keepdims=True), None


def _percentile(fmt: ScaledFormat, xb: np.ndarray, blocking: Blocking, symmetric: bool,
                p: float, tensor_amax: float) -> BlockScales:
    def per_block(data: np.ndarray, q: float) -> np.ndarray:
        if not blocking.padded:
            return np.percentile(data, q, axis=2, keepdims=True).astype(np.float32)
        # The last block is shorter: take its percentile over its real elements only.
        tail = blocking.dim - (blocking.n_blocks - 1) * blocking.block_size
        full = np.percentile(data[:, :-1], q, axis=2, keepdims=True)
        last = np.percentile(data[:, -1:, :tail], q, axis=2, keepdims=True)
        return np.concatenate([full, last], axis=1).astype(np.float32)

    if symmetric:
        return scales_from_range(fmt, per_block(np.abs(xb), p), tensor_amax=tensor_amax)
    return scales_from_range(fmt, None, tensor_amax=tensor_amax,
                             lo=per_block(xb, 100.0 - p), hi=per_block(xb, p))


def clip_ratios(opts: dict[str, Any]) -> np.ndarray:
    """The float32 clip ratios the MSE search tries, in order (``opts``: its two options)."""
    return np.linspace(1.0, float(opts["min_ratio"]), int(opts["n_grid"]), dtype=np.float32)


def search_ratios(method: str) -> np.ndarray:
    """Clip ratios of ``method`` with its default options: [1] for absmax, the grid for mse."""
    if method == "absmax":
        return np.ones(1, np.float32)
    if method != "mse":
        raise LowbitError(f"no clip-ratio grid for scale_method {method!r}")
    return clip_ratios(_KWARGS["mse"])


def _search(fmt: ScaledFormat, xb: np.ndarray, lo, hi, amax, wb: np.ndarray | None,
            tensor_amax: float, opts: dict[str, Any]) -> BlockScales:
    best: BlockScales | None = None
    best_err = None
    for r in clip_ratios(opts):
        if amax is not None:
            cand = scales_from_range(fmt, amax * r, tensor_amax=tensor_amax)
        else:
            cand = scales_from_range(fmt, None, tensor_amax=tensor_amax, lo=lo * r, hi=hi * r)
        diff = quantize_values(fmt, xb, cand) * scale_product(cand) - xb
        diff *= diff
        if wb is not None:
            diff *= wb
        err = diff.sum(axis=2, keepdims=True, dtype=np.float64)
        if best is None:
            best, best_err = cand, err
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        zp = None if cand.zero_point is None else np.where(better, cand.zero_point,
                                                             best.zero_point)
        best = BlockScales(np.where(better, cand.scale, best.scale), best.global_scale, zp)
    assert best is not None
    return best
