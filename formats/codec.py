"""The public entry points: cast, choose_scale, encode / decode, fake_quantize.

Granularity (see :mod:`lowbit.formats.blocking`): ``axis`` is the axis whose elements share a scale,
``block_size=None`` one block per axis ("per-channel"), ``axis=None`` per-tensor. nvfp4 defaults to
blocks of 16 and mxfp4/mxfp8 to blocks of 32 along ``axis``; a block size that does not divide the
axis leaves a shorter last block (ONNX blocked DQ layout).

Guarantees: ``decode(encode(x, ...))`` equals ``fake_quantize(x, ...)`` bit for bit; decoding is
``values * expand(float32(scale * global_scale))`` (asymmetric INT: ``(code - zp) * scale``), as an
ONNX DQ chain computes it; quantizing divides by that same float32 product. Inputs are converted to
float32 first. NaN/Inf in a tensor to encode/fake-quantize is a LowbitError that names the format
and counts the bad values; :func:`cast` passes NaN through and saturates +-Inf.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats.blocking import Blocking
from lowbit.formats.choosers import choose_block_scales
from lowbit.formats.e8m0 import encode_e8m0
from lowbit.formats.minifloat import FP8_E4M3
from lowbit.formats.registry import FORMATS, ScaledFormat, ScaleKind, get_format
from lowbit.formats.scales import BlockScales, check_explicit, quantize_values, scale_product

__all__ = ["Encoded", "Scales", "cast", "choose_scale", "encode", "encode_sliced", "decode", "fake_quantize"]


@dataclasses.dataclass(frozen=True, eq=False)
class Scales:
    """Scales in the ONNX layout (same ndim as x, ``shape[axis] = ceil(D / B)``)."""

    scale: np.ndarray  # float32 (nvfp4: E4M3 values; mx: powers of two)
    global_scale: np.float32  # 1.0 except nvfp4
    zero_point: np.ndarray | None  # int32, asymmetric INT only


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded:
    """Raw codes + scales of one tensor; :func:`decode` turns it back into float32."""

    fmt: str
    shape: tuple[int, ...]
    axis: int | None  # normalised (0..ndim-1) or None for per-tensor
    block_size: int | None  # None: the whole axis (or tensor) is one block
    codes: np.ndarray  # uint8, same shape as x, one code per element (low `bits` bits)
    scale: np.ndarray  # float32, scale layout
    global_scale: np.float32
    zero_point: np.ndarray | None  # int32, scale layout; asymmetric INT only

    def __post_init__(self) -> None:
        spec = get_format(self.fmt)
        blocking = self.blocking
        if self.codes.dtype != np.uint8 or self.codes.shape != tuple(self.shape):
            raise LowbitError(f"{self.fmt}: codes must be uint8 of shape {self.shape}")
        if self.scale.dtype != np.float32 or self.scale.shape != blocking.scale_shape:
            raise LowbitError(f"{self.fmt}: scale must be float32 of shape {blocking.scale_shape}")
        if self.zero_point is not None and (not spec.supports_asymmetric
                                            or self.zero_point.shape != blocking.scale_shape):
            raise LowbitError(f"{self.fmt}: zero_point must be None or int32 of the scale shape")

    @property
    def spec(self) -> ScaledFormat:
        return get_format(self.fmt)

    @property
    def blocking(self) -> Blocking:
        return Blocking.make(tuple(self.shape), self.axis, self.block_size, self.fmt)

    def values(self) -> np.ndarray:
        """float32 element values before scaling (asymmetric INT: code - zero_point)."""
        if self.zero_point is None:
            return self.spec.element.decode(self.codes)
        b = self.blocking
        vb = b.to_blocks(self.codes.astype(np.float32)) - b.scale_to_blocks(self.zero_point)
        return b.from_blocks(vb.astype(np.float32))

    def scale_codes(self) -> np.ndarray:
        """uint8 codes of the block scales: E4M3 bits (nvfp4) or E8M0 biased exponents (mx)."""
        kind = self.spec.scale_kind
        if kind is ScaleKind.NVFP4:
            return FP8_E4M3.encode(self.scale)
        if kind is ScaleKind.E8M0:
            return encode_e8m0(self.scale)
        raise LowbitError(f"{self.fmt}: float32 scales have no low-bit code")


def cast(x: np.ndarray, fmt: str) -> np.ndarray:
    """Round float32 ``x`` element-wise to ``fmt``'s values, no scaling; float32 result.

    Saturates at the format's range (int8: [-128, 127]); NaN passes through, +-Inf saturates.
    """
    spec = get_format(fmt)
    if spec.scale_kind is not ScaleKind.FLOAT32:
        elementwise = [n for n, f in FORMATS.items() if f.scale_kind is ScaleKind.FLOAT32]
        raise LowbitError(f"cast: {spec.name} is a block-scaled format; cast() takes an element "
                          f"format: {', '.join(elementwise)}")
    x = np.asarray(x, dtype=np.float32)
    nan = np.isnan(x)
    if not np.any(nan):
        return np.asarray(spec.element.round(x), dtype=np.float32)
    out = np.asarray(spec.element.round(np.where(nan, np.float32(0.0), x)), dtype=np.float32)
    out[nan] = np.nan
    return out


def choose_scale(x: np.ndarray, fmt: str, axis: int | None = -1, block_size: int | None = None,
                 *, symmetric: bool = True, scale_method: str = "absmax",
                 weights: np.ndarray | None = None, **chooser_kwargs: Any) -> Scales:
    """The scales :func:`encode` would choose for ``x`` (see :mod:`lowbit.formats.choosers`)."""
    _, blocking, _, bs = _prepare(x, fmt, axis, block_size, symmetric, scale_method, None, None,
                                  None, weights, chooser_kwargs)
    return _to_layout(blocking, bs)


def encode(x: np.ndarray, fmt: str, axis: int | None = -1, block_size: int | None = None, *,
           symmetric: bool = True, scale_method: str = "absmax", scale: np.ndarray | None = None,
           zero_point: np.ndarray | None = None, global_scale: float | None = None,
           weights: np.ndarray | None = None, **chooser_kwargs: Any) -> Encoded:
    """Quantize ``x`` to codes + scales. ``scale``/``zero_point``/``global_scale`` given in the
    scale layout (broadcastable) skip the chooser; nvfp4 then needs ``global_scale`` too."""
    spec, blocking, xb, bs = _prepare(x, fmt, axis, block_size, symmetric, scale_method, scale,
                                      zero_point, global_scale, weights, chooser_kwargs)
    y = xb / scale_product(bs)
    if bs.zero_point is None:
        codes_b = spec.element.encode(y, narrow=True)
    else:
        codes_b = spec.element.round_unsigned(y, bs.zero_point).astype(np.uint8)  # type: ignore
    lay = _to_layout(blocking, bs)
    return Encoded(spec.name, tuple(blocking.shape), blocking.axis, _user_block(blocking),
                   blocking.from_blocks(codes_b), lay.scale, lay.global_scale, lay.zero_point)


def encode_sliced(x: Any, fmt: str, axis: int, block_size: int | None = None, *,
                  slice_bytes: int = 64 << 20, **kwargs: Any) -> Encoded:
    """:func:`encode` of a 2-D ``x`` blocked along ``axis``, a slice of the other axis at a time.

    Every block (and every scale the chooser fits) lies inside one row of the other axis, so the
    codes and scales are those of one call, while the float temporaries are a slice's (about
    ``slice_bytes`` of ``x``) instead of several copies of a vocabulary-sized head. ``x`` is an
    array, or any object with a ``shape`` whose basic slices along the other axis (``x[i:j]`` or
    ``x[:, i:j]``) are arrays -- a weight read a slice at a time, never held whole. NVFP4, whose
    per-tensor global scale depends on the whole tensor, is encoded in one call."""
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    if len(x.shape) != 2 or axis not in (0, 1, -1, -2):
        raise LowbitError(f"{fmt}: encode_sliced takes a 2-D tensor blocked along one of its axes, got {tuple(x.shape)}")
    axis %= 2
    other = 1 - axis

    def take(i: int, j: int) -> np.ndarray:
        return np.asarray(x[i:j] if other == 0 else x[:, i:j])

    step = max(1, slice_bytes // max(1, x.shape[axis] * 4))
    if step >= x.shape[other] or get_format(fmt).scale_kind is ScaleKind.NVFP4:
        return encode(take(0, x.shape[other]), fmt, axis, block_size, **kwargs)
    # arrays laid out along the other axis (weighted_mse's weights, explicit scales and zero
    # points in the scale layout) are sliced with x; anything else is passed as it is
    sliced = {key: np.asarray(kwargs.pop(key)) for key in ("weights", "scale", "zero_point") if kwargs.get(key) is not None}
    parts = []
    for i in range(0, x.shape[other], step):
        j = min(i + step, x.shape[other])
        pieces = {key: np.take(a, range(i, j), axis=other) if a.ndim == 2 and a.shape[other] == x.shape[other] else a
                  for key, a in sliced.items()}  # fmt: skip
        parts.append(encode(take(i, j), fmt, axis, block_size, **pieces, **kwargs))
    first = parts[0]
    zero_point = None if first.zero_point is None else np.concatenate([e.zero_point for e in parts], axis=other)
    return Encoded(first.fmt, tuple(x.shape), first.axis, first.block_size,
                   np.concatenate([e.codes for e in parts], axis=other),
                   np.concatenate([e.scale for e in parts], axis=other), first.global_scale, zero_point)


def decode(enc: Encoded) -> np.ndarray:
    """float32 ``values * expand(float32(scale * global_scale))`` of an :class:`Encoded`."""
    b = enc.blocking
    product = enc.scale if enc.global_scale == 1.0 else \
        (enc.scale * enc.global_scale).astype(np.float32)
    return b.from_blocks(b.to_blocks(enc.values()) * b.scale_to_blocks(product))


def fake_quantize(x: np.ndarray, fmt: str, axis: int | None = -1, block_size: int | None = None,
                  *, symmetric: bool = True, scale_method: str = "absmax",
                  scale: np.ndarray | None = None, zero_point: np.ndarray | None = None,
                  global_scale: float | None = None, weights: np.ndarray | None = None,
                  **chooser_kwargs: Any) -> np.ndarray:
    """Quantize then dequantize ``x`` (float32); equals ``decode(encode(x, ...))`` bit for bit."""
    spec, blocking, xb, bs = _prepare(x, fmt, axis, block_size, symmetric, scale_method, scale,
                                      zero_point, global_scale, weights, chooser_kwargs)
    return blocking.from_blocks(quantize_values(spec, xb, bs) * scale_product(bs))


def _user_block(blocking: Blocking) -> int | None:
    if blocking.axis is None or blocking.block_size == blocking.dim:
        return None
    return blocking.block_size


def _to_layout(blocking: Blocking, bs: BlockScales) -> Scales:
    zp = None if bs.zero_point is None else \
        blocking.scale_from_blocks(bs.zero_point).astype(np.int32)
    return Scales(blocking.scale_from_blocks(bs.scale).astype(np.float32),
                  np.float32(bs.global_scale), zp)


def _prepare(x: np.ndarray, fmt: str, axis: int | None, block_size: int | None,
             symmetric: bool, method: str, scale: np.ndarray | None,
             zero_point: np.ndarray | None, global_scale: float | None,
             weights: np.ndarray | None, kwargs: dict[str, Any],
             ) -> tuple[ScaledFormat, Blocking, np.ndarray, BlockScales]:
    """Validate everything and return (spec, blocking, block view of x, per-block scales)."""
    spec = get_format(fmt)
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        raise LowbitError(f"{spec.name}: cannot quantize an empty tensor of shape {x.shape}")
    if spec.default_block_size is not None:
        if axis is None:
            raise LowbitError(f"{spec.name}: block-scaled format needs an axis, got axis=None")
        block_size = spec.default_block_size if block_size is None else block_size
    blocking = Blocking.make(x.shape, axis, block_size, spec.name)
    if not symmetric and not spec.supports_asymmetric:
        raise LowbitError(f"{spec.name}: symmetric=False is only supported for int2..int8")
    xb = blocking.to_blocks(x)
    block_amax = blocking.block_absmax(xb)  # NaN/Inf propagate: the finiteness check is free
    if not np.all(np.isfinite(block_amax)):
        n_nan = int(np.count_nonzero(np.isnan(x)))
        n_inf = int(np.count_nonzero(np.isinf(x)))
        raise LowbitError(f"{spec.name}: cannot encode a tensor with {n_nan + n_inf} non-finite "
                          f"value(s) ({n_nan} NaN, {n_inf} Inf) out of {x.size}")
    if scale is not None:
        bs = _explicit(spec, blocking, symmetric, scale, zero_point, global_scale,
                       method, weights, kwargs)
    else:
        if zero_point is not None or global_scale is not None:
            raise LowbitError(f"{spec.name}: zero_point/global_scale need an explicit scale=")
        if weights is not None:
            weights = _check_weights(spec, weights, x.shape)
        bs = choose_block_scales(spec, xb, blocking, symmetric=symmetric, method=method,
                                 weights=weights, block_amax=block_amax, kwargs=kwargs)
    return spec, blocking, xb, bs


def _explicit(spec: ScaledFormat, blocking: Blocking, symmetric: bool, scale: np.ndarray,
              zero_point: np.ndarray | None, global_scale: float | None, method: str,
              weights: np.ndarray | None, kwargs: dict[str, Any]) -> BlockScales:
    if weights is not None or kwargs or method != "absmax":
        raise LowbitError(f"{spec.name}: an explicit scale= cannot be combined with a scale "
                          "chooser (scale_method/weights/chooser options)")
    if symmetric == (zero_point is not None):
        raise LowbitError(f"{spec.name}: zero_point= is required exactly when symmetric=False")
    try:
        s = np.broadcast_to(np.asarray(scale, dtype=np.float32), blocking.scale_shape)
        zp = None if zero_point is None else np.broadcast_to(
            np.asarray(zero_point).astype(np.int32), blocking.scale_shape)
    except ValueError as e:
        raise LowbitError(f"{spec.name}: scale/zero_point must broadcast to the scale layout "
                          f"{blocking.scale_shape}") from e
    check_explicit(spec, s, global_scale, zp)
    g = np.float32(1.0 if global_scale is None else global_scale)
    return BlockScales(blocking.scale_to_blocks(s), g,
                       None if zp is None else blocking.scale_to_blocks(zp))


def _check_weights(spec: ScaledFormat, weights: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float32)
    if w.shape != shape:
        raise LowbitError(f"{spec.name}: weights shape {w.shape} != tensor shape {shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise LowbitError(f"{spec.name}: weights must be finite and >= 0")
    return w
