"""Pack encoded tensors into the layouts the lowbit kernels read.

Layout (both MatMulLowbit weights and GatherLowbit tables): ``codes`` uint8 [R, D/2] where each
row r holds the D codes of one output channel (MatMul: one column of the math weight W[K, N],
R = N, D = K; Gather: one embedding row, R = vocab, D = hidden) along the blocked axis, two
codes per byte, low nibble = even element (lowbit.formats pack order); ``scales`` [R, D/block]
(float32, or the exact uint8 E4M3 / E8M0 bits); ``global_scale`` float32 of shape [].
Row-major along the reduction axis keeps each row's codes and its block scales contiguous, which
is what the GEMV kernel streams.

Assumes: an ``Encoded``-like object with ``codes`` (uint8, one code per element), ``scale``
(float32, same ndim, blocked axis of length D/block) and ``global_scale`` (float32 scalar), as
:func:`lowbit.formats.encode` returns.
Guarantees: ``reference.decode_weight(**packed)`` equals ``lowbit.formats.decode(enc)``
(transposed to [R, D]) bit for bit; anything that would not raises LowbitError.
"""

from __future__ import annotations

__all__ = ["pack_matmul_weight", "pack_gather_table", "pack_nibbles_rows"]

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime_ext.reference import e4m3_to_float
from lowbit.runtime_ext.specs import GatherSpec


def pack_nibbles_rows(codes: np.ndarray) -> np.ndarray:
    """[R, D] codes (0..15) -> [R, D/2] bytes, low nibble = even element."""
    codes = np.ascontiguousarray(codes, np.uint8)
    if codes.shape[-1] % 2:
        raise LowbitError(f"cannot pack an odd number of codes ({codes.shape[-1]}) per row")
    if codes.size and codes.max() > 15:
        raise LowbitError("codes must be 4-bit (0..15)")
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _scale_bytes(scale: np.ndarray, fmt: str) -> np.ndarray:
    import ml_dtypes

    if fmt == "nvfp4":
        bits = scale.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        back = e4m3_to_float(bits)
    else:  # mxfp4: E8M0 = biased power-of-two exponent
        mant, exp = np.frexp(scale)
        bits = np.clip(exp - 1 + 127, 0, 254).astype(np.uint8)
        back = np.ldexp(np.float32(1), bits.astype(np.int32) - 127).astype(np.float32)
        if not np.all(mant == 0.5):
            raise LowbitError("mxfp4 scales must be powers of two to be stored as E8M0 bytes")
    if not np.array_equal(back, scale):
        raise LowbitError(f"{fmt} scales are not exactly representable as uint8 scale bytes")
    return bits


def _pack(enc, spec: GatherSpec, axis: int) -> dict[str, np.ndarray]:
    codes = np.asarray(enc.codes)
    scale = np.asarray(enc.scale, np.float32)
    if codes.ndim != 2 or scale.ndim != 2:
        raise LowbitError(f"expected 2-D codes and scales, got {codes.shape} and {scale.shape}")
    if axis == 0:  # [D, R] (ONNX MatMul B): blocks along rows -> kernel rows are columns
        codes, scale = codes.T, scale.T
    d = codes.shape[1]
    if d % 16 or d % spec.block_size:
        raise LowbitError(f"blocked axis length {d} must be a multiple of 16 and of "
                          f"block_size={spec.block_size} for the lowbit ORT ops")
    if scale.shape != (codes.shape[0], d // spec.block_size):
        raise LowbitError(f"scale shape {scale.shape} does not match {codes.shape[0]} rows of "
                          f"{d // spec.block_size} blocks of {spec.block_size}")
    g = np.asarray(enc.global_scale, np.float32)
    if g.size != 1:
        raise LowbitError(f"global_scale must be a scalar, got shape {g.shape}")
    scales = _scale_bytes(scale, spec.fmt) if spec.scale_dtype == "uint8" else scale
    return {
        "codes": pack_nibbles_rows(codes),
        "scales": np.ascontiguousarray(scales),
        "global_scale": g.reshape(()),
    }


def pack_matmul_weight(enc, spec: GatherSpec, *, axis: int = 0) -> dict[str, np.ndarray]:
    """Kernel arrays for a MatMul weight W[K, N] encoded with blocks along ``axis``.

    ``axis=0``: W as ONNX MatMul stores it ([K, N], blocks along K); ``axis=1``: W already
    transposed ([N, K], e.g. Gemm transB=1).
    """
    if axis not in (0, 1):
        raise LowbitError(f"axis must be 0 ([K, N]) or 1 ([N, K]), got {axis}")
    return _pack(enc, spec, axis)


def pack_gather_table(enc, spec: GatherSpec) -> dict[str, np.ndarray]:
    """Kernel arrays for an embedding table [vocab, hidden] encoded in blocks along hidden."""
    return _pack(enc, spec, 1)
