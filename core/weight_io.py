"""Linear-site weights of any size, read and rewritten in bounded memory.

A vocabulary head is the one weight larger than a block (Llama-3-8B's untied head: 4096 x 128256,
2.1 GB in float32): reading it whole for a statistic, or rescaling and permuting it as one array,
costs whole float32 copies beside the memory-mapped pages of its source. Here a 2-D weight is
streamed a slice of stored rows (``_CHUNK_BYTES`` of float32) at a time:

- external data by positioned reads into fresh arrays, never a memory map, so nothing read stays
  resident or counts as this process's memory (a whole-tensor map keeps every page it touched
  while it lives, and a strided read through one touches every page of a wide weight);
- a lazily widened float16 / bfloat16 constant from its narrow source, each slice widened to
  float32 as the whole would be (:mod:`lowbit.core.float_types`);
- an in-memory array by slicing; a deferred rewrite (:func:`lowbit.core.folding.rewrite_weight_kn`)
  computed once per call.

:class:`KnColumns` reads a slice of output columns at a time, for a reader that works on column
slices (OPTQ's rounding and refit of a head); :class:`StoredSlices` along the output channels in
the stored layout (the encoding of a head).

Guarantees: every function returns exactly what its whole-array formulation returns (elementwise
float32 products, exact maxima and gathers), in (K, N) orientation -- K the reduction axis --
whatever the stored layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lowbit.core.float_types import widened_source
from lowbit.core.linear_sites import LinearSite
from lowbit.errors import LowbitError

__all__ = ["KnColumns", "StoredSlices", "column_sample_kn", "row_absmax_kn", "transformed_stored"]

_CHUNK_BYTES = 64 << 20


def _stored(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """The tensor whose bytes hold ``tensor``'s elements (a lazily widened constant's source)."""
    source = widened_source(tensor)
    return source if source is not None else tensor


def _row_reader(tensor: ir.TensorProtocol) -> Callable[..., np.ndarray]:
    """A function ``read(rows, cols=slice(None))`` giving a float32 copy of stored rows (a slice,
    or indices) of the 2-D ``tensor``, restricted to stored columns ``cols``: external bytes by
    positioned reads (:func:`_read_external`); anything else (in memory, or computed by a
    deferred rewrite) from its array, computed once here."""
    source = _stored(tensor)
    if not isinstance(source, ir.ExternalTensor):
        array = source.numpy()
        return lambda rows, cols=slice(None): np.array(array[rows][:, cols], dtype=np.float32)
    return lambda rows, cols=slice(None): _read_external(source, rows, cols)


def _read_external(source: ir.ExternalTensor, rows: slice | np.ndarray, cols: slice | np.ndarray) -> np.ndarray:
    """Stored rows ``rows``, columns ``cols`` of an external 2-D tensor as a new float32 array, read
    with positioned reads into fresh arrays. No memory map: a map's touched pages count as this
    process's memory while it lives, and a strided read faults in whole pages around every row (a
    128-column sample of an 8B head mapped all of its 2.1 GB). Each row is read over the span of
    its selected columns; a contiguous run of whole rows in pieces of ``_CHUNK_BYTES``."""
    n_rows, n_cols = (int(d) for d in source.shape.numpy())
    dtype = np.dtype(source.dtype.numpy()).newbyteorder("<")
    item, base = dtype.itemsize, int(source.offset or 0)
    row_ids = np.arange(n_rows)[rows]
    if isinstance(cols, slice) and cols.step in (None, 1):
        c0, c1, _ = cols.indices(n_cols)
        picked = None
        out = np.empty((len(row_ids), max(0, c1 - c0)), np.float32)
    else:
        picked = np.arange(n_cols)[cols]
        c0, c1 = (int(picked.min()), int(picked.max()) + 1) if len(picked) else (0, 0)
        picked = picked - c0
        out = np.empty((len(row_ids), len(picked)), np.float32)
    if out.size == 0:
        return out
    with open(source.path, "rb", buffering=0) as f:
        if picked is None and (c0, c1) == (0, n_cols) and np.all(np.diff(row_ids) == 1):
            step = max(1, _CHUNK_BYTES // (n_cols * item))
            for i in range(0, len(row_ids), step):
                chunk = np.empty((min(step, len(row_ids) - i), n_cols), dtype)
                _read_into(f, chunk, base + int(row_ids[i]) * n_cols * item)
                out[i:i + len(chunk)] = chunk
            return out
        span = np.empty(c1 - c0, dtype)
        for i, r in enumerate(row_ids):
            _read_into(f, span, base + (int(r) * n_cols + c0) * item)
            out[i] = span if picked is None else span[picked]
    return out


def _read_into(f, array: np.ndarray, offset: int) -> None:
    """Fill the contiguous ``array`` with the bytes of ``f`` at ``offset``."""
    view = memoryview(array).cast("B")
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise LowbitError(f"external data {Path(f.name).name}: ends before byte {offset + len(view)}")
        done += n


def _row_slices(n_rows: int, n_cols: int, max_bytes: int = _CHUNK_BYTES) -> list[slice]:
    step = max(1, max_bytes // (4 * max(1, n_cols)))
    return [slice(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


def _shape(site: LinearSite) -> tuple[int, int]:
    rows, cols = site.weight.const_value.shape.numpy()
    return int(rows), int(cols)


def row_absmax_kn(site: LinearSite) -> np.ndarray:
    """max |W| over output columns, per input channel: (K,) float32."""
    read = _row_reader(site.weight.const_value)
    rows, cols = _shape(site)
    if site.reduction_axis == 0:  # stored (K, N): one maximum per stored row
        return np.concatenate([np.abs(read(part)).max(axis=1) for part in _row_slices(rows, cols)])
    out = np.zeros(cols, np.float32)  # stored (N, K): the maximum over stored rows
    for part in _row_slices(rows, cols):
        np.maximum(out, np.abs(read(part)).max(axis=0), out=out)
    return out


def column_sample_kn(site: LinearSite, columns: slice | np.ndarray) -> np.ndarray:
    """W[:, columns] in (K, N) orientation: (K, len(columns)) float32."""
    return _columns_kn(_row_reader(site.weight.const_value), site.reduction_axis, columns)


def _columns_kn(read: Callable[..., np.ndarray], axis: int, columns: slice | np.ndarray) -> np.ndarray:
    if axis == 1:  # stored (N, K): the columns are stored rows
        return read(columns).T.copy()
    return read(slice(None), columns)


class KnColumns:
    """The (K, N) weight of sites reading one input, their output columns side by side, read a
    slice of columns at a time: ``w[:, cols]`` (a slice or indices) is a new float32 array, and
    nothing of the weight is held between reads -- a vocabulary head's mapped pages, or its
    widened float32 copy, would be 1-2 GB beside the work on it. (A weight computed by a deferred
    rewrite is computed once, here, and held while this object lives.) ``digest`` identifies the
    elements, whatever their storage."""

    def __init__(self, sites: Sequence[LinearSite]) -> None:
        self._reads = [(_row_reader(s.weight.const_value), s.reduction_axis, _shape(s)) for s in sites]
        self._offsets = np.cumsum([0] + [s.out_features for s in sites])
        self.shape = (sites[0].in_features, int(self._offsets[-1]))
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: tuple[slice, slice | np.ndarray]) -> np.ndarray:
        rows, cols = key
        if rows != slice(None):
            raise IndexError("KnColumns reads whole columns: w[:, cols]")
        if isinstance(cols, slice) and cols.step in (None, 1):
            start, stop, _ = cols.indices(self.shape[1])
            parts = [(read, axis, slice(max(start, o0) - o0, min(stop, o1) - o0))
                     for (read, axis, _), o0, o1 in zip(self._reads, self._offsets, self._offsets[1:]) if start < o1 and stop > o0]  # fmt: skip
        else:
            picked = np.arange(self.shape[1])[cols]
            site_of = np.searchsorted(self._offsets, picked, side="right") - 1
            parts, runs = [], np.flatnonzero(np.diff(site_of)) + 1  # runs of one site, in order
            for run in np.split(np.arange(len(picked)), runs):
                if len(run):
                    i = site_of[run[0]]
                    parts.append((self._reads[i][0], self._reads[i][1], picked[run] - self._offsets[i]))
        if not parts:
            return np.empty((self.shape[0], 0), np.float32)
        pieces = [_columns_kn(read, axis, c) for read, axis, c in parts]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)

    def digest(self) -> str:
        """A hash of the float32 elements, read a slice of stored rows at a time."""
        h = hashlib.blake2b(digest_size=20)
        for read, axis, (rows, cols) in self._reads:
            h.update(f"{axis}{rows}x{cols}".encode())
            for part in _row_slices(rows, cols):
                h.update(read(part).tobytes())
        return h.hexdigest()


class StoredSlices:
    """A site's weight in its stored layout, for readers that go along its output channels
    (:func:`lowbit.formats.encode_sliced`): ``shape``, and basic slices as float32 copies --
    ``w[i:j]`` of a stored (N, K) weight, ``w[:, i:j]`` of a stored (K, N) one -- read as
    :class:`KnColumns` reads them."""

    def __init__(self, site: LinearSite) -> None:
        self._columns, self._axis = KnColumns([site]), site.reduction_axis
        self.shape = _shape(site)

    def __getitem__(self, key: slice | tuple[slice, slice]) -> np.ndarray:
        if self._axis == 0:  # stored (K, N): output channels are stored columns
            return self._columns[key]
        if not isinstance(key, slice):
            raise IndexError("a stored (N, K) weight is sliced along its rows: w[i:j]")
        return self._columns[:, key].T

    def output_slices(self, max_bytes: int = _CHUNK_BYTES) -> list[slice]:
        """Output-channel slices of about ``max_bytes`` of float32 each."""
        n, k = (self.shape[1], self.shape[0]) if self._axis == 0 else self.shape
        return _row_slices(n, k, max_bytes)  # output channels are rows of the (N, K) view

    def output_slice(self, cols: slice) -> np.ndarray:
        """Output channels ``cols`` in the stored layout."""
        return self[:, cols] if self._axis == 0 else self[cols]


def transformed_stored(site: LinearSite, *, perm: np.ndarray | None = None, scale: np.ndarray | None = None) -> np.ndarray:
    """diag(scale) W[perm] (W in (K, N) orientation: ``perm`` reorders and ``scale`` multiplies
    input channels, either may be None) as a new float32 array in the weight's stored layout."""
    read = _row_reader(site.weight.const_value)
    rows, cols = _shape(site)
    out = np.empty((rows, cols), np.float32)
    scale32 = None if scale is None else np.asarray(scale, dtype=np.float32)
    for part in _row_slices(rows, cols):
        if site.reduction_axis == 0:  # stored (K, N): output rows are input channels
            chunk = read(part if perm is None else perm[part])
            if scale32 is not None:
                chunk *= scale32[part, None]
        else:  # stored (N, K): columns are input channels
            chunk = read(part)
            if perm is not None:
                chunk = chunk[:, perm]
            if scale32 is not None:
                chunk *= scale32[None, :]
        out[part] = chunk
    return out
