"""encode / decode / fake_quantize properties (hypothesis) and input errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.errors import LowbitError
from lowbit.formats import FORMATS, Encoded, decode, encode, encode_sliced, fake_quantize

ALL = sorted(FORMATS)
BLOCKED = ("nvfp4", "mxfp4", "mxfp8")
INTS = [f"int{b}" for b in range(2, 9)]

# Finite values away from float32 underflow, so scale products stay normal floats.
_values = st.floats(-1000, 1000, width=32).map(lambda v: v if abs(v) >= 1e-6 else 0.0)


@st.composite
def cases(draw, formats=ALL, allow_asymmetric=True):
    """(x, fmt, kwargs) over every format and granularity, incl. shorter last blocks."""
    fmt = draw(st.sampled_from(formats))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
    x = draw(hnp.arrays(np.float32, shape, elements=_values))
    axes = list(range(-len(shape), len(shape)))
    axis = draw(st.sampled_from(axes if fmt in BLOCKED else axes + [None]))
    block = None if axis is None else draw(st.one_of(st.none(), st.integers(1, 10)))
    kwargs = dict(axis=axis, block_size=block)
    if allow_asymmetric and fmt in INTS and draw(st.booleans()):
        kwargs["symmetric"] = False
    method = draw(st.sampled_from(["absmax", "absmax", "percentile", "mse", "weighted_mse"]))
    kwargs["scale_method"] = method
    if method == "percentile":
        kwargs["percentile"] = draw(st.sampled_from([50.0, 99.0, 100.0]))
    if method in ("mse", "weighted_mse"):
        kwargs["n_grid"] = 4
    if method == "weighted_mse":
        kwargs["weights"] = draw(hnp.arrays(np.float32, shape, elements=st.floats(0, 10, width=32)))
    return x, fmt, kwargs


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@settings(max_examples=300, deadline=None)
@given(cases())
def test_decode_of_encode_is_fake_quantize_bit_for_bit(case):
    x, fmt, kwargs = case
    enc = encode(x, fmt, **kwargs)
    assert enc.codes.shape == x.shape and enc.codes.dtype == np.uint8
    assert int(enc.codes.max()) < (1 << FORMATS[fmt].bits)
    y = decode(enc)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(_bits(y), _bits(fake_quantize(x, fmt, **kwargs)))


@settings(max_examples=200, deadline=None)
@given(cases(), st.integers(1, 5))
def test_encoding_a_slice_of_rows_at_a_time_is_one_encoding(case, rows_per_slice):
    """encode_sliced (a large head, a few rows of the other axis at a time) gives the codes,
    scales and zero points of one encode call, for every format, scale chooser and block."""
    x, fmt, kwargs = case
    if x.ndim != 2 or kwargs["axis"] is None:
        x, kwargs = x.reshape(x.shape[0], -1), {**kwargs, "axis": 1}
        if "weights" in kwargs:
            kwargs["weights"] = kwargs["weights"].reshape(x.shape)
    axis = kwargs.pop("axis")
    one = encode(x, fmt, axis, **kwargs)
    sliced = encode_sliced(x, fmt, axis, slice_bytes=rows_per_slice * x.shape[axis] * 4, **kwargs)
    assert (sliced.fmt, sliced.shape, sliced.axis, sliced.block_size) == (one.fmt, one.shape, one.axis, one.block_size)
    assert np.array_equal(sliced.codes, one.codes) and np.array_equal(_bits(sliced.scale), _bits(one.scale))
    assert sliced.global_scale == one.global_scale
    assert (one.zero_point is None and sliced.zero_point is None) or np.array_equal(sliced.zero_point, one.zero_point)


@settings(max_examples=200, deadline=None)
@given(cases())
def test_requantizing_with_the_same_scales_is_the_identity(case):
    x, fmt, kwargs = case
    enc = encode(x, fmt, **kwargs)
    q = decode(enc)
    same = dict(axis=kwargs["axis"], block_size=enc.block_size,
                symmetric=kwargs.get("symmetric", True), scale=enc.scale,
                zero_point=enc.zero_point,
                global_scale=enc.global_scale if fmt == "nvfp4" else None)
    if fmt in BLOCKED:
        same["block_size"] = enc.block_size
    again = encode(q, fmt, **same)
    np.testing.assert_array_equal(again.codes, enc.codes)
    np.testing.assert_array_equal(_bits(fake_quantize(q, fmt, **same)), _bits(q))


@settings(max_examples=200, deadline=None)
@given(cases(allow_asymmetric=False))
def test_symmetric_formats_are_odd_functions(case):
    x, fmt, kwargs = case
    np.testing.assert_array_equal(fake_quantize(-x, fmt, **kwargs),
                                  -fake_quantize(x, fmt, **kwargs))


@settings(max_examples=100, deadline=None)
@given(cases())
def test_values_lie_on_the_grid_and_error_is_bounded(case):
    x, fmt, kwargs = case
    enc = encode(x, fmt, **kwargs)
    v = enc.values()
    if enc.zero_point is None:
        assert np.isin(v, FORMATS[fmt].grid).all()
    if kwargs["scale_method"] == "absmax" and fmt not in BLOCKED:
        # absmax never clips: the error is at most one grid step (times the scale) per element
        step = np.diff(FORMATS[fmt].grid).max()
        s = enc.blocking.expand(enc.scale * enc.global_scale)
        assert np.all(np.abs(decode(enc) - x) <= step * s * 1.0001)


def test_default_axis_and_blocks():
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    assert encode(x, "int8").scale.shape == (3, 1)
    assert encode(x, "nvfp4").scale.shape == (3, 4)
    assert encode(x, "mxfp4").scale.shape == (3, 2)
    assert encode(x, "mxfp8", block_size=16).scale.shape == (3, 4)
    assert encode(x, "int4", axis=None).scale.shape == (1, 1)


def test_nan_and_inf_are_counted_and_the_format_named():
    x = np.ones((4, 16), np.float32)
    x[0, 1] = np.nan
    x[2, 3] = np.nan
    x[3, 0] = -np.inf
    for fmt in ("nvfp4", "dint4"):
        want = rf"{fmt}: .* 3 non-finite value\(s\) \(2 NaN, 1 Inf\) out of 64"
        with pytest.raises(LowbitError, match=want):
            encode(x, fmt)
        with pytest.raises(LowbitError, match="2 NaN"):
            fake_quantize(x, fmt)


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(LowbitError, match="unknown number format 'int9'; known formats: int2, "):
        encode(np.ones(4, np.float32), "int9")
    with pytest.raises(LowbitError, match="nvfp4, mxfp4, mxfp8"):
        fake_quantize(np.ones(4, np.float32), "fp6")


@pytest.mark.parametrize("fmt,kwargs,match", [
    ("nvfp4", dict(axis=None), "needs an axis"),
    ("nvfp4", dict(block_size=0), "block_size must be a positive integer"),
    ("nvfp4", dict(scale=np.float32(1.0)), "needs global_scale"),
    ("nvfp4", dict(scale=np.float32(1.1), global_scale=1.0), "not E4M3 values"),
    ("mxfp4", dict(scale=np.float32(3.0)), "powers of two"),
    ("dint4", dict(symmetric=False), "only supported for int2..int8"),
    ("int4", dict(symmetric=False, scale=1.0), "zero_point= is required"),
    ("int4", dict(scale=np.ones(3, np.float32)), "broadcast to the scale layout"),
    ("int4", dict(scale=0.0), "positive and finite"),
    ("int4", dict(scale=1.0, scale_method="mse"), "cannot be combined"),
    ("int4", dict(zero_point=3), "need an explicit scale"),
    ("int4", dict(symmetric=False, scale=1.0, zero_point=16), r"\[0, 15\]"),
])
def test_bad_arguments(fmt, kwargs, match):
    with pytest.raises(LowbitError, match=match):
        encode(np.ones((2, 32), np.float32), fmt, **kwargs)


def test_empty_tensor_is_an_error():
    with pytest.raises(LowbitError, match="empty tensor"):
        encode(np.zeros((0, 4), np.float32), "int8")


def test_encoded_validates_its_fields():
    enc = encode(np.ones((2, 4), np.float32), "int8")
    with pytest.raises(LowbitError, match="scale must be float32 of shape"):
        Encoded("int8", (2, 4), 1, None, enc.codes, np.ones((2, 2), np.float32), np.float32(1),
                None)
    with pytest.raises(LowbitError, match="codes must be uint8"):
        Encoded("int8", (2, 4), 1, None, enc.codes.astype(np.int8), enc.scale, np.float32(1),
                None)


@pytest.mark.parametrize("fmt,block", [("int8", None), ("dint4", 32), ("int4", 16), ("mxfp4", None)])
@pytest.mark.parametrize("axis", [0, 1])
def test_encoding_a_slice_at_a_time_with_given_scales(fmt, block, axis):
    """OPTQ hands its own scales to encode_sliced: they are sliced with the rows they belong to."""
    x = np.random.default_rng(3).standard_normal((70, 64)).astype(np.float32)
    given = encode(x, fmt, axis, block)
    values = decode(given)
    kwargs = {} if fmt == "mxfp4" else {"scale": given.scale}
    one = encode(values, fmt, axis, block, **kwargs)
    sliced = encode_sliced(values, fmt, axis, block, slice_bytes=3 * x.shape[axis] * 4, **kwargs)
    assert np.array_equal(sliced.codes, one.codes) and np.array_equal(_bits(sliced.scale), _bits(one.scale))
