"""Nibble packing: low nibble = even element, as ONNX INT4 / FLOAT4E2M1."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.formats import pack_nibbles, unpack_nibbles


def test_layout_by_hand():
    assert pack_nibbles(np.uint8([1, 2, 3, 4])).tolist() == [0x21, 0x43]
    assert pack_nibbles(np.uint8([0xF, 0x0, 0x7])).tolist() == [0x0F, 0x07]  # odd: high nibble 0
    assert pack_nibbles(np.uint8([[1, 2], [3, 4]])).tolist() == [0x21, 0x43]  # flattened C order
    assert unpack_nibbles(np.uint8([0x21, 0x43]), 3).tolist() == [1, 2, 3]


@given(st.lists(st.integers(0, 15), min_size=0, max_size=101))
def test_round_trip(codes):
    c = np.array(codes, dtype=np.uint8)
    packed = pack_nibbles(c)
    assert packed.dtype == np.uint8 and packed.shape == ((len(codes) + 1) // 2,)
    np.testing.assert_array_equal(unpack_nibbles(packed, len(codes)), c)


def test_errors():
    with pytest.raises(LowbitError, match="0..15"):
        pack_nibbles(np.uint8([16]))
    with pytest.raises(LowbitError, match="0..15"):
        pack_nibbles(np.array([-1]))
    with pytest.raises(LowbitError, match="nibbles"):
        unpack_nibbles(np.uint8([1, 2]), 5)
