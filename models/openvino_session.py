"""Run an ONNX file with OpenVINO (CPU plugin) behind ONNX Runtime's session interface.

``OpenVinoSession`` has the three members lowbit's feed builder and evaluators use --
``get_inputs()`` (``.name``, ``.type`` as ``"tensor(int64)"``, ``.shape``), ``get_outputs()`` and
``run(None, feeds)`` -- so perplexity and embedding cosine run unchanged on either runtime.
OpenVINO reads the ONNX file itself (its own frontend; external data next to it is fine) and
compiles it for the CPU, where its low-precision transformations turn standard QDQ MatMuls into
int8 kernels. ``executed_layers`` tells what the CPU plugin actually runs: each layer's type and
``runtimePrecision`` from the compiled runtime model.

Needs the ``openvino`` package (an optional dependency of lowbit: extra ``openvino``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.errors import LowbitError

__all__ = ["OpenVinoSession", "executed_layers", "integer_matmuls"]

_TYPE_NAMES = {"i64": "tensor(int64)", "i32": "tensor(int32)", "f32": "tensor(float)", "f16": "tensor(float16)"}
_MATMUL_LAYERS = ("FullyConnected", "MatMul")
_INTEGER_PRECISIONS = ("u8", "i8")


@dataclass(frozen=True)
class _Port:
    name: str
    type: str
    shape: list[Any]


def _port(port: Any) -> _Port:
    kind = port.get_element_type().get_type_name()
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    return _Port(port.get_any_name(), _TYPE_NAMES.get(kind, f"tensor({kind})"), shape)


class OpenVinoSession:
    """An OpenVINO CPU compiled model with ``InferenceSession``'s run/get_inputs/get_outputs."""

    def __init__(self, model_path: str | os.PathLike, device: str = "CPU") -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise LowbitError("OpenVINO is not installed (pip install 'lowbit[openvino]')") from e
        core = ov.Core()
        try:
            self.compiled = core.compile_model(core.read_model(str(model_path)), device)
        except Exception as e:  # OpenVINO raises RuntimeError with a multi-line message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LowbitError(f"{model_path}: OpenVINO cannot load it: {first[:300]}") from e
        self._request = self.compiled.create_infer_request()

    def get_inputs(self) -> list[_Port]:
        return [_port(p) for p in self.compiled.inputs]

    def get_outputs(self) -> list[_Port]:
        return [_port(p) for p in self.compiled.outputs]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer(feeds)
        outputs = [results[p] for p in self.compiled.outputs]
        if output_names is None:
            return [np.asarray(o) for o in outputs]
        by_name = {p.get_any_name(): np.asarray(o) for p, o in zip(self.compiled.outputs, outputs)}
        return [by_name[n] for n in output_names]


def executed_layers(session: OpenVinoSession) -> Counter:
    """(layer type, runtime precision) -> count, as the CPU plugin compiled the model."""
    ops = session.compiled.get_runtime_model().get_ordered_ops()
    return Counter((op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str)) for op in ops)


def integer_matmuls(session: OpenVinoSession) -> int:
    """MatMul-class layers (FullyConnected / MatMul) the CPU plugin runs in u8 or i8."""
    return sum(n for (kind, precision), n in executed_layers(session).items()
               if kind in _MATMUL_LAYERS and precision in _INTEGER_PRECISIONS)  # fmt: skip
