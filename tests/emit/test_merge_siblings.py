"""MergeSiblingMatMulsPass (lowbit.emit.merge_siblings): the MatMulLowbit nodes that read one
activation become one node and a Split, and the model computes exactly what it computed before --
on the decode path (one row), the GEMM path (many rows), with the native library and through the
ONNX fallback functions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import lowbit
from lowbit import runtime_ext as rx
from lowbit.models.synthetic import tiny_decoder

LAYERS = 2


@pytest.fixture(scope="module")
def pair(token_windows):
    """(merged, unmerged) W4A8 ort-cpu compiles of the tiny decoder (int8_group activations)."""
    from lowbit.runtime_ext import build

    build.build()

    def compile_tiny(merge: bool):
        return lowbit.compile(tiny_decoder(hidden=64, ffn=128, vocab=64), "w4a8-dint4", target="ort-cpu",
                              calibration=token_windows, overrides=[f"ort_cpu.merge_siblings={str(merge).lower()}"])

    return compile_tiny(True), compile_tiny(False)


def _ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def _run(model: ir.Model, ids: np.ndarray, native: bool) -> np.ndarray:
    opts = rx.session_options() if native else ort.SessionOptions()
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids})[0]


def test_siblings_become_one_node_and_a_split(pair):
    merged, unmerged = pair
    before, after = _ops(unmerged.model), _ops(merged.model)
    assert before["MatMulLowbit"] == 7 * LAYERS + 1  # q, k, v, o, gate, up, down + lm_head
    assert after["MatMulLowbit"] == 4 * LAYERS + 1 and after["Split"] == 2 * LAYERS  # qkv, o, gate_up, down
    assert merged.report["merged_matmuls"] == {"groups": 2 * LAYERS, "nodes_before": 5 * LAYERS, "sizes": [2, 3]}
    names = {v.name for n in merged.model.graph for v in n.outputs}
    assert {v.name for n in unmerged.model.graph if n.op_type == "MatMulLowbit" for v in n.outputs} <= names
    # the file does not grow: the separate packed arrays are gone, the concatenated ones replace them
    size = lambda m: sum(v.const_value.nbytes for v in m.graph.initializers.values())  # noqa: E731
    assert size(merged.model) <= size(unmerged.model) + 64


@pytest.mark.parametrize("native", [True, False], ids=["library", "fallback"])
@pytest.mark.parametrize("rows", [1, 12], ids=["gemv", "gemm"])
def test_merged_model_computes_exactly_what_it_did(pair, native, rows):
    merged, unmerged = pair
    ids = (np.arange(rows, dtype=np.int64) * 7 % 64)[None]
    a, b = _run(merged.model, ids, native), _run(unmerged.model, ids, native)
    assert np.array_equal(a, b)


def test_nodes_with_other_inputs_or_attributes_stay(pair):
    """o_proj and down_proj read activations no other node reads; the lm_head's is its own too."""
    merged, _ = pair
    singles = [n for n in merged.model.graph if n.op_type == "MatMulLowbit" and not n.name.startswith("lowbit_merged")]
    assert len(singles) == 2 * LAYERS + 1
    for node in singles:
        readers = [u.node for u in node.inputs[0].uses() if u.node.op_type == "MatMulLowbit"]
        assert readers == [node]
