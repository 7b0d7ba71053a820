"""Bench contenders and runner on a tiny LM (fast); the real bench is `lowbit-bench run`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.bench import contenders as C
from lowbit.bench import peers, runner
from lowbit.errors import LowbitError
from lowbit.models import evaluate, footprint

VOCAB, HIDDEN = 16, 64


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory) -> Path:
    """input_ids -> Gather(emb) -> MatMul(w1) -> Relu -> MatMul(w2) -> logits, as an export dir."""
    rng = np.random.default_rng(0)
    # 1/sqrt(fan-in) scaling keeps logits O(1), so perplexities are moderate numbers
    inits = [numpy_helper.from_array((rng.normal(size=s) * g).astype(np.float32), n)
             for n, s, g in (("emb", (VOCAB, HIDDEN), 1.0), ("w1", (HIDDEN, HIDDEN), HIDDEN**-0.5),
                             ("w2", (HIDDEN, VOCAB), HIDDEN**-0.5))]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h0"]),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w2"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    d = tmp_path_factory.mktemp("fp32")
    onnx.save(model, d / "model.onnx")
    return d


def _ctx(tmp_path: Path, name: str) -> C.BuildContext:
    windows = np.random.default_rng(1).integers(0, VOCAB, size=(4, 32))
    work = tmp_path / name
    work.mkdir()
    return C.BuildContext(feeds=tuple({"input_ids": w[None, :]} for w in windows), windows=windows,
                          work_dir=work, description="4 random windows")


def test_registry_has_the_peers_in_order():
    assert list(C.CONTENDERS)[:3] == ["fp32", "ort-w8a8", "ort-w4-rtn"]
    assert [c.name for c in C.contenders_for("encoder", None)][:2] == ["fp32", "ort-w8a8"]
    assert "ort-w4-rtn" not in [c.name for c in C.contenders_for("encoder", None)]


def test_registry_rejects_bad_entries():
    with pytest.raises(LowbitError, match="already registered"):
        C.register(C.CONTENDERS["fp32"])
    with pytest.raises(LowbitError, match="unknown contender"):
        C.contenders_for("causal-lm", ["fp32", "nope"])
    with pytest.raises(LowbitError, match="without spaces"):
        C.Contender("a b", "", "", lambda d, c: (d, 0.0))
    with pytest.raises(LowbitError, match="unknown model kinds"):
        C.Contender("x", "", "", lambda d, c: (d, 0.0), frozenset({"vision"}))


def test_ort_w8a8_builds_a_qdq_model(tiny_fp32, tmp_path):
    ctx = _ctx(tmp_path, "w8a8")
    path, seconds = C.CONTENDERS["ort-w8a8"].build(tiny_fp32, ctx)
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") >= 4 and ops.count("QuantizeLinear") >= 2
    assert model.ir_version <= 11 and seconds > 0
    bits = footprint.linear_weight_bits(path)
    # per output channel: int8 codes + fp32 scale + int8 zero point, over K=64 (w1) and 64 (w2)
    assert bits.sites == 2 and bits.bits_per_weight == pytest.approx(8 + 40 / HIDDEN)
    fp32 = evaluate.perplexity(tiny_fp32, ctx.windows, progress=False).ppl
    q = evaluate.perplexity(path, ctx.windows, progress=False).ppl
    assert abs(q / fp32 - 1) < 0.05  # 8-bit on a 2-layer toy: small but non-zero error
    assert q != fp32


def test_ort_w4_rtn_builds_matmulnbits(tiny_fp32, tmp_path):
    ctx = _ctx(tmp_path, "w4")
    path, _ = C.CONTENDERS["ort-w4-rtn"].build(tiny_fp32, ctx)
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 2
    # symmetric block-32: 4-bit codes + one fp32 scale per 32 weights = 5 bits, no zero points
    assert footprint.linear_weight_bits(path).bits_per_weight == pytest.approx(5.0)
    assert np.isfinite(evaluate.perplexity(path, ctx.windows, progress=False).ppl)


def test_runner_report_has_header_and_added_sections(monkeypatch):
    import sys
    import types

    module = types.ModuleType("lowbit_test_extra_section")
    module.run = lambda: "## extra\n\nhello"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(runner.SECTIONS, "extra", f"{module.__name__}:run")
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name: object())
    text = runner.run_bench(runner.BenchConfig(), "lowbit bench --sections extra", ["extra"])
    lines = text.splitlines()
    assert lines[0] == "# lowbit bench results"
    assert "Command: `lowbit bench --sections extra`" in lines
    machine = next(l for l in lines if l.startswith("Machine: "))
    assert "cores" in machine and "onnxruntime 1.31.1" in machine
    assert text.rstrip().endswith("## extra\n\nhello")
    with pytest.raises(LowbitError, match="unknown bench section"):
        runner.run_bench(runner.BenchConfig(), "x", ["nope"])


def test_bench_config_validation():
    with pytest.raises(LowbitError):
        runner.BenchConfig(eval_windows=0)


def test_npu_contender_builds_in_both_targets_and_runs_in_openvino(tiny_fp32, tmp_path):
    npu, qdq = C.CONTENDERS["lowbit-npu-w8a8"], C.CONTENDERS["lowbit-npu-w8a8-qdq"]
    assert npu.openvino and qdq.openvino and "--target qdq" in qdq.description
    ctx = _ctx(tmp_path, "npu")
    path, _ = npu.build(tiny_fp32, ctx)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["lowbit.target"] == "npu"
    in_ort = evaluate.perplexity(path, ctx.windows, progress=False).ppl
    assert evaluate.perplexity(path, ctx.windows, progress=False, runtime="openvino").ppl == pytest.approx(in_ort, rel=1e-3)
    # the same recipe for the qdq target has per-channel activation QDQ, which OpenVINO rejects
    qdq_path, _ = qdq.build(tiny_fp32, _ctx(tmp_path, "qdq"))
    assert runner._in_openvino(lambda: evaluate.perplexity(qdq_path, ctx.windows, runtime="openvino")) == "OpenVINO error"


def test_calibration_cells_say_how_many_windows_each_contender_took(tmp_path):
    import dataclasses

    ctx = dataclasses.replace(_ctx(tmp_path, "cells"), peer_windows=1)
    assert C.CONTENDERS["ort-w8a8"].calibration(ctx) == "1 window"
    assert peers._peer_feeds(ctx) == ctx.feeds[:1]
    assert C.CONTENDERS["fp32"].calibration is None
    rptq = C.CONTENDERS["lowbit-w8a8-rptq"].calibration(ctx)  # the recipe asks for 32: takes what exists
    assert rptq == f"{min(32, len(ctx.windows))} windows"


def test_contender_descriptions_state_the_recipes_cluster_count():
    """The weight-grid column is hand-written: it must not drift from the recipe it describes."""
    import re

    from lowbit.bench.lowbit_contenders import NPU_RECIPES, RECIPES
    from lowbit.core.recipe import load_recipe

    stated = {recipe: int(m.group(1)) for recipe, description, _ in RECIPES + NPU_RECIPES
              if (m := re.search(r"RPTQ (\d+) clusters", description))}  # fmt: skip
    assert {"w8a8-rptq", "w4a8-dint4", "npu-w8a8"} <= set(stated)
    assert {r: load_recipe(r).reorder.clusters for r in stated} == stated


def test_recipe_sweep_rejects_an_unknown_recipe_key_in_one_line(capsys):
    from lowbit.bench import recipe_sweep

    assert recipe_sweep.main(["w4a8-dint4", "--set", "rounding.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recipe_sweep: error:") and "no_such_key" in err and "\n" not in err
