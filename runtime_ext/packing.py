"""Pack :class:`lowbit.formats.Encoded` tensors into the layouts the lowbit kernels read.

Layout (MatMulLowbit weights and GatherLowbit tables alike): ``codes`` uint8 [R, D/2] where row r
holds the D codes of one output channel along the blocked axis (MatMul: one column of the math
weight W[K, N], so R = N, D = K; Gather: one embedding row, R = vocab, D = hidden), two codes per
byte, low nibble = even element (lowbit.formats.pack_nibbles order); ``scales`` [R, D/block]
(float32, or the exact uint8 E4M3 bits for nvfp4 / E8M0 bytes for mxfp4); ``global_scale``
float32 of shape []. Row-major along the reduction axis keeps each output channel's codes and
block scales contiguous, which is what the GEMV kernel streams.

Assumes: a 2-D symmetric ``Encoded`` (no zero point) in dint4, nvfp4, int4 or mxfp4 whose blocks
divide the blocked axis; the blocked axis (``enc.axis``) is the reduction axis.
Guarantees: ``reference.decode_weight(**packed.arrays, ...)`` equals ``lowbit.formats.decode(enc)``
(transposed to [R, D] when ``enc.axis == 0``) bit for bit; anything else raises LowbitError.
"""

from __future__ import annotations

__all__ = ["Packed", "pack_matmul_weight", "pack_gather_table", "pack_nibbles_rows",
           "pack_mixed_matmul_weight", "decode_mixed"]

import dataclasses

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime_ext.specs import GatherSpec, MatMulSpec


@dataclasses.dataclass(frozen=True, eq=False)
class Packed:
    """Kernel arrays plus the variant they encode."""

    codes: np.ndarray  # uint8 [R, D/2]
    scales: np.ndarray  # float32 | uint8 [R, D/block]
    global_scale: np.ndarray  # float32, shape []
    spec: GatherSpec  # format, block size, scale dtype
    # Mixed NVFP4/FP8 (FGMP) weights only, else None: bit-packed FP8 block mask [R, ceil(nb/8)]
    # (bit j of byte i = block 8 i + j), E4M3 codes [F, 16] and float32 scales [F] of the F FP8
    # blocks in row-major (row, block) order.
    fp8_mask: np.ndarray | None = None
    fp8_codes: np.ndarray | None = None
    fp8_scales: np.ndarray | None = None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        out = {"codes": self.codes, "scales": self.scales, "global_scale": self.global_scale}
        if self.fp8_mask is not None:
            out.update(fp8_mask=self.fp8_mask, fp8_codes=self.fp8_codes,
                       fp8_scales=self.fp8_scales)
        return out

    def matmul_spec(self, act_mode: str = "float32", act_group: int | None = None) -> MatMulSpec:
        s = self.spec
        return MatMulSpec(s.fmt, s.block_size, s.scale_dtype, act_mode,
                          fp8_blocks=self.fp8_mask is not None, act_group=act_group)


def pack_nibbles_rows(codes: np.ndarray) -> np.ndarray:
    """[R, D] codes (0..15) -> [R, D/2] bytes, low nibble = even element."""
    codes = np.ascontiguousarray(codes, np.uint8)
    if codes.shape[-1] % 2:
        raise LowbitError(f"cannot pack an odd number of codes ({codes.shape[-1]}) per row")
    if codes.size and codes.max() > 15:
        raise LowbitError("codes must be 4-bit (0..15)")
    return (codes[..., 0::2] | (codes[..., 1::2] << np.uint8(4))).astype(np.uint8)


def _pack(enc, scale_dtype: str, what: str) -> Packed:
    if len(enc.shape) != 2 or enc.axis not in (0, 1):
        raise LowbitError(f"{what}: expected a 2-D tensor encoded in blocks along axis 0 or 1, "
                          f"got shape {enc.shape} axis {enc.axis}")
    if enc.zero_point is not None:
        raise LowbitError(f"{what}: asymmetric {enc.fmt} (zero points) has no lowbit kernel")
    d = enc.shape[enc.axis]
    block = d if enc.block_size is None else enc.block_size
    spec = GatherSpec(enc.fmt, block, scale_dtype)  # validates format/block/scale dtype
    if d % 16 or d % block:
        raise LowbitError(f"{what}: blocked axis length {d} must be a multiple of 16 and of "
                          f"block_size={block}")
    codes, scale = np.asarray(enc.codes), np.asarray(enc.scale, np.float32)
    if scale_dtype == "uint8":
        scale = enc.scale_codes()
    if enc.axis == 0:  # [D, R] (ONNX MatMul B): kernel rows are the columns
        codes, scale = codes.T, scale.T
    return Packed(pack_nibbles_rows(codes), np.ascontiguousarray(scale),
                  np.asarray(enc.global_scale, np.float32).reshape(()), spec)


