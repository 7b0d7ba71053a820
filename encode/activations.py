"""Activation encodings. Static: the scale and zero point of every quantized activation, from the
ranges calibration observed (optionally merged per RPTQ cluster).

Owns the mapping calibrated range -> (scale, zero point, axis); emitters write what it returns and
the scale searches (smoothing) evaluate the same numbers, so what is searched is what is emitted.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import ml_dtypes
import numpy as np

from lowbit import formats
from lowbit.core.initializers import SCALE_FLOOR, code_dtype
from lowbit.errors import LowbitError

__all__ = ["MIN_DYNAMIC_GROUP", "activation_qparams", "cluster_ranges", "dynamic_fake_quant", "dynamic_group_qmax",
           "dynamic_group_size"]


def activation_qparams(stats, spec, round_scale: Callable[[np.ndarray], np.ndarray] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, int | None]:  # fmt: skip
    """Static activation scale/zero point from calibrated ranges: (scale, zero_point, axis).

    ``round_scale`` (e.g. to a power of two) is applied to integer scales before the zero point
    is derived from them, so the zero point matches the scale actually stored."""
    lo, hi = stats.min.astype(np.float64), stats.max.astype(np.float64)
    if spec.range == "percentile":
        p = stats.percentile.astype(np.float64)
        lo, hi = np.maximum(lo, -p), np.minimum(hi, p)
    if spec.granularity == "per_tensor":
        lo, hi = np.array(lo.min()), np.array(hi.max())
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    axis = -1 if spec.granularity == "per_channel" else None
    if spec.format == "fp8_e4m3":
        scale = np.maximum(-lo, hi) / formats.get_format("fp8_e4m3").max_value
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        return scale, np.zeros(scale.shape, ml_dtypes.float8_e4m3fn), axis
    round_scale = round_scale or (lambda s: s)
    if spec.symmetric:
        _, qmax = formats.integer_codes(spec.format, signed=True)
        dtype = code_dtype(spec.format, signed=True)
        scale = np.maximum(-lo, hi) / float(qmax)
        scale = round_scale(np.where(scale > 0, scale, 1.0).astype(np.float32))
        return scale, np.zeros(scale.shape, dtype), axis
    _, qmax = formats.integer_codes(spec.format, signed=False)
    dtype = code_dtype(spec.format, signed=False)
    scale = (hi - lo) / float(qmax)
    scale = round_scale(np.where(scale > 0, scale, 1.0).astype(np.float32))
    zp = np.clip(np.rint(-lo / scale), 0, qmax).astype(dtype)
    return scale, zp, axis


def cluster_ranges(stats, labels: np.ndarray) -> SimpleNamespace:
    """Per-channel min/max (and percentile) replaced by their cluster's extreme values."""
    out = {}
    pct = stats.percentile if stats.percentile_sum is not None and stats.windows else None
    for attr, values, reduce in (("min", stats.min, np.minimum), ("max", stats.max, np.maximum), ("percentile", pct, np.maximum)):
        if values is None:
            continue
        init = np.inf if reduce is np.minimum else -np.inf
        per = np.full(labels.max() + 1, init)
        reduce.at(per, labels, values)
        out[attr] = per[labels].astype(np.float32)
    return SimpleNamespace(**out)


MIN_DYNAMIC_GROUP = 8  # fewer channels per run-time scale cost more scale bits than they save


def dynamic_group_size(channels: int, group_size: int) -> int:
    """Channels per run-time scale for an input of ``channels``: ``group_size`` (0 = the whole
    token), or where it does not divide them the largest divisor below it, so one recipe fits
    models whose widths differ (e.g. 64 on a 32-wide test model gives 32); a divisor smaller than
    :data:`MIN_DYNAMIC_GROUP` (or ``group_size`` if smaller) is refused."""
    if not group_size or group_size >= channels:
        return channels
    group = next(d for d in range(group_size, 0, -1) if channels % d == 0)
    if group < min(MIN_DYNAMIC_GROUP, group_size):
        raise LowbitError(f"activations.group_size {group_size}: no group of {min(MIN_DYNAMIC_GROUP, group_size)} to "
                          f"{group_size} channels divides the {channels} channels of an input")
    return group


def dynamic_group_qmax(fmt: str, channels: int, group_size: int, outlier_channels: np.ndarray | None = None) -> np.ndarray:
    """qmax per group of ``fmt`` (symmetric codes in [-qmax, qmax]: 127 for int8, 7 for int4); with
    int4, groups holding any of ``outlier_channels`` get int8's (an outlier cluster kept in int8)."""
    qmax = np.full(channels // group_size, float(formats.integer_codes(fmt)[1]), np.float32)
    if fmt == "int4" and outlier_channels is not None and len(outlier_channels):
        qmax[np.unique(np.asarray(outlier_channels) // group_size)] = float(formats.integer_codes("int8")[1])
    return qmax


def dynamic_fake_quant(x: np.ndarray, group_size: int, qmax: np.ndarray) -> np.ndarray:
    """Dynamic per-token-group quantization (:mod:`lowbit.emit.dynamic_act`) in numpy, float32
    op for op as the emitted graph computes it."""
    x = np.asarray(x, np.float32)
    g = x.reshape(*x.shape[:-1], -1, group_size)
    q = qmax.astype(np.float32)[:, None]
    s = np.maximum(np.abs(g).max(axis=-1, keepdims=True) / q, SCALE_FLOOR)
    return (np.rint(g / s) * s).reshape(x.shape)
