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
