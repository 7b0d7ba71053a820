"""Fixtures for the lowbit ORT ops: the built library and tiny one-node models.

The library is normally built by ``make test`` (``make native``) before pytest starts; the
session fixture builds it only if it is missing (e.g. a bare ``pytest`` run).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # ORT 1.31 accepts IR <= 13 (FACTS.md); 10 goes with opset 21
OPSET = 21


@pytest.fixture(scope="session")
def native_lib():
    from lowbit.runtime_ext import build

    return build.build()


def one_node_model(node: onnx.NodeProto, inputs: dict[str, tuple[int, list]],
                   output: tuple[str, list], inits: dict[str, np.ndarray] | None = None,
                   opset: int = OPSET) -> onnx.ModelProto:
    """A graph holding ``node`` with the lowbit fallbacks attached.

    inputs: name -> (TensorProto elem type, shape) for runtime inputs; inits: constant arrays.
    """
    from lowbit import runtime_ext as rx

    graph = helper.make_graph(
        [node], "t",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", opset)])
    return rx.attach_functions(model)


def sessions(model: onnx.ModelProto, native: bool):
    """An ORT session with (native) or without (ONNX function fallback) the library."""
    import onnxruntime as ort

    from lowbit import runtime_ext as rx

    opts = rx.session_options() if native else ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def optimized_op_types(model: onnx.ModelProto, native: bool, tmp_path) -> list[str]:
    """Op types ORT actually runs (after inlining and fusion)."""
    import onnxruntime as ort

    from lowbit import runtime_ext as rx

    opts = rx.session_options() if native else ort.SessionOptions()
    path = tmp_path / "optimized.onnx"
    opts.optimized_model_filepath = str(path)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.fixture(scope="session")
def lb(native_lib):
    """The helpers above, for test modules (conftest functions are not importable)."""
    import types

    return types.SimpleNamespace(one_node_model=one_node_model, session=sessions,
                                 optimized_op_types=optimized_op_types, library=native_lib)
