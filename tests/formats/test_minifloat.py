"""FP8 E4M3 / E5M2 and FP4 E2M1 against ml_dtypes (the independent oracle), bit for bit."""

import ml_dtypes
import numpy as np
import pytest

from lowbit.formats import cast, code_table, get_format
from lowbit.formats.minifloat import FP4_E2M1, FP8_E4M3, FP8_E5M2

ORACLE = {
    "fp8_e4m3": (FP8_E4M3, ml_dtypes.float8_e4m3fn),
    "fp8_e5m2": (FP8_E5M2, ml_dtypes.float8_e5m2),
    "fp4_e2m1": (FP4_E2M1, ml_dtypes.float4_e2m1fn),
}


def _all_float16() -> np.ndarray:
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    return x[~np.isnan(x)]  # includes +-0, subnormals, +-Inf


def _random_float32(element, rng) -> np.ndarray:
    grid = element.grid.astype(np.float64)
    mids = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)  # exact ties (they are float32-exact)
    assert np.array_equal(mids.astype(np.float64), (grid[:-1] + grid[1:]) / 2)
    near = np.concatenate([np.nextafter(mids, np.float32(np.inf)),
                           np.nextafter(mids, np.float32(0))])
    wide = np.exp2(rng.uniform(-40, 40, 20000)).astype(np.float32)  # normals, both over/underflow
    sub = rng.uniform(0, 2.0 ** element.emin, 5000).astype(np.float32)  # target subnormals
    f32_sub = (rng.integers(1, 1 << 23, 1000, dtype=np.uint32)).view(np.float32)  # f32 subnormals
    big = np.float32([element.max_value * 1.01, element.max_value * 1.0625, 1e30, np.inf])
    mags = np.concatenate([mids, near, wide, sub, f32_sub, big, grid.astype(np.float32)])
    return np.concatenate([mags, -mags])


def _oracle(x: np.ndarray, element, dtype) -> tuple[np.ndarray, np.ndarray]:
    clipped = np.clip(x, -element.max_value, element.max_value)
    q = clipped.astype(dtype)
    return q.astype(np.float32), q.view(np.uint8)


@pytest.mark.parametrize("fmt", sorted(ORACLE))
@pytest.mark.parametrize("source", ["all_float16", "random_float32"])
def test_matches_ml_dtypes_bit_for_bit(fmt, source):
    element, dtype = ORACLE[fmt]
    x = _all_float16() if source == "all_float16" else \
        _random_float32(element, np.random.default_rng(1))
    want_values, want_codes = _oracle(x, element, dtype)
    got = cast(x, fmt)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want_values.view(np.uint32))
    np.testing.assert_array_equal(element.encode(x), want_codes)  # lookup-table path
    np.testing.assert_array_equal(element.encode_reference(x), want_codes)  # arithmetic path


@pytest.mark.parametrize("fmt", sorted(ORACLE))
def test_code_table_matches_ml_dtypes(fmt):
    element, dtype = ORACLE[fmt]
    codes = np.arange(1 << element.bits, dtype=np.uint8)
    want = codes.view(dtype).astype(np.float32)
    got = code_table(fmt)
    assert got.shape == (1 << element.bits,)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))


def test_e2m1_table_by_hand():
    # Every E2M1 code: S.EE.M, exponent bias 1, E=0 subnormal (0.5 * M).
    want = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    got = code_table("fp4_e2m1")
    assert got.tolist() == want
    assert np.signbit(got[8])  # code 0b1000 is negative zero
    assert get_format("fp4_e2m1").grid.tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1,
                                                      1.5, 2, 3, 4, 6]


def test_e2m1_thresholds_ties_to_even_code():
    x = np.float32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, -0.25, -5.0])
    assert cast(x, "fp4_e2m1").tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0, -4.0]


def test_fp8_saturates_and_passes_nan():
    x = np.float32([1e6, -1e6, np.inf, -np.inf, np.nan, 464.0, 465.0])
    assert cast(x, "fp8_e4m3")[[0, 1, 2, 3, 5, 6]].tolist() == [448, -448, 448, -448, 448, 448]
    assert np.isnan(cast(x, "fp8_e4m3")[4])
    assert cast(x[:4], "fp8_e5m2").tolist() == [57344, -57344, 57344, -57344]


def test_subnormals_are_exact():
    # Smallest subnormals: E4M3 2^-9, E5M2 2^-16; half of them is a tie that goes to 0 (even).
    assert cast(np.float32([2.0**-9, 2.0**-10, 1.5 * 2.0**-9]), "fp8_e4m3").tolist() == \
        [2.0**-9, 0.0, 2.0**-8]
    assert cast(np.float32([2.0**-16, 2.0**-17, 3 * 2.0**-17]), "fp8_e5m2").tolist() == \
        [2.0**-16, 0.0, 2.0**-15]
