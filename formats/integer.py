"""INT-b, b in 2..8: two's-complement integers, round half to even, saturating.

``round`` (what :func:`lowbit.formats.cast` uses) saturates to the full two's-complement range
[-2^(b-1), 2^(b-1) - 1], so -128 stays representable for int8. Symmetric *scaled* quantization uses
the narrow, balanced range [-(2^(b-1) - 1), 2^(b-1) - 1] (``narrow=True``; what ONNX int8 weights
commonly use): absmax maps to 2^(b-1) - 1 and the quantizer is an odd function. Asymmetric
quantization (unsigned codes with a zero point) is done by the scaling code on top of
:meth:`IntElement.round_unsigned`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats.element import ElementFormat

__all__ = ["IntElement"]


@dataclasses.dataclass(frozen=True)
class IntElement(ElementFormat):
    """Signed b-bit integer element format; codes are b-bit two's complement in a uint8."""

    name: str
    bits: int

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise LowbitError(f"{self.name}: integer width must be 2..8 bits, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def umax(self) -> int:
        """Largest unsigned code (asymmetric quantization)."""
        return (1 << self.bits) - 1

    @property
    def max_value(self) -> float:
        return float(self.qmax)

    @property
    def scale_max(self) -> float:
        return float(self.qmax)

    def round(self, y: np.ndarray, *, narrow: bool = False) -> np.ndarray:
        v = np.rint(np.asarray(y, dtype=np.float32))
        np.clip(v, -self.qmax if narrow else self.qmin, self.qmax, out=v)
        v += np.float32(0.0)  # -0.0 -> +0.0: integers have one zero
        return v

    def encode_reference(self, y: np.ndarray, *, narrow: bool = False) -> np.ndarray:
        v = self.round(y, narrow=narrow)
        return v.astype(np.int8).view(np.uint8) & np.uint8(self.umax)

    def round_unsigned(self, y: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        """Unsigned codes ``clip(rint(y) + zp, 0, 2^b - 1)`` as float32 integers (as ONNX Q)."""
        u = np.rint(np.asarray(y, dtype=np.float32))
        u += zero_point
        np.clip(u, 0, self.umax, out=u)
        return u

    def _table(self) -> np.ndarray:
        codes = np.arange(1 << self.bits, dtype=np.int32)
        sign = 1 << (self.bits - 1)
        return ((codes ^ sign) - sign).astype(np.float32)  # sign-extend b bits
