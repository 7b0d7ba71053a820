"""Replace run-time shape arithmetic by constants where the shapes say what it computes.

Exporters compute Reshape and Expand targets at run time: optimum's Llama attention reads the
batch and sequence lengths with ``Shape -> Gather -> Unsqueeze -> Concat`` before every head
split, merge and ``repeat_kv``. ONNX Runtime runs each of these small nodes at every decode step
(about 30 per layer of SmolLM2). With the symbolic dimensions that shape inference puts on values
(optimum names them: ``batch_size``, ``sequence_length``, ...), most targets are known relative to
the reshaped tensor itself:

- ``Reshape(x, t)``: an element of ``t`` that is a number stays; one that is the same symbol as
  ``x``'s dimension at that position becomes 0 (copy it; the node's ``allowzero`` must be 0); one
  other element may become -1 (inferred from the size). Otherwise the node is left alone.
- ``Expand(x, t)``: an element of ``t`` that is the same symbol as ``x``'s dimension it is
  broadcast against becomes 1 (broadcasting keeps ``x``'s dimension).

Assumes: value shapes from shape inference, where two dimensions with the same symbol are equal
(onnx names a dimension it cannot derive ``unk__N``, a fresh name each time). Guarantees: the new
constant target gives the same output shape as the old one for every input that fits the graph
inputs' declared shapes, so the function is unchanged (``--verify`` checks it); the shape chains
left without a reader are removed by the dead-code pass that follows.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lowbit.core.initializers import add_initializer

__all__ = ["SimplifyShapesPass", "symbolic_value"]

Dim = int | str | None  # a number, a symbol, or unknown
_SMALL = 64  # longest constant shape vector read


def _dim(d) -> Dim:
    if isinstance(d, int):
        return d
    return d.value if isinstance(d, ir.SymbolicDim) and d.value and not d.value.startswith("unk__") else None


def _const(value: ir.Value) -> np.ndarray | None:
    """A small integer constant: an initializer, or a Constant node's value."""
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None or tensor.dtype not in (ir.DataType.INT64, ir.DataType.INT32) or tensor.size > _SMALL:
        return None
    return tensor.numpy()


def symbolic_value(value: ir.Value | None, depth: int = 0) -> list[Dim] | Dim | None:
    """What an integer shape computation yields, element by element, in terms of shape symbols: a
    list for a 1-D value, a single element for a scalar, None when it is not a shape computation."""
    if value is None or depth > 16:
        return None
    array = _const(value)
    if array is not None:
        return int(array) if array.ndim == 0 else [int(v) for v in array] if array.ndim == 1 else None
    node = value.producer()
    if node is None or node.domain != "":
        return None
    op, a = node.op_type, node.attributes
    if op == "Shape":
        shape = node.inputs[0].shape
        if shape is None:
            return None
        dims = [_dim(d) for d in shape]
        start, end = a.get_int("start", 0), a.get_int("end", len(dims))
        return dims[slice(start, end)]
    inputs = [symbolic_value(v, depth + 1) for v in node.inputs]
    if op in ("Identity", "Cast") and (op == "Identity" or a.get_int("to") == ir.DataType.INT64):
        return inputs[0]
    if op == "Gather" and isinstance(inputs[0], list) and a.get_int("axis", 0) == 0:
        idx = _const(node.inputs[1])
        if idx is None or idx.ndim > 1 or not all(-len(inputs[0]) <= i < len(inputs[0]) for i in np.atleast_1d(idx)):
            return None
        picked = [inputs[0][int(i)] for i in np.atleast_1d(idx)]
        return picked[0] if idx.ndim == 0 else picked
    if op == "Unsqueeze" and not isinstance(inputs[0], list) and inputs[0] is not None:
        return [inputs[0]]
    if op == "Squeeze" and isinstance(inputs[0], list) and len(inputs[0]) == 1:
        return inputs[0][0]
    if op == "Concat" and a.get_int("axis", 0) == 0 and all(isinstance(v, list) for v in inputs):
        return [d for v in inputs for d in v]
    if op == "Reshape" and isinstance(inputs[0], list) and inputs[1] == [-1]:
        return inputs[0]
    if op in _ARITHMETIC and len(inputs) == 2:
        return _arithmetic(op, inputs[0], inputs[1])
    if op == "ConstantOfShape" and isinstance(inputs[0], list) and len(inputs[0]) == 1 and isinstance(inputs[0][0], int):
        fill = a.get("value")
        array = fill.as_tensor().numpy() if fill is not None else np.zeros(1, np.float32)
        if array.dtype.kind in "iu" and array.size == 1:
            return [int(array.reshape(-1)[0])] * inputs[0][0]
        return None
    if op == "Equal" and len(inputs) == 2:
        return _elementwise(_equal, inputs[0], inputs[1])
    if op == "Where" and isinstance(inputs[0], list) and all(isinstance(c, int) for c in inputs[0]):
        x, y = (v if isinstance(v, list) else [v] * len(inputs[0]) for v in inputs[1:])
        if len(x) != len(inputs[0]) or len(y) != len(inputs[0]):
            return None
        return [xi if c else yi for c, xi, yi in zip(inputs[0], x, y)]
    return None


def _equal(x: Dim, y: Dim) -> int | None:
    """1 / 0 when known: two numbers, the same symbol, or a symbol (a size, >= 0) against a
    negative number."""
    if isinstance(x, int) and isinstance(y, int):
        return int(x == y)
    if x is not None and x == y:
        return 1
    if (isinstance(x, str) and isinstance(y, int) and y < 0) or (isinstance(y, str) and isinstance(x, int) and x < 0):
        return 0
    return None


