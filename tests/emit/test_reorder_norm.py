"""FuseReorderNormPass: RPTQ's Gather(perm) -> norm pairs become lowbit.ReorderNorm, same outputs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import lowbit
from lowbit import runtime_ext as rx
from lowbit.emit.reorder_norm import FuseReorderNormPass
from lowbit.models.synthetic import tiny_decoder

RTOL = 1e-5  # float32 rounding inside the norm; a wrong permutation or gamma moves outputs > 1e-1


@pytest.fixture(scope="module")
def native_lib():
    from lowbit.runtime_ext import build

    return build.build()


def _norm_model(kind: str, channels: int = 48, perm_uses: int = 1) -> ir.Model:
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, channels]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="g")

    def const(name, array):
        v = ir.Value(name=name, const_value=ir.tensor(array, name=name), type=ir.TensorType(ir.tensor(array).dtype),
                     shape=ir.Shape(array.shape))
        graph.register_initializer(v)
        return v

    perm = const("perm", rng.permutation(channels).astype(np.int64))
    gamma = const("gamma", rng.uniform(0.5, 2, channels).astype(np.float32))
    gather = ir.node("Gather", [x, perm], {"axis": -1}, name="reorder")
    graph.append(gather)
    if kind == "rms":
        norm = ir.node("RMSNormalization", [gather.outputs[0], gamma], {"axis": -1, "epsilon": 1e-6}, name="norm")
    else:
        beta = const("beta", rng.normal(size=channels).astype(np.float32))
        norm = ir.node("LayerNormalization", [gather.outputs[0], gamma, beta], {"axis": -1, "epsilon": 1e-5}, name="norm")
    graph.append(norm)
    norm.outputs[0].name, norm.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(norm.outputs[0])
    if perm_uses > 1:  # the reordered tensor is also a graph output: no fusion
        gather.outputs[0].name, gather.outputs[0].type = "reordered", ir.TensorType(ir.DataType.FLOAT)
        graph.outputs.append(gather.outputs[0])
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray, native: bool) -> np.ndarray:
    opts = rx.session_options() if native else ort.SessionOptions()
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def _rel(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_gather_norm_pair_fuses_and_keeps_outputs(native_lib, kind):
    x = np.random.default_rng(1).normal(size=(2, 5, 48)).astype(np.float32) * 3
    model = _norm_model(kind)
    want = _run(model, x, native=False)
    result = FuseReorderNormPass()(model)
    assert result.modified
    ops = Counter((n.domain, n.op_type) for n in model.graph)
    assert ops == Counter({("lowbit", "ReorderNorm"): 1})
    node = next(iter(model.graph))
    assert node.attributes.get_string("kind") == kind and len(node.inputs) == (3 if kind == "rms" else 4)
    assert _rel(_run(model, x, native=True), want) < RTOL  # native kernel
    assert _rel(_run(model, x, native=False), want) < RTOL  # ONNX function fallback


def test_reordered_tensor_with_other_readers_is_kept():
    model = _norm_model("rms", perm_uses=2)
    assert not FuseReorderNormPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Gather", "RMSNormalization"]


def test_ort_cpu_rptq_pipeline_emits_reorder_norm(native_lib, token_windows, monkeypatch):
    """ort-cpu + int8 activations + RPTQ clusters on a tiny decoder: every reorder Gather before a
    norm is fused, and the model equals the same compile without the fusion."""
    overrides = ["weights.format=dint4", "weights.block_size=16", "activations.format=int8",
                 "activations.symmetric=true", "reorder.clusters=4", "ort_cpu.merge_siblings=false"]
    fused = lowbit.compile(tiny_decoder(), "w8", target="ort-cpu", calibration=token_windows, overrides=overrides)
    ops = Counter(n.op_type for n in fused.model.graph)
    assert ops["ReorderNorm"] >= 4 and ops["MatMulLowbit"] == 15 and ops["Gather"] == 1  # the embedding
    monkeypatch.setattr(FuseReorderNormPass, "call", lambda self, m: ir.passes.PassResult(m, modified=False))
    unfused = lowbit.compile(tiny_decoder(), "w8", target="ort-cpu", calibration=token_windows, overrides=overrides)
    gathers = [n for n in unfused.model.graph if n.op_type == "Gather" and n.name.endswith(".reorder")]
    assert len(gathers) == ops["ReorderNorm"]
    ids = (np.arange(12, dtype=np.int64) * 5 % 64)[None]
    outs = []
    for model, opts in ((unfused.model, rx.session_options()), (fused.model, rx.session_options()),
                        (fused.model, ort.SessionOptions())):  # native, then the fallbacks
        sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"input_ids": ids})[0])
    assert _rel(outs[1], outs[0]) < RTOL
    assert _rel(outs[2], outs[0]) < 1e-3  # fallback: also int8 rounding of the activations