def pack_matmul_weight(enc, *, scale_dtype: str = "float32") -> Packed:
    """Kernel arrays for a MatMul weight encoded in blocks along its reduction axis.

    ``enc.axis == 0``: W as ONNX MatMul stores it ([K, N]); ``enc.axis == 1``: W already
    transposed ([N, K], e.g. Gemm transB=1).
    """
    return _pack(enc, scale_dtype, "pack_matmul_weight")


def pack_gather_table(enc, *, scale_dtype: str = "float32") -> Packed:
    """Kernel arrays for an embedding table [vocab, hidden] encoded in blocks along hidden."""
    if enc.axis != 1:
        raise LowbitError(f"pack_gather_table: the table must be blocked along hidden (axis 1), "
                          f"got axis {enc.axis}")
    return _pack(enc, scale_dtype, "pack_gather_table")


def pack_mixed_matmul_weight(w: np.ndarray, fp8_blocks: np.ndarray, *,
                             scale_dtype: str = "uint8") -> Packed:
    """FGMP mixed weights: W[K, N] in NVFP4 except the 16-blocks along K marked in
    ``fp8_blocks`` ([K/16, N] bool), which are FP8 E4M3 with a float32 block scale (absmax/448).

    Both encodings come from lowbit.formats (nvfp4 with its whole-tensor global scale; fp8_e4m3
    per block of 16); :func:`decode_mixed` gives the exact weights the kernels use.
    """
    from lowbit import formats

    w = np.asarray(w, np.float32)
    if w.ndim != 2 or w.shape[0] % 16:
        raise LowbitError(f"mixed weights must be [K, N] with K % 16 == 0, got {w.shape}")
    mask = np.asarray(fp8_blocks, bool)
    if mask.shape != (w.shape[0] // 16, w.shape[1]):
        raise LowbitError(f"fp8_blocks must have shape {(w.shape[0] // 16, w.shape[1])}, "
                          f"got {mask.shape}")
    base = _pack(formats.encode(w, "nvfp4", axis=0, block_size=16), scale_dtype,
                 "pack_mixed_matmul_weight")
    fp8 = formats.encode(w, "fp8_e4m3", axis=0, block_size=16)
    rows_mask = mask.T  # [N, nb]
    codes8 = fp8.codes.T.reshape(w.shape[1], -1, 16)[rows_mask]  # [F, 16], row-major (n, b)
    scales8 = np.asarray(fp8.scale, np.float32).T[rows_mask]
    # Zero the unused NVFP4 nibbles of FP8 blocks (they compress; the kernels never read them).
    nib = base.codes.reshape(w.shape[1], -1, 8).copy()
    nib[rows_mask] = 0
    packed_mask = np.packbits(rows_mask, axis=1, bitorder="little")
    return Packed(nib.reshape(base.codes.shape), base.scales, base.global_scale,
                  base.spec, packed_mask, np.ascontiguousarray(codes8, np.uint8),
                  np.ascontiguousarray(scales8, np.float32))


def decode_mixed(w: np.ndarray, fp8_blocks: np.ndarray) -> np.ndarray:
    """The float32 W[K, N] that :func:`pack_mixed_matmul_weight` stores (formats decode)."""
    from lowbit import formats

    q4 = formats.fake_quantize(w, "nvfp4", axis=0, block_size=16)
    q8 = formats.fake_quantize(w, "fp8_e4m3", axis=0, block_size=16)
    mask = np.repeat(np.asarray(fp8_blocks, bool), 16, axis=0)
    return np.where(mask, q8, q4).astype(np.float32)
