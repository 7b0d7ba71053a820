"""Bound a block-wise compile's memory by a block: what a block's passes wrote goes to disk, and
what they replaced is dropped.

After each block, :meth:`TensorSpill.spill` writes every in-memory initializer of at least
``min_bytes`` (the block's codes and scales, norms and weights its folding rewrote) to one scratch
data file and replaces it by an ``ir.ExternalTensor`` reading it back (memory-mapped, on demand),
and :func:`drop_unused_initializers` removes the initializers no node reads any more (the float
weights the codes replaced), releasing their memory maps; :func:`unmap_external` closes the maps
that reading the kept ones left open. A spilled tensor that no initializer holds any more, directly
or as the source of a lazy constant (a ``functools.partial`` over it: a widened float16 weight, a
deferred rewrite), gives its disk space back at the next spill: its range of the file becomes a hole
(Linux ``fallocate`` punch; elsewhere, or on a file system without holes, the file only grows).

Guarantees: tensor contents are unchanged (the bytes written are ``tobytes()``, read back with the
same dtype and shape); the scratch file lives as long as the process (``lowbit.files.scratch``),
so a compiled model can be saved after the compile.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterator
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

__all__ = ["TensorSpill", "drop_unused_initializers", "unmap_external"]

_ALIGN = 64
MIN_BYTES = 64 << 10  # smaller initializers stay in memory (norms, biases, a block's scales)


class TensorSpill:
    """One append-only scratch data file of spilled initializers, a new file in ``directory``
    (each compile its own: a compiled model keeps reading its spill after the compile)."""

    def __init__(self, directory: Path, min_bytes: int | None = None) -> None:
        fd, name = tempfile.mkstemp(prefix="spill-", suffix=".data", dir=directory)
        os.close(fd)
        self.path, self.min_bytes = Path(name), MIN_BYTES if min_bytes is None else min_bytes
        self.offset = 0
        self.bytes = 0  # spilled so far
        self.reclaimed = 0  # bytes whose tensors died, punched out of the file
        self._live: dict[int, int] = {}  # offset -> length of each spilled tensor not yet reclaimed

    def spill(self, graph: ir.Graph) -> int:
        """Move the graph's in-memory initializers of ``min_bytes`` or more to the file; returns
        how many."""
        self._reclaim(graph)
        moved = 0
        with open(self.path, "ab") as f:
            for value in graph.initializers.values():
                tensor = value.const_value
                # external and lazily widened weights are read on demand already: only what a pass wrote moves
                if tensor is None or isinstance(tensor, (ir.ExternalTensor, ir.LazyTensor)) or tensor.nbytes < self.min_bytes:
                    continue
                data = _raw_bytes(tensor)
                pad = -self.offset % _ALIGN
                f.write(b"\0" * pad)
                f.write(data)
                self.offset += pad
                value.const_value = ir.ExternalTensor(self.path.name, self.offset, len(data), tensor.dtype,
                                                      shape=tensor.shape, name=tensor.name or value.name,
                                                      base_dir=self.path.parent)  # fmt: skip
                self._live[self.offset] = len(data)
                self.offset += len(data)
                self.bytes += len(data)
                moved += 1
        return moved

    def _reclaim(self, graph: ir.Graph) -> None:
        """Punch out the ranges of spilled tensors no initializer of ``graph`` holds any more."""
        held = {offset for value in graph.initializers.values() for offset in self._offsets(value.const_value)}
        dead = [offset for offset in self._live if offset not in held]
        if not dead:
            return
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for offset in dead:
                length = self._live.pop(offset)
                if _punch_hole(fd, offset, length):
                    self.reclaimed += length
        finally:
            os.close(fd)

    def _offsets(self, tensor: ir.TensorProtocol | None) -> Iterator[int]:
        """The offsets in this file that ``tensor`` reads, itself or through its lazy sources."""
        if isinstance(tensor, ir.ExternalTensor):
            if Path(tensor.path) == self.path:
                yield tensor.offset
        elif isinstance(tensor, ir.LazyTensor) and isinstance(tensor.raw, functools.partial):
            for arg in tensor.raw.args:
                yield from self._offsets(arg)


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if os.name == "posix" else None
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of ``length`` bytes at ``offset`` (they read as zeros; the size stays);
    False where the system or file system cannot."""
    if _fallocate is None:
        return False
    return _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def _raw_bytes(tensor: ir.TensorProtocol) -> memoryview | bytes:
    """The tensor's bytes as ``tobytes()`` gives them, without the copy when its array is already
    laid out that way (C order, little endian, whole bytes per element): a rotated 1B table is 1 GB."""
    if tensor.dtype.bitwidth % 8 == 0 and isinstance(tensor, ir.Tensor):
        array = tensor.numpy()
        if array.flags.c_contiguous and array.dtype.byteorder in "=|<" and array.dtype.itemsize * 8 == tensor.dtype.bitwidth:
            return memoryview(array.reshape(-1).view(np.uint8))
    return tensor.tobytes()


def drop_unused_initializers(graph: ir.Graph) -> int:
    """Remove the initializers that no node reads and that are not graph inputs or outputs;
    returns how many. A dropped external tensor's memory map is released."""
    outputs = set(graph.outputs)
    unused = [name for name, v in graph.initializers.items()
              if not v.uses() and v not in outputs and not v.is_graph_input()]  # fmt: skip
    for name in unused:
        value = graph.initializers.pop(name)
        tensor, value.const_value = value.const_value, None  # onnx_ir's graph-input bookkeeping may keep the value
        if isinstance(tensor, ir.ExternalTensor):
            tensor.release()
    return len(unused)


def unmap_external(graph: ir.Graph) -> None:
    """Close the memory maps that reading external initializers left open (a read page of a map
    stays resident while the map lives: a 1B model's tied embedding is 1 GB); the next read maps
    the file again."""
    for value in graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            try:
                value.const_value.release()
            except BufferError:  # a pass still holds an array of it: its map closes when that array dies
                pass
