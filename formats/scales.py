"""Scale rules: per-block range statistics -> scales, and the quantizer that applies them.

Everything here works on the block view ``(pre, nb, B, post)`` of :mod:`lowbit.formats.blocking`;
per-block arrays have shape ``(pre, nb, 1, post)``. The rules (``r`` = the block's range statistic:
absmax, a percentile, or a searched clip ratio times absmax):

- FLOAT32 symmetric: ``scale = r / element.scale_max`` (127 for int8, 6 for dint4/fp4, 448 e4m3).
- FLOAT32 asymmetric (INT only): range [lo, hi] always contains 0 (as ONNX Runtime does),
  ``scale = (hi - lo) / (2^b - 1)``, ``zero_point = clip(rint(-lo / scale), 0, 2^b - 1)``.
- NVFP4: ``g = tensor_amax / (6 * 448)`` over the whole tensor (1.0 if the tensor is all zero);
  ``sb = E4M3(r / (6 * g))``; a block whose ``r`` is 0 gets ``sb = 1.0`` before rounding (as
  ModelOpt does), and a nonzero block whose ``sb`` underflows E4M3 to 0 gets the smallest E4M3
  subnormal 2^-9, so no block scale is ever 0.
- E8M0 (MX): ``scale = 2^(floor(log2(r)) - emax_elem)`` clamped to [2^-127, 2^127]; 1.0 if r is 0.
- FLOAT32 zero-range blocks get scale 1.0 (every element is then 0; avoids dividing by zero).

Quantizing divides by the float32 product ``scale * global_scale`` (the FP8-rounded scale for
NVFP4) and decoding multiplies by the same product: how an ONNX Q/DQ chain computes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats import constants as C
from lowbit.formats.e8m0 import encode_e8m0, floor_log2
from lowbit.formats.integer import IntElement
from lowbit.formats.minifloat import FP8_E4M3
from lowbit.formats.registry import ScaledFormat, ScaleKind

__all__ = ["BlockScales", "scales_from_range", "check_explicit", "scale_product",
           "quantize_values", "nvfp4_global_scale"]

_ONE = np.float32(1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockScales:
    """Per-block scales in the block view: ``scale``/``zero_point`` are ``(pre, nb, 1, post)``."""

    scale: np.ndarray  # float32
    global_scale: np.float32
    zero_point: np.ndarray | None  # int32, asymmetric INT only


def nvfp4_global_scale(tensor_amax: float) -> np.float32:
    """NVFP4 per-tensor FP32 scale ``amax / (6 * 448)``; 1.0 for an all-zero tensor."""
    g = np.float32(tensor_amax) / np.float32(C.NVFP4_GLOBAL_DIVISOR)
    return g if g > 0 else _ONE


def scales_from_range(fmt: ScaledFormat, amax: np.ndarray, *, tensor_amax: float,
                      lo: np.ndarray | None = None, hi: np.ndarray | None = None) -> BlockScales:
    """Scales from per-block statistics: ``amax`` (symmetric) or ``lo``/``hi`` (asymmetric)."""
    if lo is not None:
        return _asymmetric(fmt, lo, hi)
    amax = np.asarray(amax, dtype=np.float32)
    kind = fmt.scale_kind
    if kind is ScaleKind.FLOAT32:
        s = amax / np.float32(fmt.element.scale_max)
        return BlockScales(np.where(s > 0, s, _ONE).astype(np.float32), _ONE, None)
    if kind is ScaleKind.NVFP4:
        g = nvfp4_global_scale(tensor_amax)
        raw = amax / (np.float32(C.E2M1_MAX) * g)
        sb = FP8_E4M3.round(np.where(raw > 0, raw, _ONE))
        e4m3_min = np.float32(2.0 ** (FP8_E4M3.emin - FP8_E4M3.mbits))
        return BlockScales(np.where(sb > 0, sb, e4m3_min).astype(np.float32), g, None)
    # E8M0: the shared exponent of OCP MX v1.0 (floor, not round: the largest element may then
    # exceed the element max and saturates, as the spec says).
    safe = np.where(amax > 0, amax, _ONE)
    e = np.where(amax > 0, floor_log2(safe) - fmt.mx_emax, 0)
    e = np.clip(e, C.E8M0_EMIN, C.E8M0_EMAX)
    return BlockScales(np.ldexp(_ONE, e).astype(np.float32), _ONE, None)


def _asymmetric(fmt: ScaledFormat, lo: np.ndarray, hi: np.ndarray) -> BlockScales:
    element = fmt.element
    assert isinstance(element, IntElement)  # guaranteed by the caller's supports_asymmetric check
    lo = np.minimum(np.asarray(lo, dtype=np.float32), np.float32(0.0))
    hi = np.maximum(np.asarray(hi, dtype=np.float32), np.float32(0.0))
    s = (hi - lo) / np.float32(element.umax)
    s = np.where(s > 0, s, _ONE).astype(np.float32)
    zp = np.clip(np.rint(-lo / s), 0, element.umax).astype(np.int32)
    return BlockScales(s, _ONE, zp)


def check_explicit(fmt: ScaledFormat, scale: np.ndarray, global_scale: float | None,
                   zero_point: np.ndarray | None) -> None:
    """Reject user-given scales the format cannot represent (raises LowbitError)."""
    name = fmt.name
    if scale.size and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise LowbitError(f"{name}: scales must be positive and finite")
    if fmt.scale_kind is ScaleKind.NVFP4:
        if global_scale is None:
            raise LowbitError(f"{name}: scale= needs global_scale= too (Encoded.global_scale)")
        if not (np.isfinite(global_scale) and global_scale > 0):
            raise LowbitError(f"{name}: global_scale must be positive and finite")
        off_grid = FP8_E4M3.round(scale) != scale
        if np.any(off_grid):
            raise LowbitError(f"{name}: {int(off_grid.sum())} block scales are not E4M3 values")
    elif global_scale is not None and global_scale != 1.0:
        raise LowbitError(f"{name}: global_scale is only used by nvfp4")
    if fmt.scale_kind is ScaleKind.E8M0:
        encode_e8m0(scale)  # raises unless every scale is a power of two in E8M0 range
    if zero_point is not None:
        umax = fmt.element.umax  # type: ignore[attr-defined]
        if np.any(zero_point < 0) or np.any(zero_point > umax):
            raise LowbitError(f"{name}: zero points must lie in [0, {umax}]")


def scale_product(scales: BlockScales) -> np.ndarray:
    """The float32 product ``scale * global_scale``, rounded to float32 before any use."""
    if scales.global_scale == _ONE:
        return scales.scale
    return (scales.scale * scales.global_scale).astype(np.float32)


def quantize_values(fmt: ScaledFormat, xb: np.ndarray, scales: BlockScales) -> np.ndarray:
    """Element values (before scaling) of the block view ``xb``: round(x / s) per the format."""
    y = xb / scale_product(scales)
    if scales.zero_point is not None:
        u = fmt.element.round_unsigned(y, scales.zero_point)  # type: ignore[attr-defined]
        u -= scales.zero_point
        return u
    return fmt.element.round(y, narrow=True)
