"""INT-b: round half to even, saturation, two's-complement codes."""

import numpy as np
import pytest

from lowbit.formats import cast, code_table, decode, encode, fake_quantize


def test_int4_code_table_is_twos_complement():
    assert code_table("int4").tolist() == [0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1]
    assert code_table("int8")[[0, 127, 128, 255]].tolist() == [0, 127, -128, -1]
    assert code_table("int2").tolist() == [0, 1, -2, -1]


def test_cast_rounds_half_to_even_and_saturates_to_full_range():
    x = np.float32([0.5, 1.5, 2.5, -0.5, -2.5, 7.4, 200, -200, -128.4, np.nan])
    got = cast(x, "int8")
    assert got[:9].tolist() == [0, 2, 2, 0, -2, 7, 127, -128, -128]
    assert np.isnan(got[9])
    assert cast(np.float32([9, -9, -8.5]), "int4").tolist() == [7, -8, -8]


def test_symmetric_uses_the_narrow_range():
    x = np.float32([[-127, 0, 3.3, 127]])
    enc = encode(x, "int8", axis=None)
    assert enc.scale.item() == 1.0
    assert enc.values().tolist() == [[-127, 0, 3, 127]]
    assert enc.codes.tolist() == [[0x81, 0, 3, 127]]
    # clipping with a small scale never reaches -128: the quantizer stays an odd function
    y = fake_quantize(np.float32([-1000, 1000]), "int8", axis=None, scale=1.0)
    assert y.tolist() == [-127, 127]


def test_asymmetric_matches_onnx_formulas():
    x = np.float32([[-1.0, 0.0, 0.5, 3.0]])
    enc = encode(x, "int8", axis=None, symmetric=False)
    scale = np.float32(4.0) / np.float32(255)
    assert enc.scale.item() == scale
    assert enc.zero_point.item() == 64  # rint(1 / scale) = rint(63.75)
    want_codes = np.clip(np.rint(x / scale) + 64, 0, 255)
    assert enc.codes.tolist() == want_codes.tolist()
    np.testing.assert_array_equal(decode(enc), (want_codes - 64).astype(np.float32) * scale)


def test_asymmetric_all_positive_block_has_zero_point_zero():
    enc = encode(np.float32([[1.0, 2.0, 15.0]]), "int4", symmetric=False)
    assert enc.zero_point.item() == 0 and enc.scale.item() == 1.0
    assert enc.codes.tolist() == [[1, 2, 15]]


@pytest.mark.parametrize("bits", range(2, 9))
def test_encode_table_matches_reference(bits):
    from lowbit.formats import get_format
    element = get_format(f"int{bits}").element
    x = np.random.default_rng(bits).uniform(-300, 300, 5000).astype(np.float32)
    x = np.concatenate([x, np.arange(-300, 300, 0.5, dtype=np.float32)])
    for narrow in (False, True):
        np.testing.assert_array_equal(element.encode(x, narrow=narrow),
                                      element.encode_reference(x, narrow=narrow))
