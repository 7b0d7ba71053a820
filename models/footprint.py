"""Storage footprint of an ONNX model: size on disk and effective bits per linear weight.

Pure ``onnx`` (no torch, no ORT). The weight data itself is never loaded: sizes come from each
initializer's type and shape.

Effective bits per weight counts, for every *linear site* (``MatMul`` / ``Gemm`` whose weight
input is constant, ``com.microsoft::MatMulNBits`` and ``lowbit::MatMulLowbit``), the bytes of every initializer that the
weight is computed from, through layout ops (Transpose, Reshape, Cast, ...) and
``DequantizeLinear`` / ``QuantizeLinear`` chains including their scales and zero points (so FP8
scales of an int4 DQ, and the FP32 scale of those scales, all count; a weight quantized at run
time by Q -> DQ counts at its stored FP32 size). bits/weight = 8 * bytes / logical weight
elements. A tensor shared by several sites is counted once. MatMuls between two activations
(e.g. attention scores in opset-18 exports) are not linear sites.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from lowbit.errors import LowbitError, printable
from lowbit.models.registry import onnx_model_file

LOWBIT_DOMAIN = "lowbit"  # lowbit.runtime_ext.functions.DOMAIN, without importing the op library (tested equal)

__all__ = ["WeightBits", "load_graph_only", "size_on_disk", "linear_weight_bits", "tensor_bits"]

# Ops that only move or reinterpret a weight: its storage is whatever feeds them.
_LAYOUT_OPS = {"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"}
_SUBBYTE_BITS = {
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
    onnx.TensorProto.FLOAT4E2M1: 4,
}
for _name in ("INT2", "UINT2"):  # opset 25 types, present in onnx >= 1.20
    if hasattr(onnx.TensorProto, _name):
        _SUBBYTE_BITS[getattr(onnx.TensorProto, _name)] = 2


@dataclass(frozen=True)
class WeightBits:
    """Storage of the linear layers' weights."""

    sites: int  # linear sites found
    elements: int  # logical weight elements over distinct weights
    bytes: int  # bytes of every initializer those weights are computed from

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / self.elements if self.elements else float("nan")


def tensor_bits(data_type: int) -> int:
    """Bits per element of an ONNX tensor type."""
    if data_type in _SUBBYTE_BITS:
        return _SUBBYTE_BITS[data_type]
    return 8 * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def load_graph_only(path: str | os.PathLike) -> tuple[Path, onnx.ModelProto]:
    """(the .onnx file, its ModelProto without external data); LowbitError if not ONNX, or if a
    tensor type, an external data reference or the graph's order is broken
    (:func:`lowbit.core.model_checks.check_onnx_graph`)."""
    from lowbit.core.model_checks import check_onnx_graph

    f = onnx_model_file(path)
    try:
        model = onnx.load(str(f), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends on a non-ONNX file
        raise LowbitError(f"{f} is not an ONNX model ({type(e).__name__})") from e
    if not model.graph.node:
        raise LowbitError(f"{f} is not an ONNX model (empty graph)")
    check_onnx_graph(f, model)
    return f, model


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of the .onnx file plus every external-data file it references."""
    f, model = load_graph_only(path)
    locations = set()
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return f.stat().st_size + sum((f.parent / loc).stat().st_size for loc in locations)


class _Tracer:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}

    def numel(self, name: str) -> int:
        return math.prod(self.inits[name].dims)

    def storage(self, name: str) -> set[str] | None:
        """Initializers ``name`` is computed from, or None if it depends on an activation.

        Iterative (a weight may sit behind thousands of layout ops) and cycle-safe: a value met
        twice is counted once."""
        found: set[str] = set()
        stack, seen = [name], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in self.inits:
                found.add(n)
                continue
            node = self.producer.get(n)
            if node is None or not node.input:
                return None
            if node.op_type in _LAYOUT_OPS:
                # Reshape's shape input etc. are metadata, not weight storage.
                stack.append(node.input[0])
            elif node.op_type in ("DequantizeLinear", "QuantizeLinear"):
                # Q of a constant (a weight quantized as if it were an activation) is constant too.
                stack.extend(i for i in node.input if i)
            else:
                return None
        return found

    def elements(self, name: str) -> int:
        """Logical elements of a constant weight: follow DQ/layout ops to the data tensor."""
        seen = set()
        while name not in self.inits:
            if name in seen:  # storage() found initializers, so this is a layout-op cycle
                raise LowbitError(f"the graph has a cycle through {printable(name)!r}")
            seen.add(name)
            name = self.producer[name].input[0]
        return self.numel(name)

    def bytes(self, names: set[str]) -> int:
        total = 0
        for n in names:
            t = self.inits[n]
            total += math.ceil(self.numel(n) * tensor_bits(t.data_type) / 8)
        return total


def linear_weight_bits(path: str | os.PathLike) -> WeightBits:
    """Effective storage of the linear layers of the model at ``path`` (see module docstring)."""
    f, model = load_graph_only(path)
    tracer = _Tracer(model.graph)
    storage: set[str] = set()
    seen_weights: set[str] = set()
    elements = sites = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx"):
            if len(node.input) < 2 or not node.input[1]:
                label = node.name or (node.output[0] if node.output else "")
                raise LowbitError(f"{f}: {node.op_type} node {printable(label)!r} has "
                                  f"{len([i for i in node.input if i])} input(s), needs at least 2")  # fmt: skip
            found = tracer.storage(node.input[1])
            if found is None:
                continue
            sites += 1
            if node.input[1] not in seen_weights:
                seen_weights.add(node.input[1])
                elements += tracer.elements(node.input[1])
            storage |= found
        elif node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            attrs = {a.name: a.i for a in node.attribute}
            sites += 1
            if node.input[1] not in seen_weights:
                seen_weights.add(node.input[1])
                elements += attrs["K"] * attrs["N"]
            # B, scales, zero points, g_idx; the bias (input 5) is not weight storage.
            storage |= {i for i in node.input[1:5] if i in tracer.inits}
        elif node.op_type == "MatMulLowbit" and node.domain == LOWBIT_DOMAIN:
            sites += 1
            codes = node.input[1]  # [N, K / 2]: two 4-bit codes per byte
            if codes not in seen_weights:
                seen_weights.add(codes)
                elements += 2 * tracer.numel(codes)
            # codes, block scales, global scale and FP8 blocks (inputs 5-7); input 4 is an activation scale
            storage |= {name for i, name in enumerate(node.input) if i in (1, 2, 3, 5, 6, 7) and name in tracer.inits}
    return WeightBits(sites=sites, elements=elements, bytes=tracer.bytes(storage))
