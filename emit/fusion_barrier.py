"""Keep ONNX Runtime's default graph optimizations from changing what an emitted graph computes.

At its default level (ORT_ENABLE_ALL) ONNX Runtime 1.31 rewrites two weight patterns that lowbit
emits, and neither rewrite computes the graph as written:

- a DequantizeLinear of constant 2/4/8-bit codes feeding a MatMul's B input becomes
  ``MatMulNBits`` with ``accuracy_level = 4``. That kernel re-quantizes the activations to int8
  per block of K: a weight-only recipe then runs with int8 activations, and a W4A8 recipe's
  activation codes are rounded a second time (+0.4 % perplexity on news text for W4A8). Only the
  session option ``session.qdq_matmulnbits_accuracy_level=0`` turns this off, and no model can
  set it.
- two FLOAT8E4M3FN DequantizeLinear inputs of one MatMul become ``MatMulIntegerToFloat``, which
  has no FP8 type: the session fails to load (INVALID_GRAPH).

Both fusions need the weight's DequantizeLinear to feed the MatMul directly (or through a
Transpose, which ORT's transpose optimizer folds into the constant). This pass puts a ``Reshape``
to the codes' own shape right after that DequantizeLinear, so that ORT leaves the weight pattern
alone and executes it as written.

Assumes: an emitted graph (any target). It does not change a pair of int8/uint8
DequantizeLinear inputs: ORT fuses those into ``MatMulIntegerToFloat``, an exact integer
product. Guarantees: a Reshape to the same static shape is an identity, so the function is
unchanged (``--verify`` checks it). A test runs every shipped recipe at ORT's default level and
checks that the result equals the graph run as written.

The cost is ORT's speed for these sites: the weight is dequantized on every call, as the graph
says. A model meant to run fast in ORT is compiled for the ``ort-cpu`` target, whose lowbit
kernels compute what they were written to compute.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lowbit.core.initializers import add_initializer
from lowbit.core.pass_base import LowbitPass

__all__ = ["FusionBarrierPass", "weight_dequantize"]

_MATMULS = frozenset({"MatMul", "Gemm"})
_INTEGER_PRODUCT = frozenset({ir.DataType.INT8, ir.DataType.UINT8})  # MatMulIntegerToFloat's types


def _is_constant(value: ir.Value) -> bool:
    return value.const_value is not None or value.is_initializer()


def weight_dequantize(value: ir.Value) -> ir.Node | None:
    """The DequantizeLinear of constant codes that produces ``value`` (through Transposes), or None."""
    node = value.producer()
    while node is not None and node.op_type == "Transpose" and node.domain == "":
        node = node.inputs[0].producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain != "" or not _is_constant(node.inputs[0]):
        return None
    return node


def _static_shape(value: ir.Value) -> tuple[int, ...] | None:
    dims = value.const_value.shape if value.const_value is not None else value.shape
    return tuple(int(d) for d in dims) if dims is not None and dims.is_static() else None


def _code_type(dq: ir.Node | None) -> ir.DataType | None:
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].type is None:
        return None
    return dq.inputs[0].type.dtype


class FusionBarrierPass(LowbitPass):
    """Put a same-shape Reshape between each weight DequantizeLinear and its MatMul where ORT's
    default optimizations would fuse them into a kernel that computes something else."""

    PRESERVES_FUNCTION = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, count = model.graph, 0
        for node in list(graph):
            if node.op_type not in _MATMULS or node.domain != "" or len(node.inputs) < 2 or node.inputs[1] is None:
                continue
            dq = weight_dequantize(node.inputs[1])
            shape = _static_shape(dq.inputs[0]) if dq is not None else None
            if shape is None:
                continue
            a = node.inputs[0].producer() if node.inputs[0] is not None else None
            if _code_type(a) in _INTEGER_PRODUCT and _code_type(dq) in _INTEGER_PRODUCT:
                continue  # int8 x int8: ORT's integer product is exact
            # Right after the DQ, before any Transpose: ORT's transpose optimizer removed a
            # Reshape that followed a Transpose it folded into the constant (measured); one
            # before the Transpose stays.
            dequantized = dq.outputs[0]
            base = dq.name or dequantized.name
            dims = add_initializer(graph, np.array(shape, np.int64), f"{base}.shape")
            barrier = ir.node("Reshape", [dequantized, dims], name=f"{base}.fusion_barrier")
            barrier.outputs[0].name = f"{dequantized.name}.as_written"
            barrier.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            barrier.outputs[0].shape = ir.Shape(shape)
            dequantized.replace_all_uses_with(barrier.outputs[0])  # the barrier's own input too:
            barrier.replace_input_with(0, dequantized)  # restore it
            graph.insert_after(dq, barrier)
            count += 1
        self.ctx.report["ort_fusion_barriers"] = count
        return ir.passes.PassResult(model, modified=bool(count))
