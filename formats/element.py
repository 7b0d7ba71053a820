"""The interface every element format (INT-b, dINT-b, minifloats) implements.

An element format is a finite set of values plus a rounding rule, with no scale: it turns a
float32 array into the nearest representable values (``round``) or straight into their b-bit codes
(``encode``), and decodes codes through a ``2**bits``-entry table. All rounding here saturates at
the largest magnitude and never produces Inf; NaN passes through ``round`` (callers that must reject
NaN, such as :func:`lowbit.formats.encode`, check before calling).

Speed: ``encode`` (the hot path for 4096 x 4096 weights) looks codes up in a table indexed by the
top 16 bits of the float32 input plus one bit saying whether its low 16 bits are nonzero. Every
rounding threshold of these formats (midpoints such as 0.25, 5.5 or 127.5) has at most 7 mantissa
bits, so it is the *first* value of a bucket, and within a bucket only that exact value (a tie)
can round differently from the rest: the extra bit separates it. The table is built once per
format from ``encode_reference`` (the arithmetic definition) and checked at both ends of every
bucket (rounding is monotone, so that covers the bucket); if the check failed for some format,
``encode`` would fall back to ``encode_reference`` for it.
"""

from __future__ import annotations

import abc
import functools
import sys

import numpy as np

__all__ = ["ElementFormat"]

_CHUNK = 1 << 18  # elements per lookup-table chunk (1 MB of float32)


class ElementFormat(abc.ABC):
    """Common behaviour; subclasses are frozen dataclasses with ``name`` and ``bits`` fields."""

    name: str
    bits: int

    @property
    @abc.abstractmethod
    def max_value(self) -> float:
        """Largest finite magnitude (what ``round`` saturates to)."""

    @property
    @abc.abstractmethod
    def scale_max(self) -> float:
        """The magnitude a block's absmax maps to under symmetric absmax scaling."""

    @abc.abstractmethod
    def round(self, y: np.ndarray, *, narrow: bool = False) -> np.ndarray:
        """Nearest representable float32 values of ``y`` (``narrow``: symmetric code range)."""

    @abc.abstractmethod
    def encode_reference(self, y: np.ndarray, *, narrow: bool = False) -> np.ndarray:
        """uint8 codes (low ``bits`` bits) of ``round(y)``, computed arithmetically."""

    def encode(self, y: np.ndarray, *, narrow: bool = False) -> np.ndarray:
        """uint8 codes (low ``bits`` bits) of ``round(y)``; same shape as ``y``; NaN-free input."""
        table = _encode_table(self, narrow)
        y = np.ascontiguousarray(y, dtype=np.float32)
        if table is None:
            return self.encode_reference(y, narrow=narrow)
        return _lookup(table, y)

    def round_by_table(self, y: np.ndarray, *, narrow: bool = False) -> np.ndarray | None:
        """``round(y)`` by the same lookup as ``encode`` (one table of values instead of codes),
        or None when the format has no table or ``y`` holds a NaN. Equal to the arithmetic
        rounding of every non-NaN float32, for the reason ``encode`` is (module docstring); a
        few passes over ``y`` instead of the ~15 of an arithmetic rounding."""
        values = _round_table(self, narrow)
        y = np.ascontiguousarray(y, dtype=np.float32)
        if values is None or np.isnan(np.min(y, initial=0.0)):
            return None
        return _lookup(values, y)

    @abc.abstractmethod
    def _table(self) -> np.ndarray:
        """float32 value of each code 0 .. 2**bits - 1."""

    def code_table(self) -> np.ndarray:
        """float32 array of length ``2**bits``: the value of each code (a fresh copy)."""
        return _cached_table(self).copy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """float32 values of uint8 codes (table lookup, so it is exact by construction)."""
        return _cached_table(self)[np.asarray(codes, dtype=np.uint8)]

    @property
    def grid(self) -> np.ndarray:
        """Sorted distinct finite representable values (float32; -0 folded into 0)."""
        table = _cached_table(self)
        return np.unique(table[np.isfinite(table)] + np.float32(0.0))


@functools.lru_cache(maxsize=None)
def _cached_table(fmt: ElementFormat) -> np.ndarray:
    table = np.asarray(fmt._table(), dtype=np.float32)
    table.setflags(write=False)
    return table


def _lookup(table: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``table`` indexed by each float32 of contiguous NaN-free ``y`` (see the module docstring)."""
    flat = y.reshape(-1)
    out = np.empty(flat.size, dtype=table.dtype)
    # Chunks keep the index temporaries in cache (~25% faster on 4096 x 4096 than one pass).
    idx = np.empty(min(flat.size, _CHUNK), dtype=np.int32)
    nonzero = np.empty(idx.size, dtype=bool)
    lo_at, hi_at = (0, 1) if sys.byteorder == "little" else (1, 0)
    for start in range(0, flat.size, _CHUNK):
        halves = flat[start:start + _CHUNK].view(np.uint16)
        n = halves.size // 2
        i, nz = idx[:n], nonzero[:n]
        np.left_shift(halves[hi_at::2], 1, out=i, dtype=np.int32)
        np.not_equal(halves[lo_at::2], 0, out=nz)
        np.bitwise_or(i, nz, out=i)
        np.take(table, i, out=out[start:start + n], mode="clip")  # in range; no buffering
    return out.reshape(y.shape)


@functools.lru_cache(maxsize=None)
def _round_table(fmt: ElementFormat, narrow: bool) -> np.ndarray | None:
    """The float32 value of each ``encode`` table entry (+0.0 for the zero code)."""
    codes = _encode_table(fmt, narrow)
    if codes is None:
        return None
    values = _cached_table(fmt)[codes] + np.float32(0.0)
    values.setflags(write=False)
    return values


@functools.lru_cache(maxsize=None)
def _encode_table(fmt: ElementFormat, narrow: bool) -> np.ndarray | None:
    """The 2^17-entry code table of ``encode`` (see the module docstring), or None if unusable."""
    idx = np.arange(1 << 17, dtype=np.uint32)
    start = (idx >> 1) << 16
    first = (start | (idx & 1)).view(np.float32)  # bucket start, or its successor if bit set
    last = (start | np.where(idx & 1 == 1, 0xFFFF, 0).astype(np.uint32)).view(np.float32)
    # NaN buckets are never looked up (encode's callers reject NaN); evaluate them as 0.
    nan = np.isnan(first) | np.isnan(last)
    first, last = np.where(nan, 0, first), np.where(nan, 0, last)
    table = fmt.encode_reference(first, narrow=narrow)
    if not np.array_equal(table, fmt.encode_reference(last, narrow=narrow)):
        return None
    table.setflags(write=False)
    return table
