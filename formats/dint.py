"""dINT-b: an integer grid plus a denormal half-step (lowbit's definition, written only here).

Source: Lee et al. 2023, "Enhancing Computation Efficiency in Large Language Models through Weight
and Activation Quantization" (dINT). The paper's exact code table could not be confirmed, so lowbit
defines dINT-b as follows and every other module uses this one:

- a b-bit **sign-magnitude** code: bit b-1 is the sign, the low b-1 bits are the magnitude code m;
- magnitude code m decodes to ``0`` (m = 0), ``0.5`` (m = 1), ``m - 1`` (m >= 2);
  so dINT4 = {0, +-0.5, +-1, +-2, +-3, +-4, +-5, +-6}, balanced, max 2^(b-1) - 2 (6 for dINT4);
- the "negative zero" code (sign set, m = 0) decodes to 0; ``encode`` never produces it;
- rounding: to the nearest value, ties to the **even code** m. Hence 0.25 -> 0 (m 0), 0.75 -> 1
  (m 2), 1.5 -> 1 (m 2), 2.5 -> 3 (m 4): above 1 the integer ties go to the odd value;
- saturation at the max magnitude; symmetric scale = absmax / max (absmax / 6 for dINT4).

The half-step keeps small values from collapsing to zero, which is the point of the format.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats.element import ElementFormat

__all__ = ["DintElement"]


@dataclasses.dataclass(frozen=True)
class DintElement(ElementFormat):
    """dINT-b element format (see the module docstring for the definition)."""

    name: str
    bits: int

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise LowbitError(f"{self.name}: dINT width must be 2..8 bits, got {self.bits}")

    @property
    def max_code(self) -> int:
        """Largest magnitude code 2^(b-1) - 1."""
        return (1 << (self.bits - 1)) - 1

    @property
    def max_value(self) -> float:
        return _magnitude(self.max_code)

    @property
    def scale_max(self) -> float:
        return self.max_value

    def magnitude_codes(self, a: np.ndarray) -> np.ndarray:
        """Magnitude code m (float32 holding 0..max_code) of non-negative float32 ``a``."""
        a = np.minimum(a, np.float32(self.max_value))
        # Above 0.75 the value is an integer n >= 1 with code n + 1; "ties to the even code" is
        # ties to the odd n, i.e. rint(a - 1) + 1 (rint ties to even). a - 1 is exact for a >= 0.5.
        m = np.rint(a - np.float32(1.0))
        m += np.float32(2.0)
        # Below the 0.75 threshold: 0 up to and including the 0.25 tie, else the half-step.
        small = np.where(a > np.float32(0.25), np.float32(1.0), np.float32(0.0))
        return np.where(a >= np.float32(0.75), m, small)

    def round(self, y: np.ndarray, *, narrow: bool = False) -> np.ndarray:
        fast = self.round_by_table(y, narrow=narrow)  # the hot path of scale searches and OPTQ
        if fast is not None:
            return fast
        return self.round_reference(y)

    def round_reference(self, y: np.ndarray) -> np.ndarray:
        """The arithmetic rounding (the definition ``round``'s lookup table is built from)."""
        y = np.asarray(y, dtype=np.float32)
        m = self.magnitude_codes(np.abs(y))
        mag = np.where(m >= 2, m - np.float32(1.0), m * np.float32(0.5))
        out = np.where(y < 0, -mag, mag)
        out += np.float32(0.0)  # -0.0 -> +0.0: the negative-zero code is never produced
        return out

    def encode_reference(self, y: np.ndarray, *, narrow: bool = False) -> np.ndarray:
        y = np.asarray(y, dtype=np.float32)
        m = self.magnitude_codes(np.abs(y)).astype(np.uint8)
        sign = ((y < 0) & (m > 0)).astype(np.uint8) << np.uint8(self.bits - 1)
        return m | sign

    def _table(self) -> np.ndarray:
        codes = np.arange(1 << self.bits)
        mags = np.array([_magnitude(int(c) & self.max_code) for c in codes], dtype=np.float32)
        negative = (codes >> (self.bits - 1)) & 1
        return np.where((negative == 1) & (mags > 0), -mags, mags).astype(np.float32)


def _magnitude(m: int) -> float:
    """The dINT decoding rule for one magnitude code (the definition above)."""
    return 0.0 if m == 0 else 0.5 if m == 1 else float(m - 1)
