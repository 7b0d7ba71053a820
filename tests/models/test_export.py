"""Real exports: ORT reproduces the torch model; optimum loads the export directories.

Tolerances. The ORT graph computes the same FP32 math as torch in a different order (fused
RMSNormalization/Attention kernels, other matmul blocking), so logits differ by float32
rounding accumulated over 30 layers. SmolLM2's logits span about -25..40; float32 has a relative
epsilon of 1.2e-7, i.e. ~5e-6 at |40|, and 30 layers of reordered sums amplify that by one to
two orders of magnitude. Measured: max abs diff 7.4e-05 over 2 x 256 x 49152 logits. We allow
1e-3 absolute (13x the measurement, still far below a change of the predicted token: the argmax
is also asserted to agree almost everywhere) and 0.5% on perplexity (the issue's bound; measured
15.7219 vs 15.7219 on 8 windows).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from lowbit.models import evaluate
from lowbit.models.export import ORT_MAX_IR_VERSION, export_model
from lowbit.models.registry import load_torch_model, resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def torch_smollm2():
    return load_torch_model(resolve_model("smollm2-135m"))


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def test_smollm2_export_layout(smollm2_export):
    meta = json.loads((smollm2_export / "lowbit_export.json").read_text())
    assert meta["opset"] == 23 and meta["kind"] == "causal-lm" and not meta["with_past"]
    model = onnx.load(str(smollm2_export / "model.onnx"), load_external_data=False)
    assert model.ir_version <= ORT_MAX_IR_VERSION
    assert [i.name for i in model.graph.input] == ["input_ids"]
    assert [o.name for o in model.graph.output] == ["logits"]
    ops = {n.op_type for n in model.graph.node}
    assert {"RMSNormalization", "Attention", "RotaryEmbedding", "MatMul"} <= ops
    assert (smollm2_export / "model.onnx.data").is_file()  # 538 MB of weights: external
    assert (smollm2_export / "tokenizer.json").is_file() and (smollm2_export / "config.json").is_file()
    assert not (smollm2_export / "tokenizer.model").exists()  # no 98 MB GGUF copy
    # cached: a second call returns the same directory without exporting again
    assert export_model("smollm2-135m") == smollm2_export


def test_smollm2_logits_match_torch(smollm2_export, torch_smollm2, eval_windows):
    ids = eval_windows[:2, :256]  # batch 2: the dynamic batch axis is exercised too
    session = evaluate.open_session(smollm2_export)
    ort_logits = session.run(["logits"], {"input_ids": ids})[0]
    ref = _torch_logits(torch_smollm2, ids)
    diff = float(np.abs(ort_logits - ref).max())
    print(f"max abs logit diff ORT vs torch: {diff:.2e} (logit range {ref.min():.1f}..{ref.max():.1f})")
    assert ort_logits.shape == ref.shape == (2, 256, 49152)
    assert diff < 1e-3
    assert (ort_logits.argmax(-1) == ref.argmax(-1)).mean() > 0.999


def test_smollm2_perplexity_matches_torch(smollm2_export, torch_smollm2, eval_windows):
    windows = eval_windows[:4]  # 4 x 512 keeps the torch reference under a minute on 2 cores
    ort = evaluate.perplexity(smollm2_export, windows, progress=False)
    nll = 0.0
    for row in windows:
        logits = _torch_logits(torch_smollm2, row[None, :])[0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(row) - 1), row[1:]].sum()
    torch_ppl = float(np.exp(nll / ort.tokens))
    print(f"ppl ORT {ort.ppl:.4f} vs torch {torch_ppl:.4f} on {ort.windows} windows, {ort.tokens} tokens")
    assert ort.tokens == 4 * 511
    assert abs(ort.ppl / torch_ppl - 1) < 0.005
    assert 10 < ort.ppl < 25  # an instruct 135M model on Python docs: 15.72 on 8 windows


def test_dynamo_export_loads_in_optimum(smollm2_export, eval_windows):
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(smollm2_export, use_cache=False)
    import torch

    out = model(input_ids=torch.from_numpy(eval_windows[:1, :32]))
    assert tuple(out.logits.shape) == (1, 32, 49152)


def test_with_past_export_generates_text(smollm2_with_past_export, smollm2_tokenizer):
    from optimum.onnxruntime import ORTModelForCausalLM

    model = onnx.load(str(smollm2_with_past_export / "model.onnx"), load_external_data=False)
    assert model.ir_version <= ORT_MAX_IR_VERSION
    assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in model.opset_import)
    assert "past_key_values.0.key" in {i.name for i in model.graph.input}
    ort_model = ORTModelForCausalLM.from_pretrained(smollm2_with_past_export)
    prompt = smollm2_tokenizer("The capital of France is", return_tensors="pt")
    out = ort_model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = smollm2_tokenizer.decode(out[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"generated: {text!r}")
    assert out.shape[1] == prompt["input_ids"].shape[1] + 12
    assert "Paris" in text


def test_with_past_perplexity_and_decode_latency(smollm2_with_past_export, smollm2_export, eval_windows):
    # Same weights, other exporter (opset 18, decomposed norms, empty KV cache fed): same ppl.
    a = evaluate.perplexity(smollm2_with_past_export, eval_windows[:2], progress=False)
    b = evaluate.perplexity(smollm2_export, eval_windows[:2], progress=False)
    assert abs(a.ppl / b.ppl - 1) < 1e-3
    lat = evaluate.latency(smollm2_with_past_export, repeats=3)
    assert lat.decode_ms is not None and 0 < lat.decode_ms < lat.prefill_ms


def test_minilm_export_matches_torch_and_loads_in_optimum(minilm_export):
    import torch
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    from lowbit.models.data import text_samples
    from lowbit.models.registry import load_tokenizer

    texts = text_samples("evaluation", 8)
    tok = load_tokenizer(minilm_export)
    ours = evaluate.pooled_embeddings(minilm_export, texts, tok, progress=False)
    ref_model = load_torch_model(resolve_model("minilm-l6"))
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = ref_model(**enc).last_hidden_state.double()
    mask = enc["attention_mask"].double()[..., None]
    ref = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    assert float(np.abs(ours - ref).max()) < 1e-4  # embeddings are O(0.1-1); float32 rounding
    ort_model = ORTModelForFeatureExtraction.from_pretrained(minilm_export)
    out = ort_model(**enc)
    assert tuple(out.last_hidden_state.shape) == tuple(hidden.shape)


def test_export_cli_copies_the_cached_export(minilm_export, tmp_path, capsys):
    from lowbit.compiler.cli import main

    out = tmp_path / "mini"
    assert main(["export", "minilm-l6", "-o", str(out)]) == 0
    assert "exported minilm-l6 (encoder, torch.onnx dynamo, opset 23)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in minilm_export.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["mini"]  # no temp sibling left


def test_eval_cli_on_kv_cache_export(smollm2_with_past_export, capsys):
    from lowbit.compiler.cli import main

    assert main(["eval", str(smollm2_with_past_export), "--seq-len", "128", "--windows", "1",
                 "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert "1 windows x 128 tokens" in printed and "127 scored tokens" in printed
    row = printed.strip().splitlines()[-1].split()
    assert row[2] == "32.00" and float(row[-1]) > 0  # fp32 linear weights; a decode latency
