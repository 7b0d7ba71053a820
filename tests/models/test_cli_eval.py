"""`lowbit eval` end to end on a tiny LM with a real tokenizer: printed table and JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.compiler.cli import main
from lowbit.models.registry import SHIPPED, _package_dir

VOCAB = 30522  # MiniLM's vocabulary: its tokenizer files give us real token ids


@pytest.fixture
def uniform_lm_dir(tmp_path: Path) -> Path:
    """logits = 0 (ppl = VOCAB exactly), plus MiniLM's tokenizer files."""
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["bt"]),
        helper.make_node("Concat", ["bt", "v"], ["shape"], axis=0),
        helper.make_node("ConstantOfShape", ["shape"], ["logits"],
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
    ]
    graph = helper.make_graph(
        nodes, "uniform", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])],
        [numpy_helper.from_array(np.array([VOCAB], np.int64), "v")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    d = tmp_path / "uniform"
    d.mkdir()
    onnx.save(model, d / "model.onnx")
    src = _package_dir(SHIPPED["minilm-l6"].package) / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, d / name)
    return d


def test_eval_prints_and_writes_json(uniform_lm_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["eval", str(uniform_lm_dir), "--baseline", str(uniform_lm_dir), "--seq-len", "32",
                 "--windows", "3", "--repeats", "2", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "3 windows x 32 tokens" in printed and "93 scored tokens" in printed
    assert f"ppl {VOCAB:.3f}" in printed and "ppl ratio to baseline: 1.0000" in printed
    result = json.loads(out.read_text())
    model = result["model"]
    assert result["baseline"]["path"] == str(uniform_lm_dir) and result["ppl_ratio"] == 1.0
    assert model["perplexity"]["ppl"] == pytest.approx(VOCAB, rel=1e-9)
    assert model["perplexity"]["tokens"] == 3 * 31
    assert model["linear_sites"] == 0 and model["bits_per_weight"] is None
    assert model["latency"]["decode_ms"] is None
    assert model["size_bytes"] == (uniform_lm_dir / "model.onnx").stat().st_size
    # both domains, each with agreement to the baseline (the same model: KL 0, top-1 100 %)
    assert [t["name"] for t in result["texts"]] == ["pydoc", "news"]
    for name in ("pydoc", "news"):
        entry = model["by_text"][name]
        assert entry["perplexity"]["ppl"] == pytest.approx(VOCAB, rel=1e-9)
        assert entry["agreement"]["kl"] == pytest.approx(0, abs=1e-12) and entry["agreement"]["top1"] == 1.0
        assert f"{name}: ppl ratio 1.0000, KL to baseline 0.00000 nats/token, top-1 agreement 100.00 %" in printed
    assert model["perplexity"] == model["by_text"]["pydoc"]["perplexity"]  # the headline text


def test_evaluate_saved_is_the_api_of_eval(uniform_lm_dir):
    from lowbit.errors import LowbitError
    from lowbit.models.cli_eval import evaluate_saved

    result = evaluate_saved(uniform_lm_dir, seq_len=16, windows=2, latency=False, domains=("news",))
    assert result["model"]["perplexity"]["tokens"] == 30 and "latency" not in result["model"]
    assert list(result["model"]["by_text"]) == ["news"] and "agreement" not in result["model"]["by_text"]["news"]
    assert result["baseline"] is None and result["ppl_ratio"] is None
    with pytest.raises(LowbitError, match="--windows"):
        evaluate_saved(uniform_lm_dir, windows=0)
    with pytest.raises(LowbitError, match="unknown or no evaluation domains"):
        evaluate_saved(uniform_lm_dir, domains=("poetry",))
    with pytest.raises(TypeError):
        evaluate_saved(uniform_lm_dir, window=2)  # a typo is an error, never ignored


def test_eval_in_openvino(uniform_lm_dir, capsys):
    code = main(["eval", str(uniform_lm_dir), "--runtime", "openvino", "--seq-len", "16", "--windows", "2",
                 "--repeats", "1"])  # fmt: skip
    assert code == 0
    assert f"ppl {VOCAB:.3f}" in capsys.readouterr().out  # OpenVINO ran the same graph
