"""`lowbit generate`: streams a continuation through optimum's ORTModelForCausalLM with the lowbit
op library registered; bad input is one line and exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.models.generate import SamplingOptions, generate


def lowbit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit", "generate", *args], capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("lowbit generate: error:") and fragment in lines[0], lines[0]


def test_bad_input_is_one_line(tmp_path):
    assert_user_error(lowbit(str(tmp_path / "missing"), "hi"), "no such model file or directory")
    assert_user_error(lowbit(str(tmp_path), "hi"), "expected one .onnx file")
    (tmp_path / "model.onnx").write_bytes(b"garbage")
    assert_user_error(lowbit(str(tmp_path), "hi"), "no config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_user_error(lowbit(str(tmp_path), "hi"), "not a readable ONNX model")
    assert_user_error(lowbit(str(tmp_path), "hi", "-n", "0"), "--max-new-tokens 0")
    assert_user_error(lowbit(str(tmp_path), "hi", "--sample", "--temperature", "0"), "--temperature 0")
    assert_user_error(lowbit(str(tmp_path), "hi", "--threads", "-1"), "--threads -1")


@pytest.mark.slow
def test_an_encoder_is_refused(minilm_export):
    assert_user_error(lowbit(str(minilm_export), "hi"), "not a causal LM")


@pytest.mark.slow
def test_greedy_stream_equals_optimum_generate_and_reports_speed(smollm2_with_past_export):
    from lowbit.bench import greedy_bench

    pieces: list[str] = []
    result = generate(smollm2_with_past_export, greedy_bench.PROMPTS[1], SamplingOptions(max_new_tokens=12),
                      threads=1, on_text=pieces.append)  # fmt: skip
    reference = greedy_bench.continuations(smollm2_with_past_export, prompts=(greedy_bench.PROMPTS[1],), new_tokens=12)[0]
    from lowbit.models.registry import load_tokenizer

    assert result.kv_cache and result.threads == 1
    assert result.text == load_tokenizer(smollm2_with_past_export).decode(reference, skip_special_tokens=True)
    assert "".join(pieces).strip() == result.text.strip()  # streamed piece by piece, nothing lost
    assert result.new_tokens == 12 and result.prefill_s > 0 and result.decode_tokens_per_s > 0
    assert "decode" in result.summary() and "tokens/s" in result.summary()


@pytest.mark.slow
def test_cli_streams_sampled_text_from_a_model_without_kv_cache(smollm2_export, tmp_path):
    model = tmp_path / "smollm2"
    shutil.copytree(smollm2_export, model)
    first = lowbit(str(model / "model.onnx"), "Once upon a time", "-n", "8", "--sample", "--seed", "3", "--threads", "1")
    again = lowbit(str(model), "Once upon a time", "-n", "8", "--sample", "--seed", "3", "--threads", "1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Once upon a time") and len(first.stdout) > len("Once upon a time") + 4
    assert first.stdout == again.stdout  # seeded
    summary = first.stderr.strip().splitlines()[-1]
    assert summary.startswith("8 new tokens") and "no KV cache" in summary
    assert Path(model / "model.onnx").is_file()
