"""FORMATS / get_format / code_table / cast: the public catalogue."""

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.formats import FORMATS, ScaleKind, cast, code_table, get_format


def test_catalogue():
    names = [f"int{b}" for b in range(2, 9)] + [f"dint{b}" for b in range(2, 9)] + \
        ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nvfp4", "mxfp4", "mxfp8"]
    assert list(FORMATS) == names
    expect = {"int4": (4, 7.0), "int8": (8, 127.0), "dint4": (4, 6.0), "fp8_e4m3": (8, 448.0),
              "fp8_e5m2": (8, 57344.0), "fp4_e2m1": (4, 6.0), "nvfp4": (4, 6.0),
              "mxfp4": (4, 6.0), "mxfp8": (8, 448.0)}
    for name, (bits, vmax) in expect.items():
        spec = get_format(name)
        assert (spec.name, spec.bits, spec.max_value) == (name, bits, vmax)
        assert spec.grid.max() == vmax and len(code_table(name)) == 1 << bits
    assert get_format("nvfp4").scale_kind is ScaleKind.NVFP4
    assert get_format("nvfp4").default_block_size == 16
    assert get_format("mxfp8").default_block_size == 32


def test_grids():
    assert get_format("int4").grid.tolist() == list(range(-8, 8))
    assert get_format("dint4").grid.tolist() == [-6, -5, -4, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 4,
                                                 5, 6]
    assert len(get_format("fp8_e4m3").grid) == 253  # 256 codes - 2 NaN - one duplicate zero
    assert len(get_format("fp8_e5m2").grid) == 247  # 256 - 6 NaN - 2 Inf - one duplicate zero


def test_cast_contract():
    x = np.float32([0.3, -2.6, 1e9])
    assert cast(x, "int4").tolist() == [0, -3, 7]
    assert cast(x, "dint4").tolist() == [0.5, -3, 6]
    assert cast(x, "fp8_e4m3").tolist() == [0.3125, -2.5, 448]
    assert cast(x.astype(np.float64), "int8").dtype == np.float32
    with pytest.raises(LowbitError, match="block-scaled format"):
        cast(x, "nvfp4")


def test_unknown_name():
    with pytest.raises(LowbitError, match="unknown number format 'bf16'"):
        get_format("bf16")
    with pytest.raises(LowbitError, match="known formats"):
        code_table("int1")


@pytest.mark.parametrize("name", ["int4", "int8", "int16"])
@pytest.mark.parametrize("signed", [True, False])
def test_integer_code_ranges_match_the_storage_types(name, signed):
    """formats' code ranges against ml_dtypes' own (the oracle), for the types emitters store."""
    import ml_dtypes

    from lowbit.core.initializers import code_dtype
    from lowbit.formats import integer_codes

    info = ml_dtypes.iinfo(code_dtype(name, signed))
    assert integer_codes(name, signed) == (int(info.min), int(info.max))


def test_integer_codes_refuse_other_formats():
    from lowbit.formats import integer_codes

    with pytest.raises(LowbitError, match="'dint4' is not an integer code format"):
        integer_codes("dint4")


@pytest.mark.parametrize("name, half_steps, block", [
    ("dint4", True, None), ("dint8", False, None), ("int4", False, None), ("fp4_e2m1", True, None),
    ("nvfp4", True, 16), ("mxfp4", True, 32), ("mxfp8", False, 32), ("fp8_e4m3", False, None),
])  # fmt: skip
def test_storage_rule_and_default_blocks(name, half_steps, block):
    fmt = get_format(name)
    assert fmt.half_step_storage is half_steps
    assert fmt.block_size(0) == block and fmt.block_size(64) == 64
