"""lowbit.models.synthetic_llm: the files are what they claim, ONNX Runtime computes what an
independent numpy forward of the same weights computes, and lowbit compiles the result."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lowbit.errors import LowbitError
from lowbit.models import synthetic_llm
from lowbit.models.synthetic_llm import ALIGNMENT, SHAPES, TOKENIZER_FILES, DecoderShape, write_decoder

TINY = SHAPES["tiny"]
# Qwen2 paths the tiny Llama does not take: q/k/v biases, an untied lm_head, one kv head for all
TINY_QWEN = dataclasses.replace(TINY, name="tiny-qwen2", family="qwen2", qkv_bias=True, tied=False, kv_heads=1,
                                eps=1e-6, rope_theta=1e6)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    return {
        "float32": write_decoder("tiny", root / "fp32", progress=False),
        "float16": write_decoder("tiny", root / "fp16", dtype="float16", progress=False),
        "qwen2": write_decoder(TINY_QWEN, root / "qwen2", progress=False),
    }


def _feeds() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(1).integers(0, 49152, (2, 11), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding: positions restart at the first real token, padded keys masked
    return {"input_ids": ids, "attention_mask": mask}


def _weights(directory: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(directory / "model.onnx"))  # reads model.onnx.data
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def reference_logits(directory: Path, s: DecoderShape, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers' Llama / Qwen2 forward (eager attention, no cache) in float64 numpy."""
    w = _weights(directory)
    hd, n_rep = s.hidden // s.heads, s.heads // s.kv_heads
    batch, seq = ids.shape

    def rms(x, name):
        return w[f"{name}.weight"] * (x / np.sqrt((x * x).mean(-1, keepdims=True) + s.eps))

    def proj(x, name, heads):
        y = x @ w[f"{name}.weight"] + (w[f"{name}.bias"] if s.qkv_bias else 0.0)
        return y.reshape(batch, seq, heads, hd).transpose(0, 2, 1, 3)

    pos = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
    freqs = pos[..., None] * (1.0 / s.rope_theta ** (np.arange(0, hd, 2) / hd))
    angle = np.concatenate([freqs, freqs], -1)[:, None]  # [batch, 1, seq, hd]

    def rope(x):
        return x * np.cos(angle) + np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1) * np.sin(angle)

    keep = (np.arange(seq)[None, :] <= np.arange(seq)[:, None])[None, None] & (mask[:, None, None, :] == 1)
    bias = np.where(keep, 0.0, np.finfo(np.float32).min)
    h = w["model.embed_tokens.weight"][ids]
    for i in range(s.layers):
        p = f"model.layers.{i}"
        x = rms(h, f"{p}.input_layernorm")
        q = rope(proj(x, f"{p}.self_attn.q_proj", s.heads))
        k = np.repeat(rope(proj(x, f"{p}.self_attn.k_proj", s.kv_heads)), n_rep, axis=1)
        v = np.repeat(proj(x, f"{p}.self_attn.v_proj", s.kv_heads), n_rep, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, s.hidden)
        h = h + ctx @ w[f"{p}.self_attn.o_proj.weight"]
        x = rms(h, f"{p}.post_attention_layernorm")
        gate, up = x @ w[f"{p}.mlp.gate_proj.weight"], x @ w[f"{p}.mlp.up_proj.weight"]
        h = h + (gate / (1.0 + np.exp(-gate)) * up) @ w[f"{p}.mlp.down_proj.weight"]
    h = rms(h, "model.norm")
    return h @ (w["model.embed_tokens.weight"].T if s.tied else w["lm_head.weight"])


