"""E8M0: the OCP MX shared scale, an unsigned power of two 2^(code - 127), code 0xFF = NaN.

Representable values are 2^-127 .. 2^127 (no zero, no sign, no Inf). ``cast_e8m0`` rounds an
arbitrary positive value to the nearest power of two in linear distance with ties (1.5 x 2^e) going
to the larger power, and saturates at both ends; this is what ml_dtypes' ``float8_e8m0fnu`` does
for in-range values. The MX scale rule itself never rounds (it takes floor(log2(amax))), so this
cast only matters for user-supplied scales and for tests.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats import constants as C

__all__ = ["cast_e8m0", "encode_e8m0", "decode_e8m0", "floor_log2"]


def floor_log2(a: np.ndarray) -> np.ndarray:
    """Exact floor(log2(a)) as int32 for positive finite float32 ``a`` (float32 subnormals too)."""
    _, exp = np.frexp(np.asarray(a, dtype=np.float32))  # a = m * 2^exp with m in [0.5, 1)
    return exp.astype(np.int32) - 1


def cast_e8m0(x: np.ndarray) -> np.ndarray:
    """Round positive float32 values to E8M0 (float32 powers of two); non-positive -> NaN."""
    x = np.asarray(x, dtype=np.float32)
    positive = x > 0  # False for NaN as well
    safe = np.where(positive, x, np.float32(1.0))
    mant, exp = np.frexp(safe)  # mant in [0.5, 1): round up from 0.75 (= 1.5 x 2^(exp-1)) on
    e = exp.astype(np.int32) - 1 + (mant >= 0.75)
    e[np.isposinf(x)] = C.E8M0_EMAX  # frexp(inf) has no meaningful exponent; saturate
    np.clip(e, C.E8M0_EMIN, C.E8M0_EMAX, out=e)
    out = np.ldexp(np.float32(1.0), e).astype(np.float32)
    out[~positive] = np.nan
    return out


def encode_e8m0(scale: np.ndarray) -> np.ndarray:
    """uint8 biased exponents of exact powers of two in [2^-127, 2^127]; else LowbitError."""
    s = np.asarray(scale, dtype=np.float32)
    if s.size and not (np.all(s > 0) and np.all(np.isfinite(s))):
        raise LowbitError("E8M0 scales must be positive and finite")
    mant, exp = np.frexp(s)
    e = exp.astype(np.int32) - 1
    bad = (mant != 0.5) | (e < C.E8M0_EMIN) | (e > C.E8M0_EMAX)
    if np.any(bad):
        raise LowbitError(
            f"E8M0 scales must be powers of two in [2^-127, 2^127]; {int(np.count_nonzero(bad))} "
            f"of {s.size} are not (first: {s[bad].flat[0]!r})"
        )
    return (e + C.E8M0_BIAS).astype(np.uint8)


def decode_e8m0(codes: np.ndarray) -> np.ndarray:
    """float32 values 2^(code - 127) of uint8 E8M0 codes; code 0xFF decodes to NaN."""
    c = np.asarray(codes, dtype=np.uint8)
    e = np.minimum(c, C.E8M0_NAN_CODE - 1).astype(np.int32) - C.E8M0_BIAS  # 0xFF set to NaN below
    out = np.ldexp(np.float32(1.0), e).astype(np.float32)
    out[c == C.E8M0_NAN_CODE] = np.nan
    return out