def _elementwise(fn, a, b):
    """``fn`` over 1-D values with numpy broadcasting (a scalar or a 1-element vector spreads)."""
    if isinstance(a, list) and isinstance(b, list) and len(a) != len(b):
        if len(a) == 1:
            a = a[0]
        elif len(b) == 1:
            b = b[0]
    if isinstance(a, list) and isinstance(b, list):
        return [fn(x, y) for x, y in zip(a, b)] if len(a) == len(b) else None
    if isinstance(a, list):
        return [fn(x, b) for x in a]
    if isinstance(b, list):
        return [fn(a, y) for y in b]
    return fn(a, b)


_ARITHMETIC = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y,
               "Div": lambda x, y: int(x / y) if y else None}  # ONNX integer Div truncates  # fmt: skip


def _arithmetic(op: str, a, b):
    """Elementwise integer arithmetic on known numbers (a scalar broadcasts); unknown otherwise."""
    def one(x, y):
        return _ARITHMETIC[op](x, y) if isinstance(x, int) and isinstance(y, int) else None

    return _elementwise(one, a, b)


_FOLDABLE = frozenset({"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Reshape", "ConstantOfShape", "Where",
                       "Identity", "Cast", *_ARITHMETIC})  # fmt: skip


def _known(value) -> bool:
    return isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, int) for v in value))


def _reshape_target(x: ir.Value, target: list[Dim]) -> list[int] | None:
    dims = [_dim(d) for d in x.shape] if x.shape is not None else []
    out, inferred = [], -1 in target
    for i, t in enumerate(target):
        if isinstance(t, int):
            out.append(t)
        elif t is not None and i < len(dims) and dims[i] == t:
            out.append(0)
        elif not inferred:
            out.append(-1)
            inferred = True
        else:
            return None
    return out


def _expand_target(x: ir.Value, target: list[Dim]) -> list[int] | None:
    dims = [_dim(d) for d in x.shape] if x.shape is not None else None
    if dims is None or len(dims) > len(target):
        return None
    offset = len(target) - len(dims)
    out = []
    for j, t in enumerate(target):
        if isinstance(t, int):
            out.append(t)
        elif t is not None and j >= offset and dims[j - offset] == t:
            out.append(1)
        else:
            return None
    return out


class SimplifyShapesPass(ir.passes.InPlacePass):
    """Constant Reshape / Expand targets and shape arithmetic from symbolic shapes (see the module
    docstring). A rewritten Expand or Reshape lets shape inference name more dimensions, so the
    pass alternates with it until nothing changes (at most ``rounds`` times)."""

    def __init__(self, rounds: int = 3) -> None:
        super().__init__()
        self.rounds = rounds

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnx_ir.passes.common import ShapeInferencePass

        modified = False
        for _ in range(self.rounds):
            if not (self._fold_known(model) + self._targets(model)):
                break
            modified = True
            ShapeInferencePass(strict_mode=False)(model)
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _fold_known(model: ir.Model) -> int:
        """Integer shape arithmetic whose every element is a number becomes a constant."""
        count = 0
        for node in list(model.graph):
            if node.domain != "" or node.op_type not in _FOLDABLE:
                continue
            out = node.outputs[0]
            if not out.uses() or out.type is None or out.type.dtype != ir.DataType.INT64 or _const(out) is not None:
                continue
            value = symbolic_value(out)
            if not _known(value) or any(u.node.op_type == "Constant" for u in out.uses()):
                continue
            const = add_initializer(model.graph, np.array(value, np.int64), f"{out.name}.known")
            out.replace_all_uses_with(const, replace_graph_outputs=False)
            count += 1
        return count

    @staticmethod
    def _targets(model: ir.Model) -> int:
        count = 0
        for node in list(model.graph):
            if node.domain != "" or node.op_type not in ("Reshape", "Expand") or len(node.inputs) < 2:
                continue
            shape_input = node.inputs[1]
            if shape_input is None or _const(shape_input) is not None:
                continue
            target = symbolic_value(shape_input)
            if not isinstance(target, list):
                continue
            if node.op_type == "Reshape":
                if node.attributes.get_int("allowzero", 0):
                    continue
                new = _reshape_target(node.inputs[0], target)
            else:
                new = _expand_target(node.inputs[0], target)
            if new is None:
                continue
            name = f"{node.outputs[0].name}.static_shape"
            node.replace_input_with(1, add_initializer(model.graph, np.array(new, np.int64), name))
            _name_output_dims(node, target)
            count += 1
        return count


def _name_output_dims(node: ir.Node, target: list[Dim]) -> None:
    """Give the output the dimensions the target names where shape inference left them unknown
    (onnx does not broadcast a symbol against an Expand's 1), for the next round to read."""
    out, x = node.outputs[0], node.inputs[0]
    dims = [_dim(d) for d in x.shape] if x.shape is not None else []
    if node.op_type == "Expand":
        offset = len(target) - len(dims)
        named = [dims[j - offset] if j >= offset and (t == 1 or t == dims[j - offset]) else t
                 for j, t in enumerate(target)]  # fmt: skip
    else:
        named = [dims[i] if t == 0 and i < len(dims) else t for i, t in enumerate(target)]
    if out.shape is None or len(out.shape) != len(named):
        return
    merged = [d if _dim(d) is not None else (n if isinstance(n, int) and n >= 0 else ir.SymbolicDim(n) if isinstance(n, str) else d)
              for d, n in zip(out.shape, named)]  # fmt: skip
    out.shape = ir.Shape(merged)
