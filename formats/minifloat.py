"""Small IEEE-like floats: FP8 E4M3FN, FP8 E5M2, FP4 E2M1. Round to nearest even, saturating.

Rounding works on the float32 bit pattern, so it is exact and vectorised: for |y| clipped to the
largest finite value, the target exponent is ``e = max(exponent(|y|), emin)`` and the quantum is
``2^(e - mbits)``; ``n = rint(|y| / quantum)`` (rint ties to even) is then the significand as an
integer, and for subnormals (e = emin, n < 2^mbits) it is the whole magnitude code. The code is
``((e + bias - 1) << mbits) + n`` in every case, including the carry into the next binade
(n = 2^(mbits+1)). Scaling by powers of two is exact, so no double rounding happens anywhere.

Saturation: everything beyond the largest finite value (including +-Inf) becomes +-max (448,
57344, 6); Inf is never produced. NaN passes through ``round`` unchanged. Negative values that
round to zero keep their sign (-0.0, code with only the sign bit set), as IEEE and ml_dtypes do.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats import constants as C
from lowbit.formats.element import ElementFormat

__all__ = ["MiniFloatElement", "FP8_E4M3", "FP8_E5M2", "FP4_E2M1"]


@dataclasses.dataclass(frozen=True)
class MiniFloatElement(ElementFormat):
    """A sign + ``ebits`` exponent + ``mbits`` mantissa float with the given bias and max."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max_finite: float
    has_inf: bool = False  # IEEE-like: exponent all ones, mantissa 0 is Inf (E5M2); else NaN

    def __post_init__(self) -> None:
        if not (1 <= self.ebits <= 5 and 1 <= self.mbits <= 3 and 1 + self.ebits + self.mbits <= 8):
            raise LowbitError(f"{self.name}: unsupported minifloat E{self.ebits}M{self.mbits}")

    @property
    def bits(self) -> int:  # type: ignore[override]
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (also the exponent of the subnormal quantum)."""
        return 1 - self.bias

    @property
    def max_value(self) -> float:
        return self.max_finite

    @property
    def scale_max(self) -> float:
        return self.max_finite

    def _significand(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(exponent e as int32, significand n as float32) of the rounded |y|; see module doc."""
        a = np.abs(np.asarray(y, dtype=np.float32))
        np.minimum(a, np.float32(self.max_finite), out=a)
        e = a.view(np.int32) >> C.F32_MANT_BITS  # biased float32 exponent (a >= 0: no sign bit)
        np.maximum(e, self.emin + C.F32_BIAS, out=e)
        # 2^(mbits - e) as float32 bits: biased exponent 127 + mbits - e = 2*127 + mbits - e_biased.
        inv_q = (2 * C.F32_BIAS + self.mbits - e) << C.F32_MANT_BITS
        n = a
        n *= inv_q.view(np.float32)
        np.rint(n, out=n)
        return e, n

    def round(self, y: np.ndarray, *, narrow: bool = False) -> np.ndarray:
        y = np.asarray(y, dtype=np.float32)
        e, n = self._significand(y)
        q = (e - self.mbits) << C.F32_MANT_BITS  # 2^(e - mbits) as float32 bits
        n *= q.view(np.float32)
        np.copysign(n, y, out=n)
        return n

    def encode_reference(self, y: np.ndarray, *, narrow: bool = False) -> np.ndarray:
        y = np.asarray(y, dtype=np.float32)
        e, n = self._significand(y)
        e -= C.F32_BIAS - self.bias + 1
        e <<= self.mbits
        e += n.astype(np.int32)
        codes = e.astype(np.uint8)
        codes |= (y.view(np.uint32) >> 31).astype(np.uint8) << np.uint8(self.bits - 1)
        return codes

    def _table(self) -> np.ndarray:
        codes = np.arange(1 << self.bits)
        mag_codes = codes & ((1 << (self.bits - 1)) - 1)
        exp = mag_codes >> self.mbits
        man = mag_codes & ((1 << self.mbits) - 1)
        # Subnormal (exp 0): man * 2^(emin - mbits);
        # normal: (2^mbits + man) * 2^(exp - bias - mbits).
        sig = np.where(exp == 0, man, man + (1 << self.mbits)).astype(np.float64)
        mags = sig * np.exp2(np.maximum(exp, 1) - self.bias - self.mbits)
        # Codes beyond the largest finite value are NaN (E4M3FN: S.1111.111) or Inf/NaN (E5M2).
        top = exp == (1 << self.ebits) - 1
        special = np.inf if self.has_inf else np.nan
        mags = np.where(mags > self.max_finite, np.where(top & (man == 0), special, np.nan), mags)
        return np.where(codes >> (self.bits - 1) == 1, -mags, mags).astype(np.float32)


FP8_E4M3 = MiniFloatElement("fp8_e4m3", C.E4M3_EBITS, C.E4M3_MBITS, C.E4M3_BIAS, C.E4M3_MAX)
FP8_E5M2 = MiniFloatElement("fp8_e5m2", C.E5M2_EBITS, C.E5M2_MBITS, C.E5M2_BIAS, C.E5M2_MAX,
                            has_inf=True)
FP4_E2M1 = MiniFloatElement("fp4_e2m1", C.E2M1_EBITS, C.E2M1_MBITS, C.E2M1_BIAS, C.E2M1_MAX)