@pytest.mark.parametrize("variant, shape", [("float32", TINY), ("float16", TINY), ("qwen2", TINY_QWEN)])
def test_onnxruntime_matches_numpy_reference(tiny_dirs, variant, shape):
    directory = tiny_dirs[variant]
    feeds = _feeds()
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, feeds)
    expected = reference_logits(directory, shape, feeds["input_ids"], feeds["attention_mask"])
    assert logits.shape == (2, 11, shape.vocab) and logits.dtype == np.float32
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("variant", ["float32", "float16", "qwen2"])
def test_files_weights_external_and_aligned(tiny_dirs, variant):
    directory = tiny_dirs[variant]
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["model.onnx", "model.onnx.data", "config.json", *TOKENIZER_FILES])
    onnx.checker.check_model(str(directory / "model.onnx"), full_check=True)
    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]
    data_size = (directory / "model.onnx.data").stat().st_size
    storage = onnx.TensorProto.FLOAT16 if variant == "float16" else onnx.TensorProto.FLOAT
    spans = []
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        assert t.data_location == onnx.TensorProto.EXTERNAL and info["location"] == "model.onnx.data", t.name
        assert t.data_type == storage, t.name
        offset, length = int(info["offset"]), int(info["length"])
        assert offset % ALIGNMENT == 0 and length == np.prod(t.dims) * (2 if variant == "float16" else 4)
        spans.append((offset, offset + length))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == data_size
    if variant == "float16":  # "float16 storage, float32 compute": each weight is read through one Cast
        consumers = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        for t in model.graph.initializer:
            (cast,) = consumers[t.name]
            assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT


