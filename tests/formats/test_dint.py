"""dINT-b: hand-checked code table and rounding rule (ties to the even code)."""

import numpy as np
import pytest

from lowbit.formats import cast, code_table, get_format
from lowbit.formats.dint import DintElement


def test_dint4_code_table_by_hand():
    # Sign-magnitude: codes 0..7 positive magnitudes 0, 0.5, 1..6; codes 8..15 the negatives,
    # code 8 ("negative zero") decodes to +0.
    want = [0, 0.5, 1, 2, 3, 4, 5, 6, 0, -0.5, -1, -2, -3, -4, -5, -6]
    got = code_table("dint4")
    assert got.tolist() == want
    assert not np.signbit(got[8])
    spec = get_format("dint4")
    assert (spec.bits, spec.max_value) == (4, 6.0)


@pytest.mark.parametrize("bits,max_value", [(2, 0.5), (3, 2.0), (5, 14.0), (8, 126.0)])
def test_dint_widths(bits, max_value):
    table = code_table(f"dint{bits}")
    assert table.shape == (1 << bits,)
    assert table.max() == max_value and table.min() == -max_value
    half = 1 << (bits - 1)
    assert table[:half].tolist() == [0.0, 0.5] + [float(m - 1) for m in range(2, half)][: half - 2]


def test_rounding_ties_to_even_code():
    x = np.float32([0.25, 0.2500001, 0.75, 0.7499999, 1.5, 2.5, 3.5, 4.5, 5.5, 5.50001, 1.25, 100])
    want = [0.0, 0.5, 1.0, 0.5, 1.0, 3.0, 3.0, 5.0, 5.0, 6.0, 1.0, 6.0]
    assert cast(x, "dint4").tolist() == want
    assert cast(-x, "dint4").tolist() == [-v if v else 0.0 for v in want]


def test_encode_never_produces_negative_zero_and_matches_reference():
    element = DintElement("dint4", 4)
    rng = np.random.default_rng(3)
    grid = element.grid.astype(np.float32)
    ties = (grid[:-1] + grid[1:]) / 2
    x = np.concatenate([rng.uniform(-8, 8, 20000).astype(np.float32), ties, -ties,
                        np.float32([-0.0, -1e-30, -0.1, np.inf, -np.inf])])
    codes = element.encode(x)
    np.testing.assert_array_equal(codes, element.encode_reference(x))
    assert not np.any(codes == 8)
    np.testing.assert_array_equal(element.decode(codes), cast(x, "dint4"))


def test_nearest_value_everywhere_on_a_fine_sweep():
    x = np.linspace(-7, 7, 14001, dtype=np.float32)
    grid = get_format("dint4").grid
    got = cast(x, "dint4")
    err = np.abs(got - np.clip(x, -6, 6))
    best = np.abs(grid[None, :] - np.clip(x, -6, 6)[:, None]).min(axis=1)
    np.testing.assert_array_equal(err, best)
