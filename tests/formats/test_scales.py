"""Scale rules by hand: NVFP4 two-level scales (FACTS.md), MX E8M0, zero blocks."""

import numpy as np
import pytest

from lowbit.formats import decode, encode, fake_quantize


def _nvfp4_example() -> np.ndarray:
    """2 x 32, blocks of 16 along the last axis; tensor amax 168 -> global 168 / 2688 = 1/16."""
    x = np.zeros((2, 32), np.float32)
    # block (0, 0): amax 168 -> 168 / (6/16) = 448 -> E4M3 448; element scale 448/16 = 28
    x[0, :6] = [168.0, 14.0, 35.0, -42.0, 100.0, -7.0]
    # block (0, 1): amax 1.0 -> 1 / 0.375 = 2.667 -> E4M3 2.75 (grid step 0.25 in [2, 4))
    x[0, 16:19] = [1.0, -0.5, 0.1]
    # block (1, 0): all zeros -> scale 1.0 (replaced, as ModelOpt does)
    # block (1, 1): amax 0.1 -> 0.2667 -> E4M3 0.28125 (grid step 1/32 in [0.25, 0.5))
    x[1, 16:18] = [0.1, -0.03]
    return x


def test_nvfp4_hand_made_2x32():
    x = _nvfp4_example()
    enc = encode(x, "nvfp4")
    assert enc.block_size == 16 and enc.axis == 1
    assert enc.global_scale == np.float32(0.0625)
    assert enc.scale.tolist() == [[448.0, 2.75], [1.0, 0.28125]]
    # E4M3 bit patterns, e.g. 0.28125 = 1.001b x 2^-2 -> 0 0101 001
    assert enc.scale_codes().tolist() == [[0x7E, 0x43], [0x38, 0x29]]
    v = enc.values()
    # 168/28 = 6; 14/28 = 0.5; 35/28 = 1.25 -> tie -> 1 (even code); -42/28 = -1.5; 100/28 = 3.57
    # -> 4; -7/28 = -0.25 -> tie -> -0 (even code 0, sign kept: code 0b1000)
    assert v[0, :6].tolist() == [6.0, 0.5, 1.0, -1.5, 4.0, -0.0]
    assert enc.codes[0, :6].tolist() == [7, 1, 2, 0xB, 6, 8]
    # block (0, 1): s = 2.75/16 = 0.171875: 1/s = 5.82 -> 6; -0.5/s = -2.91 -> -3; 0.1/s = 0.58
    assert v[0, 16:19].tolist() == [6.0, -3.0, 0.5]
    # block (1, 1): s = 0.28125/16: 0.1/s = 5.69 -> 6; -0.03/s = -1.71 -> -1.5
    assert v[1, 16:18].tolist() == [6.0, -1.5]
    y = decode(enc)
    assert y[0, :6].tolist() == [168.0, 14.0, 28.0, -42.0, 112.0, -0.0]
    assert y[0, 16:19].tolist() == [1.03125, -0.515625, 0.0859375]
    assert y[1, 16:18].tolist() == [0.10546875, -0.0263671875]
    assert not np.any(y[1, :16])


def test_nvfp4_tiny_block_scale_never_zero():
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 168.0
    x[0, 16] = 3e-4  # 3e-4 / 0.375 = 8e-4 < 2^-10: E4M3 rounds it to 0, replaced by 2^-9
    enc = encode(x, "nvfp4")
    assert enc.scale.tolist() == [[448.0, 2.0**-9]]
    # s = 2^-9 / 16 = 2^-13: 3e-4 * 2^13 = 2.46 -> 2
    assert enc.values()[0, 16] == 2.0


def test_nvfp4_blocks_along_axis_0_for_weights():
    x = _nvfp4_example().T.copy()  # W[K=32, N=2], blocks of 16 along K
    enc = encode(x, "nvfp4", axis=0)
    assert enc.scale.shape == (2, 2)
    assert enc.scale.tolist() == [[448.0, 1.0], [2.75, 0.28125]]


def test_mx_scales_are_floor_log2_minus_emax():
    x = np.zeros((2, 32), np.float32)
    x[0, 0], x[0, 1] = 7.0, 0.3  # amax 7: floor(log2 7) = 2 -> mxfp4 scale 2^0, 7 saturates to 6
    x[1, 0] = 500.0  # floor(log2 500) = 8 -> mxfp4 2^6, mxfp8 2^0 (500 saturates to 448)
    e4 = encode(x, "mxfp4")
    assert e4.scale.ravel().tolist() == [1.0, 64.0]
    assert e4.scale_codes().ravel().tolist() == [127, 133]
    assert e4.values()[0, :2].tolist() == [6.0, 0.5] and e4.values()[1, 0] == 6.0
    e8 = encode(x, "mxfp8")
    assert e8.scale.ravel().tolist() == [2.0**-6, 1.0]
    assert e8.values()[1, 0] == 448.0
    zero = encode(np.zeros((1, 32), np.float32), "mxfp8")
    assert zero.scale.item() == 1.0 and not zero.codes.any()


def test_float32_scale_rule_and_zero_block():
    x = np.float32([[3.0, -6.0, 1.0], [0.0, 0.0, 0.0]])
    enc = encode(x, "dint4")
    assert enc.scale.ravel().tolist() == [1.0, 1.0]  # 6/6, and 1.0 for the all-zero row
    assert enc.values().tolist() == [[3.0, -6.0, 1.0], [0.0, 0.0, 0.0]]
    assert encode(x, "fp8_e4m3").scale[0, 0] == np.float32(6.0) / np.float32(448.0)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8_e4m3"])
def test_explicit_scales_reproduce_chosen_ones(fmt):
    x = np.random.default_rng(5).standard_normal((4, 48)).astype(np.float32)
    enc = encode(x, fmt)
    g = enc.global_scale if fmt == "nvfp4" else None
    again = fake_quantize(x, fmt, scale=enc.scale, global_scale=g)
    np.testing.assert_array_equal(again, decode(enc))
