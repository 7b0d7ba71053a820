"""Resolving model arguments: shipped names, HF directories, ONNX files; light imports."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from lowbit.errors import LowbitError
from lowbit.models.registry import SHIPPED, resolve_model


def test_shipped_models_resolve_to_package_files():
    smol = resolve_model("smollm2-135m")
    assert smol.format == "gguf" and smol.kind == "causal-lm" and smol.path.is_file()
    assert smol.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "block-32 asymmetric 4-bit" in smol.weight_grid
    mini = resolve_model("minilm-l6")
    assert mini.format == "hf-dir" and mini.kind == "encoder"
    pooling = json.loads((mini.path / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True  # what evaluate.pooled_embeddings does
    assert set(SHIPPED) == {"smollm2-135m", "minilm-l6"}


def test_hf_directory_kind_from_architectures(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert resolve_model(str(tmp_path / "lm")).kind == "causal-lm"
    enc = resolve_model(str(tmp_path / "enc"))
    assert enc.kind == "encoder" and enc.format == "hf-dir"


def _onnx_with_output(path, name):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], [name])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path)


def test_onnx_files_and_export_dirs(tmp_path):
    _onnx_with_output(tmp_path / "a.onnx", "logits")
    (tmp_path / "d").mkdir()
    _onnx_with_output(tmp_path / "d" / "model.onnx", "last_hidden_state")
    (tmp_path / "d" / "config.json").write_text("{}")  # an export dir also has a config
    a, d = resolve_model(str(tmp_path / "a.onnx")), resolve_model(str(tmp_path / "d"))
    assert (a.format, a.kind) == ("onnx", "causal-lm")
    assert (d.format, d.kind, d.path.name) == ("onnx", "encoder", "model.onnx")
    _onnx_with_output(tmp_path / "b.onnx", "y")
    with pytest.raises(LowbitError, match="cannot tell the model kind"):
        resolve_model(str(tmp_path / "b.onnx"))


def test_unknown_names_are_lowbit_errors(tmp_path):
    with pytest.raises(LowbitError, match="unknown model 'smollm3'.*minilm-l6, smollm2-135m"):
        resolve_model("smollm3")
    with pytest.raises(LowbitError, match="no such ONNX model"):
        resolve_model(str(tmp_path / "missing.onnx"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    with pytest.raises(LowbitError, match="not readable JSON"):
        resolve_model(str(tmp_path / "hf"))


def test_importing_models_and_bench_does_not_import_torch():
    code = ("import sys, lowbit.models, lowbit.models.registry, lowbit.models.data, "
            "lowbit.models.evaluate, lowbit.models.footprint, lowbit.models.export, "
            "lowbit.models.cli_eval, lowbit.models.cli_export, lowbit.bench.runner, "
            "lowbit.bench.contenders, lowbit.bench.cli_bench; "
            "print(sorted(m for m in ('torch', 'transformers', 'optimum') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
