"""Two 4-bit codes per byte, as ONNX INT4/UINT4/FLOAT4E2M1 tensors store them.

``pack_nibbles`` flattens (C order), puts element 2i in the low nibble and element 2i + 1 in the
high nibble of byte i; an odd count leaves the last high nibble 0. ``unpack_nibbles`` inverts it.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import LowbitError

__all__ = ["pack_nibbles", "unpack_nibbles"]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 array of length ceil(n / 2) holding the n 4-bit ``codes`` (values 0..15)."""
    flat = np.asarray(codes).reshape(-1)
    if flat.dtype != np.uint8:
        if flat.size and (flat.min() < 0 or flat.max() > 15):
            raise LowbitError("pack_nibbles: codes must lie in 0..15")
        flat = flat.astype(np.uint8)
    elif flat.size and flat.max() > 15:
        raise LowbitError(f"pack_nibbles: codes must lie in 0..15, found {int(flat.max())}")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << np.uint8(4))


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` 4-bit codes of ``packed`` (flat uint8 array, low nibble first)."""
    p = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if not 0 <= n <= 2 * p.size or p.size != (n + 1) // 2:
        raise LowbitError(f"unpack_nibbles: {p.size} bytes cannot hold exactly {n} nibbles")
    out = np.empty(2 * p.size, dtype=np.uint8)
    out[0::2] = p & np.uint8(0x0F)
    out[1::2] = p >> np.uint8(4)
    return out[:n]
