"""The interface every element format (INT-b, dINT-b, minifloats) implements.

An element format is a finite set of values plus a rounding rule, with no scale: it turns a
float32 array into the nearest representable values (``round``) or straight into their b-bit codes
(``encode``), and decodes codes through a ``2**bits``-entry table. All rounding here saturates at
the largest magnitude and never produces Inf; NaN passes through ``round`` (callers that must reject
NaN, such as :func:`lowbit.formats.encode`, check before calling).
"""

from __future__ import annotations

import abc
import functools

import numpy as np

__all__ = ["ElementFormat"]


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
    def encode(self, y: np.ndarray, *, narrow: bool = False) -> np.ndarray:
        """uint8 codes (low ``bits`` bits) of ``round(y)``; same shape as ``y``."""

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
