"""Small graph-building helpers (named constant initializers, the scale floor) shared by every
pass that adds nodes; owned here, below the emitters, so that any layer can build a constant."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

__all__ = ["SCALE_FLOOR", "add_initializer", "code_dtype"]

# Smallest scale a run-time (dynamic) quantizer may divide by: an all-zero token or group gets
# this instead of 0, so x / scale stays finite (its codes are 0 either way).
SCALE_FLOOR = np.float32(np.finfo(np.float32).tiny)


def add_initializer(graph: ir.Graph, array: np.ndarray, name: str, dtype: ir.DataType | None = None) -> ir.Value:
    """Register ``array`` as a named initializer of ``graph`` and return its value."""
    tensor = ir.tensor(np.asarray(array, order="C"), dtype=dtype, name=name)  # keeps 0-d arrays 0-d
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


_CODE_DTYPES = {"int4": (ml_dtypes.int4, ml_dtypes.uint4), "int8": (np.int8, np.uint8), "int16": (np.int16, np.uint16)}


def code_dtype(name: str, signed: bool = True) -> type:
    """The numpy / ml_dtypes type that stores the codes of integer format ``name`` in a graph
    (INT4/UINT4 tensors for 4 bits); its range is ``lowbit.formats.integer_codes(name, signed)``."""
    return _CODE_DTYPES[name][0 if signed else 1]
