"""E8M0 scale cast / encode / decode against ml_dtypes.float8_e8m0fnu.

One documented difference: for float32 *subnormal* inputs in (2^-127, 2^-126) ml_dtypes rounds
on the raw bit pattern (e.g. 1.25 x 2^-127 -> 2^-126) while lowbit rounds to the nearest power of
two (-> 2^-127). The oracle comparison therefore covers inputs >= 2^-126 (float32 normals, after
clipping to E8M0's finite range above); the subnormal range is checked by hand below.
"""

import ml_dtypes
import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.formats import cast_e8m0, decode_e8m0, encode_e8m0

LO, HI = np.float32(2.0**-127), np.float32(2.0**127)


def _oracle(x: np.ndarray) -> np.ndarray:
    return np.clip(x, LO, HI).astype(ml_dtypes.float8_e8m0fnu).astype(np.float32)


def test_cast_matches_ml_dtypes_on_every_positive_float16():
    x = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(cast_e8m0(x), _oracle(x))


def test_cast_matches_ml_dtypes_on_random_float32_and_ties():
    rng = np.random.default_rng(2)
    e = np.arange(-127, 128, dtype=np.float64)
    ties = (1.5 * np.exp2(e)).astype(np.float32)  # exactly halfway in linear distance
    with np.errstate(over="ignore"):  # 2^128 and above become +Inf on purpose
        wide = np.exp2(rng.uniform(-140, 140, 50000)).astype(np.float32)
    x = np.concatenate([
        wide,  # incl. out of range both ways
        ties, np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(np.inf)),
        np.exp2(e).astype(np.float32),
        np.float32([1e-45, 1e-40, 3e38, np.inf]),
    ])
    x = x[x >= np.float32(2.0**-126)]
    assert x.size > 45000
    np.testing.assert_array_equal(cast_e8m0(x).view(np.uint32), _oracle(x).view(np.uint32))


def test_cast_below_float32_normals_by_hand():
    t = 2.0**-127
    x = np.float32([0.25 * t, t, 1.25 * t, 1.5 * t, 1.75 * t, 1e-45])
    assert cast_e8m0(x).tolist() == [t, t, t, 2 * t, 2 * t, t]


def test_cast_of_non_positive_is_nan():
    assert np.isnan(cast_e8m0(np.float32([0.0, -1.0, np.nan]))).all()


def test_codes_round_trip_and_match_ml_dtypes():
    codes = np.arange(256, dtype=np.uint8)
    want = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    got = decode_e8m0(codes)
    np.testing.assert_array_equal(got[:255], want[:255])
    assert np.isnan(got[255]) and np.isnan(want[255])
    np.testing.assert_array_equal(encode_e8m0(got[:255]), codes[:255])
    assert decode_e8m0(np.uint8([127, 128, 125])).tolist() == [1.0, 2.0, 0.25]


@pytest.mark.parametrize("bad", [3.0, 0.0, -2.0, 2.0**-130, np.inf])
def test_encode_rejects_non_powers_of_two(bad):
    with pytest.raises(LowbitError, match="E8M0"):
        encode_e8m0(np.float32([1.0, bad]))