def test_config_and_parameter_count(tiny_dirs):
    config = json.loads((tiny_dirs["qwen2"] / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (64, 2, 1)
    assert config["tie_word_embeddings"] is False
    weights = _weights(tiny_dirs["qwen2"])
    assert sum(a.size for a in weights.values()) == TINY_QWEN.parameters()
    # the shapes are the real models': their published parameter counts
    assert SHAPES["llama-3.2-1b"].parameters() == 1_235_814_400
    assert SHAPES["qwen2.5-1.5b"].parameters() == 1_543_714_304
    assert SHAPES["llama-3-8b"].parameters() == 8_030_261_248
    assert SHAPES["smollm2-135m"].parameters() == 134_515_008
    from lowbit.models.registry import resolve_model

    assert resolve_model(str(tiny_dirs["float32"])).kind == "causal-lm"


def test_deterministic_whatever_the_chunking_and_depth(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic_llm, "_CHUNK_ELEMENTS", 1000)  # many blocks per tensor
    again = write_decoder("tiny", tmp_path / "again", progress=False)
    for name in ("model.onnx", "model.onnx.data"):
        assert (again / name).read_bytes() == (tiny_dirs["float32"] / name).read_bytes()
    # layers=1 is the first layer of the 2-layer model, embedding and head included
    shallow, deep = _weights(write_decoder("tiny", tmp_path / "one", layers=1, progress=False)), _weights(again)
    assert "model.layers.1.mlp.up_proj.weight" not in shallow
    for name, value in shallow.items():
        np.testing.assert_array_equal(value, deep[name])


def test_never_replaces_existing_files(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(LowbitError, match="not an empty directory"):
        write_decoder("tiny", tmp_path / "taken", progress=False)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert (write_decoder("tiny", tmp_path / "empty", layers=1, progress=False) / "model.onnx").is_file()
    with pytest.raises(LowbitError, match="unknown shape 'llama-9b'"):
        write_decoder("llama-9b", tmp_path / "x")
    with pytest.raises(LowbitError, match="heads % kv_heads"):
        dataclasses.replace(TINY, kv_heads=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]  # no staging left behind


@pytest.mark.parametrize("variant, recipe", [("float32", "w4a8-dint4"), ("float16", "w8a8-rptq")])
def test_lowbit_compiles_it(tiny_dirs, tmp_path, variant, recipe):
    from lowbit.compiler.api import compile
    from lowbit.passes.rotate_residual import TIED_BRIDGE_REASON

    # calibration from the tokenizer beside the model (the pydoc split), kept small
    result = compile(tiny_dirs[variant], recipe, overrides=["calibration.windows=2", "calibration.seq_len=32",
                                                            "calibration.slac_windows=0"])  # fmt: skip
    sites = result.report["sites"]
    # w4a8-dint4 keeps its int8 LM head on the int8 table through R1, behind a float bridge
    bridged = recipe == "w4a8-dint4"
    bridge = [n for n in sites if n.endswith(".tied_head_bridge")]
    assert bridge == (["model.embed_tokens.weight.tied_head_bridge"] if bridged else [])
    assert all(sites.pop(n) == {"quantized": False, "reason": TIED_BRIDGE_REASON} for n in bridge)
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    expected = [f"model.layers.{i}.{p}" for i in range(TINY.layers) for p in per_layer] + ["lm_head"]
    assert sorted(sites) == sorted(expected)  # 7 per layer + the tied lm_head (MatMul of Transpose(embed))
    assert all(s["quantized"] for s in sites.values())
    # every decomposed RMSNorm fused: each norm-fed site (q/k/v, gate/up, lm_head) names a norm node
    norm_fed = [n for n in expected if not n.endswith(("o_proj", "down_proj")) and not (bridged and n == "lm_head")]
    assert all(sites[n]["feeder"].startswith("norm ") for n in norm_fed)
    assert len({sites[n]["feeder"] for n in norm_fed}) == 2 * TINY.layers + (not bridged)
    assert sites["model.layers.0.self_attn.o_proj"]["feeder"].startswith("attention_v")
    # w4a8-dint4 rotates down_proj's input online: the SwiGLU product reaches it through a Hadamard op
    down_feeder = "gated_linear" if recipe != "w4a8-dint4" else "other (Hadamard)"
    assert sites["model.layers.0.mlp.down_proj"]["feeder"].startswith(down_feeder)
    out = result.save(tmp_path / "compiled")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, _feeds())
    assert logits.shape == (2, 11, TINY.vocab) and np.isfinite(logits).all()


def _bench_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit.bench", "synth", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("args, fragment", [
    (["llama-9b", "out"], "unknown shape 'llama-9b' (known: tiny, smollm2-135m, llama-3.2-1b"),
    (["tiny", "taken"], "already exists and is not an empty directory"),
    (["tiny", "out", "--layers", "0"], "layers must be a positive integer"),
])  # fmt: skip
def test_cli_errors_are_one_line(tmp_path, args, fragment):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    proc = _bench_cli(*args, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("lowbit-bench synth: error: ") and fragment in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_writes_a_model(tmp_path):
    proc = _bench_cli("tiny", "m", "--dtype", "float16", "--layers", "1", "--seed", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["lowbit_synthetic"]["seed"] == 3
    assert config["torch_dtype"] == "float16"


@pytest.mark.parametrize("shape", [TINY, TINY_QWEN], ids=["llama", "qwen2"])
def test_with_past_computes_the_same_logits_prompt_then_cached(tmp_path, tiny_dirs, shape):
    """The KV-cache signature (optimum's with-past export): a left-padded prompt and then a cached
    three-token step give the no-cache model's logits on the whole sequence."""
    plain = tiny_dirs["float32" if shape is TINY else "qwen2"]
    cached = write_decoder(shape, tmp_path / "past", progress=False, with_past=True)
    assert json.loads((cached / "config.json").read_text())["use_cache"] is True
    whole = _feeds()
    expected = ort.InferenceSession(str(plain / "model.onnx")).run(None, whole)[0]
    session = ort.InferenceSession(str(cached / "model.onnx"))
    names = [i.name for i in session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3] == "past_key_values.0.key"
    assert [o.name for o in session.get_outputs()][:3] == ["logits", "present.0.key", "present.0.value"]
    ids, mask = whole["input_ids"], whole["attention_mask"]
    positions = np.where(mask == 1, np.cumsum(mask, 1) - 1, 1)
    past = {n: np.zeros((2, shape.kv_heads, 0, shape.head_dim), np.float32) for n in names[3:]}
    first = session.run(None, {"input_ids": ids[:, :8], "attention_mask": mask[:, :8], "position_ids": positions[:, :8], **past})
    real = mask[:, :8] == 1
    assert np.abs(first[0] - expected[:, :8])[real].max() < 1e-5
    caches = dict(zip(names[3:], first[1:]))
    second = session.run(None, {"input_ids": ids[:, 8:], "attention_mask": mask, "position_ids": positions[:, 8:], **caches})
    assert np.abs(second[0] - expected[:, 8:]).max() < 1e-5
