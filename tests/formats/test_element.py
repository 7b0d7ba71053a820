"""The lookup-table encoder is used for every registered format and equals the reference."""

import numpy as np
import pytest

from lowbit.formats import FORMATS
from lowbit.formats.element import _encode_table


@pytest.mark.parametrize("name", sorted({f.element.name for f in FORMATS.values()}))
def test_every_element_format_has_a_consistent_table(name):
    element = next(f.element for f in FORMATS.values() if f.element.name == name)
    rng = np.random.default_rng(7)
    # Around every decision point: all grid values, their midpoints and their float32 neighbours.
    grid = element.grid.astype(np.float64)
    mids = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)
    pts = np.concatenate([mids, element.grid, rng.uniform(-2, 2, 4000).astype(np.float32)
                          * np.float32(element.max_value)])
    x = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)),
                        np.nextafter(pts, np.float32(-np.inf))])
    for narrow in (False, True):
        assert _encode_table(element, narrow) is not None
        np.testing.assert_array_equal(element.encode(x, narrow=narrow),
                                      element.encode_reference(x, narrow=narrow))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dint_table_rounding_equals_the_arithmetic_rounding(bits):
    """dINT's ``round`` goes through the value table: equal to its arithmetic definition on every
    bucket edge of the table (each float32 top half with low half 0, 1 and 0xFFFF), +-inf, -0.0,
    and a NaN falls back to the arithmetic path."""
    element = next(f.element for f in FORMATS.values() if f.element.name == f"dint{bits}")
    tops = np.arange(1 << 16, dtype=np.uint32) << 16
    x = np.concatenate([tops, tops | 1, tops | 0xFFFF]).view(np.float32)
    x = np.concatenate([x[~np.isnan(x)], np.float32([np.inf, -np.inf, -0.0])])
    got = element.round(x)
    np.testing.assert_array_equal(got, element.round_reference(x))
    assert not np.any(np.signbit(got[got == 0]))  # never -0.0
    with_nan = np.float32([1.3, np.nan, -7.0])
    np.testing.assert_array_equal(element.round(with_nan), element.round_reference(with_nan))
