"""Granularity: scale layout (ONNX blocked Q/DQ), shorter last block, axis handling."""

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.formats import encode
from lowbit.formats.blocking import Blocking


@pytest.mark.parametrize("shape,axis,block,scale_shape", [
    ((8, 6), 0, None, (1, 6)),  # W[K, N], axis 0: one scale per output column
    ((8, 6), -1, None, (8, 1)),
    ((8, 6), None, None, (1, 1)),
    ((8, 6), 0, 4, (2, 6)),
    ((8, 6), 0, 3, (3, 6)),  # 8 = 3 + 3 + 2: last block shorter
    ((2, 5, 7), 1, 2, (2, 3, 7)),
    ((33,), 0, 16, (3,)),
])
def test_scale_shape(shape, axis, block, scale_shape):
    assert Blocking.make(shape, axis, block).scale_shape == scale_shape
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert encode(x, "int8", axis, block).scale.shape == scale_shape


def test_shorter_last_block_follows_onnx_index_rule():
    # Element i along the axis uses scale i // B; the last block has D - (nb - 1) * B elements.
    x = np.float32([1, 2, 3, 40, 50, 60, 7])  # blocks of 3: [1,2,3] [40,50,60] [7]
    enc = encode(x, "int8", 0, 3)
    np.testing.assert_array_equal(enc.scale, np.float32([3, 60, 7]) / np.float32(127))
    b = enc.blocking
    assert b.n_blocks == 3 and b.padded
    np.testing.assert_array_equal(b.expand(enc.scale), enc.scale[np.arange(7) // 3])


def test_block_view_round_trip_without_copy_when_dividing():
    b = Blocking.make((4, 32), 1, 16)
    x = np.arange(128, dtype=np.float32).reshape(4, 32)
    xb = b.to_blocks(x)
    assert xb.shape == (4, 2, 16, 1) and np.shares_memory(xb, x)
    np.testing.assert_array_equal(b.from_blocks(xb), x)
    np.testing.assert_array_equal(b.block_absmax(-xb).ravel(), [15, 31, 47, 63, 79, 95, 111, 127])


def test_block_absmax_on_middle_axis_and_padding():
    x = np.random.default_rng(1).standard_normal((3, 10, 4)).astype(np.float32)
    b = Blocking.make(x.shape, 1, 4)
    got = b.scale_from_blocks(b.block_absmax(b.to_blocks(x)))
    want = np.stack([np.abs(x[:, s:s + 4]).max(axis=1) for s in (0, 4, 8)], axis=1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("axis,block,match", [
    (2, None, "axis 2 is out of range"),
    (0, 0, "block_size must be a positive integer"),
    (0, 2.5, "block_size must be a positive integer"),
    (None, 4, "needs an axis"),
])
def test_bad_granularity(axis, block, match):
    with pytest.raises(LowbitError, match=match):
        encode(np.ones((4, 4), np.float32), "int4", axis, block)
