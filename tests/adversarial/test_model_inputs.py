"""Broken, mismatched and untrusted model inputs through the real CLI (a subprocess, stdin closed):
each is one line on stderr, exit code 2, no traceback, no output left behind -- and nothing from a
model directory is ever executed.

Cases: external data past the end of its file or missing; cyclic and very deep graphs; unknown
tensor data types; a MatMul with one input; token ids past the embedding table or the logits;
corrupt tokenizer.json; malformed report.json; tokenizer/config ``auto_map`` code and pickle
weights in a model directory.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from .conftest import ALPHABET, assert_user_error, make_model_dir, run_lowbit, snapshot

# A compile that works on make_model_dir's directory, and an eval that is quick.
COMPILE = ["-r", "w8a8", "--set", "calibration.seq_len=64", "--set", "calibration.windows=2"]
EVAL = ["--seq-len", "16", "--windows", "2", "--no-latency"]


def _compile(model: Path, out: Path, *extra: str):
    return run_lowbit("compile", str(model), "-o", str(out), *COMPILE, "--calib-text", str(model / "calib.txt"), *extra)


def _eval(model: Path, *extra: str):
    return run_lowbit("eval", str(model), *EVAL, "--eval-text", str(model / "calib.txt"), *extra)


def _no_output(tmp_path: Path, before: set[str]) -> None:
    assert {p.name for p in tmp_path.iterdir()} == before


def _with_external_data(directory: Path) -> onnx.ModelProto:
    """Rewrite directory/model.onnx with its weights in model.onnx.data; the graph proto back."""
    model = onnx.load(str(directory / "model.onnx"))
    onnx.save(model, str(directory / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)  # fmt: skip
    return onnx.load(str(directory / "model.onnx"), load_external_data=False)


def _causal_lm(directory: Path, nodes: list, initializers: list, vocab_out: int = 64) -> Path:
    """make_model_dir's tokenizer and text around a hand-built graph: input_ids -> ... -> logits."""
    make_model_dir(directory)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab_out])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    return directory


def _table(rows: int, cols: int, name: str, seed: int = 0) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal((rows, cols)) / 4).astype(np.float32), name)


def _shifted_tokenizer(directory: Path, shift: int) -> int:
    """Replace the char tokenizer by one whose characters have ids shift+1.. (ids 1..shift are
    unused fillers): same text, larger ids. Returns the vocabulary size."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"<filler{i}>": i for i in range(1, shift + 1)},
             **{c: shift + 1 + i for i, c in enumerate(ALPHABET)}}  # fmt: skip
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.save(str(directory / "tokenizer.json"))
    return len(vocab)


# ---- 1, 2: external data ------------------------------------------------------------------------


def _overrun(directory: Path) -> int:
    """Point the first external initializer 16 bytes before the end of the data file."""
    model = _with_external_data(directory)
    size = (directory / "model.onnx.data").stat().st_size
    tensor = next(t for t in model.graph.initializer if t.external_data)
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(size - 16)
    onnx.save(model, str(directory / "model.onnx"))
    return size


def test_compile_external_data_past_end_of_file(tmp_path):
    size = _overrun(make_model_dir(tmp_path / "m"))
    before = {p.name for p in tmp_path.iterdir()}
    line = assert_user_error(_compile(tmp_path / "m", tmp_path / "out"), "run past the end of model.onnx.data")
    assert f"({size} bytes)" in line and "'embed_tokens.weight'" in line
    _no_output(tmp_path, before)


def test_eval_external_data_past_end_of_file(tmp_path):
    size = _overrun(make_model_dir(tmp_path / "m"))
    line = assert_user_error(_eval(tmp_path / "m"), "run past the end of model.onnx.data")
    assert f"({size} bytes)" in line and "'embed_tokens.weight'" in line


def test_eval_external_data_file_missing(tmp_path):
    directory = make_model_dir(tmp_path / "m")
    _with_external_data(directory)
    (directory / "model.onnx.data").unlink()
    assert_user_error(_eval(directory), "its external data file 'model.onnx.data' is missing")


# ---- 3: cycles and deep chains ------------------------------------------------------------------


def test_eval_graph_with_a_cycle(tmp_path):
    # w1 = Identity(w2), w2 = Identity(w1): a weight path footprint followed forever (RecursionError)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("Identity", ["w2"], ["w1"], name="loop_a"),
             helper.make_node("Identity", ["w1"], ["w2"], name="loop_b"),
             helper.make_node("MatMul", ["x", "w1"], ["logits"])]  # fmt: skip
    directory = _causal_lm(tmp_path / "m", nodes, [_table(64, 16, "emb")])
    assert_user_error(_eval(directory), "the graph has a cycle (node 'loop_")


def test_eval_very_deep_chain_works(tmp_path):
    # 20000 Identity nodes between a weight and its MatMul: footprint's tracer recursed per node
    n = 20000
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"])]
    nodes += [helper.make_node("Identity", [f"w{i}"], [f"w{i + 1}"]) for i in range(n)]
    nodes.append(helper.make_node("MatMul", ["x", f"w{n}"], ["logits"]))
    directory = _causal_lm(tmp_path / "m", nodes, [_table(64, 16, "emb"), _table(16, 64, "w0", seed=1)])
    proc = _eval(directory)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if "ppl " in line)
    assert " 32.00 " in row  # bits/weight of the one linear site, found through the 20000 Identity nodes


# ---- 4: data types ------------------------------------------------------------------------------


def _bad_dtype(directory: Path) -> str:
    model = onnx.load(str(make_model_dir(directory) / "model.onnx"))
    tensor = next(t for t in model.graph.initializer if t.name.endswith("layernorm.weight"))
    tensor.data_type = 99
    onnx.save(model, str(directory / "model.onnx"))
    return tensor.name


def test_compile_unknown_data_type(tmp_path):
    name = _bad_dtype(tmp_path / "m")
    before = {p.name for p in tmp_path.iterdir()}
    assert_user_error(_compile(tmp_path / "m", tmp_path / "out"),
                      f"initializer '{name}' has data_type 99, which is not an ONNX tensor type")
    _no_output(tmp_path, before)


def test_eval_unknown_data_type(tmp_path):
    name = _bad_dtype(tmp_path / "m")
    assert_user_error(_eval(tmp_path / "m"), f"initializer '{name}' has data_type 99, which is not an ONNX tensor type")


def test_eval_unknown_value_type(tmp_path):
    directory = make_model_dir(tmp_path / "m")
    model = onnx.load(str(directory / "model.onnx"))
    model.graph.output[0].type.tensor_type.elem_type = 77
    onnx.save(model, str(directory / "model.onnx"))
    assert_user_error(_eval(directory), "graph output 'logits' has data_type 77")


# ---- 5: MatMul with one input -------------------------------------------------------------------


def _one_input_matmul(directory: Path) -> Path:
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("MatMul", ["x"], ["logits"], name="lm_head")]  # fmt: skip
    return _causal_lm(directory, nodes, [_table(64, 16, "emb")])


def test_compile_matmul_with_one_input(tmp_path):
    _one_input_matmul(tmp_path / "m")
    before = {p.name for p in tmp_path.iterdir()}
    assert_user_error(_compile(tmp_path / "m", tmp_path / "out"), "MatMul:13) has input size 1 not in range")
    _no_output(tmp_path, before)


def test_eval_matmul_with_one_input(tmp_path):
    _one_input_matmul(tmp_path / "m")
    assert_user_error(_eval(tmp_path / "m"), "MatMul node 'lm_head' has 1 input(s), needs at least 2")


# ---- 6: token ids past the model's vocabulary ---------------------------------------------------


def test_eval_tokenizer_larger_than_logits(tmp_path):
    # embedding of 128 rows (Gather is fine) but 64 logits: ids 41..103 index past the logits
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["logits"])]
    directory = _causal_lm(tmp_path / "m", nodes, [_table(128, 16, "emb"), _table(16, 64, "w", seed=1)])
    vocab = _shifted_tokenizer(directory, 40)
    line = assert_user_error(_eval(directory), "is past")
    assert f"vocabulary ({vocab} ids)" in line and "logits dimension (64 entries)" in line


def test_compile_calibration_ids_past_embedding(tmp_path):
    directory = make_model_dir(tmp_path / "m")  # tiny decoder: 64 embedding rows
    _shifted_tokenizer(directory, 40)
    before = {p.name for p in tmp_path.iterdir()}
    line = assert_user_error(_compile(directory, tmp_path / "out"),
                             "from the tokenizer's vocabulary (104 ids) is past the model's embedding table (64 entries)")
    assert "calibration data" in line and int(re.search(r"token id (\d+)", line).group(1)) >= 64
    _no_output(tmp_path, before)


# ---- 7: corrupt tokenizer.json ------------------------------------------------------------------

TOKENIZER_CASES = [
    pytest.param(b"\x00\xff\xfe\x80 not text", "tokenizer.json: not a tokenizer or config file (not UTF-8 text", id="garbage"),
    pytest.param(None, "tokenizer.json: not a tokenizer or config file (not valid JSON:", id="truncated"),
    pytest.param(b"[1, 2, 3]", "tokenizer.json: expected a JSON object, found a JSON list", id="list"),
    pytest.param(b'{"model": {"type": "WordLevel"}}', "tokenizer.json: not a tokenizer file (needs a 'model' object "
                 "and an 'added_tokens' list)", id="no-added-tokens"),  # fmt: skip
    pytest.param(b'{"model": 5, "added_tokens": []}', "tokenizer.json: not a tokenizer file", id="model-not-object"),
    pytest.param(b'{"model": {"type": "Nope"}, "added_tokens": []}', "tokenizer.json: not a valid tokenizer (",
                 id="unknown-model"),  # fmt: skip
]


def _corrupt_tokenizer(directory: Path, data: bytes | None) -> None:
    path = make_model_dir(directory) / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:150] if data is None else data)


@pytest.mark.parametrize("data, fragment", TOKENIZER_CASES)
def test_eval_corrupt_tokenizer(tmp_path, data, fragment):
    _corrupt_tokenizer(tmp_path / "m", data)
    assert_user_error(_eval(tmp_path / "m"), fragment)


@pytest.mark.parametrize("data, fragment", TOKENIZER_CASES[:3])
def test_compile_corrupt_tokenizer(tmp_path, data, fragment):
    _corrupt_tokenizer(tmp_path / "m", data)
    before = {p.name for p in tmp_path.iterdir()}
    assert_user_error(_compile(tmp_path / "m", tmp_path / "out"), fragment)
    _no_output(tmp_path, before)


# ---- 8: malformed report.json -------------------------------------------------------------------

_PASS = {"pass": "P", "seconds": 0.1, "modified": True, "nodes_before": 3, "nodes_after": 2}
REPORT_CASES = [
    pytest.param(b"\xff\xfe{", "not a compile report (not UTF-8 text", id="not-utf8"),
    pytest.param(b'{"recipe": {', "not a compile report (not valid JSON: Expecting", id="not-json"),
    pytest.param(b"[" * 100_000, "not a compile report (not JSON lowbit can read: RecursionError)", id="deep"),
    pytest.param(json.dumps(["recipe"]), "the top level must be an object (found a list)", id="list"),
    pytest.param(json.dumps({"recipe": {}, "passes": []}), "key 'sites' is missing", id="no-sites"),
    pytest.param(json.dumps({"recipe": "w8a8", "passes": [], "sites": {}}), "recipe must be an object", id="recipe"),
    pytest.param(json.dumps({"recipe": {}, "passes": [{**_PASS, "seconds": "slow"}], "sites": {}}),
                 "passes[0].seconds must be a number (found the string 'slow')", id="seconds"),  # fmt: skip
    pytest.param(json.dumps({"recipe": {}, "passes": [{"pass": "P"}], "sites": {}}), "passes[0].seconds is missing",
                 id="pass-keys"),  # fmt: skip
    pytest.param(json.dumps({"recipe": {}, "passes": [], "sites": {"s": {"quantized": True, "bits_per_weight": 4,
                                                                         "shape": [4, "x"]}}}),
                 "sites['s'].shape[1] must be a dimension", id="shape"),  # fmt: skip
    pytest.param(json.dumps({"recipe": {}, "passes": [], "sites": {"s": {"weights": ["int8"]}}}),
                 "sites['s'].weights must be a string, number or null (found a list)", id="site-weights"),  # fmt: skip
    pytest.param(json.dumps({"recipe": {}, "passes": [], "sites": {}, "evaluation": {
        "model": {"size_bytes": 10}, "baseline": {"size_bytes": 0}}}),
        "evaluation.baseline.size_bytes must be a positive number (found the number 0)", id="eval-size"),  # fmt: skip
    pytest.param(json.dumps({"recipe": {}, "passes": [], "sites": {}, "slac": [{"seq_len": 64}, {"seq_len": 128}]}),
                 "slac[0].tensors must be a number (found null)", id="slac"),  # fmt: skip
]


@pytest.mark.parametrize("content, fragment", REPORT_CASES)
def test_report_malformed_json(tmp_path, content, fragment):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_bytes(content.encode() if isinstance(content, str) else content)
    before = snapshot(tmp_path)
    assert_user_error(run_lowbit("report", str(out)), fragment)
    assert snapshot(tmp_path) == before  # no report.md / report.html written from it


# ---- 9: untrusted model directories -------------------------------------------------------------


def _marker_code(marker: Path, body: str = "") -> str:
    return f"open({str(marker)!r}, 'w').write('executed')\n{body}"


def test_eval_tokenizer_auto_map_code_never_runs(tmp_path):
    # tokenizer_config.json names a custom class in the directory's .py; the fast tokenizer that
    # tokenizer.json describes is used instead (transformers' trust_remote_code machinery and its
    # prompt are never reached: stdin is closed, a prompt would fail)
    marker = tmp_path / "MARKER"
    directory = make_model_dir(tmp_path / "m")
    (directory / "evil_tokenizer.py").write_text(_marker_code(
        marker, "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    proc = _eval(directory)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ppl " in proc.stdout and "custom code" not in proc.stderr
    assert not marker.exists()
    # without tokenizer.json only the custom code could tokenize: refused, still never imported
    (directory / "tokenizer.json").unlink()
    assert_user_error(_eval(directory), "lowbit never runs code from a model directory")
    assert not marker.exists()


def _hf_dir(directory: Path, marker: Path, config: dict) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, **config}))  # fmt: skip
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (directory / name).write_text(_marker_code(marker))
    return directory


class _OpenOnUnpickle:
    """A pickle that creates a file when loaded: what a .bin of an untrusted directory can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_export_refuses_pickle_weights(tmp_path):
    marker = tmp_path / "MARKER"
    directory = _hf_dir(tmp_path / "hf", marker, {})
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_OpenOnUnpickle(marker)))
    before = {p.name for p in tmp_path.iterdir()}
    proc = run_lowbit("export", str(directory), "-o", str(tmp_path / "out"), env={"LOWBIT_CACHE": str(tmp_path / "cache")})
    assert_user_error(proc, "weights only in pickle form (pytorch_model.bin)")
    assert not marker.exists()
    assert {p.name for p in tmp_path.iterdir()} - {"cache"} == before


def test_export_refuses_config_auto_map_code(tmp_path):
    marker = tmp_path / "MARKER"
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    directory = _hf_dir(tmp_path / "hf", marker, {"model_type": "evil", "auto_map": auto_map})
    header = b"{}"  # a valid, empty safetensors file: the weights are not what is refused
    (directory / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    before = {p.name for p in tmp_path.iterdir()}
    proc = run_lowbit("export", str(directory), "-o", str(tmp_path / "out"), env={"LOWBIT_CACHE": str(tmp_path / "cache")})
    assert_user_error(proc, "config.json: model type 'evil' needs the directory's own code (auto_map)")
    assert not marker.exists()
    assert {p.name for p in tmp_path.iterdir()} - {"cache"} == before


def test_export_ignores_config_auto_map_of_a_known_model_type(tmp_path):
    # model_type llama is transformers' own: its class is used, the directory's .py never imported,
    # and the exported config no longer points at code that was not run
    marker = tmp_path / "MARKER"
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    directory = _hf_dir(tmp_path / "hf", marker, {"auto_map": auto_map, "num_key_value_heads": 2})
    header = b"{}"  # no tensors: transformers initializes the tiny model's weights itself
    (directory / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    make_model_dir(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    proc = run_lowbit("export", str(directory), "-o", str(tmp_path / "out"), env={"LOWBIT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert not list((tmp_path / "out").glob("*.py"))


def test_export_refuses_corrupt_safetensors(tmp_path):
    directory = _hf_dir(tmp_path / "hf", tmp_path / "MARKER", {})
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    proc = run_lowbit("export", str(directory), "-o", str(tmp_path / "out"), env={"LOWBIT_CACHE": str(tmp_path / "cache")})
    assert_user_error(proc, "model.safetensors: not a safetensors file")
    assert not (tmp_path / "out").exists()


def test_bare_onnx_calibrates_with_the_tokenizer_beside_it(tmp_path):
    """README: `lowbit compile model.onnx -o small.onnx ... --calib-text my.txt` (it was refused)."""
    directory = make_model_dir(tmp_path / "m")
    (directory / "net.onnx").write_bytes((directory / "model.onnx").read_bytes())
    args = ["-r", "w8a8", "--calib-text", str(directory / "calib.txt"),
            "--set", "calibration.seq_len=64", "--set", "calibration.windows=2"]  # fmt: skip
    proc = run_lowbit("compile", str(directory / "net.onnx"), "-o", str(tmp_path / "small.onnx"), *args)
    assert proc.returncode == 0, proc.stderr
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "net.onnx").write_bytes((directory / "model.onnx").read_bytes())
    assert_user_error(run_lowbit("compile", str(alone / "net.onnx"), "-o", str(tmp_path / "x.onnx"), *args),
                      "--calib-text needs the model's tokenizer (tokenizer.json) next to")


def test_eval_of_a_model_onnx_runtime_cannot_run_is_one_line(tmp_path):
    """Valid ONNX that ONNX Runtime cannot run on CPU (a FLOAT4E2M1 Cast): one line naming why."""
    directory = make_model_dir(tmp_path / "m")
    ids = onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])
    logits = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", "s", 64])
    nodes = [onnx.helper.make_node("Cast", ["input_ids"], ["f4"], to=onnx.TensorProto.FLOAT4E2M1),
             onnx.helper.make_node("Cast", ["f4"], ["f"], to=onnx.TensorProto.FLOAT),
             onnx.helper.make_node("Unsqueeze", ["f", "axes"], ["f3"]),
             onnx.helper.make_node("Mul", ["f3", "row"], ["logits"])]  # fmt: skip
    inits = [onnx.numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             onnx.numpy_helper.from_array(np.ones(64, np.float32), "row")]  # fmt: skip
    graph = onnx.helper.make_graph(nodes, "g", [ids], [logits], inits)
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23)], ir_version=11),
              str(directory / "model.onnx"))
    assert_user_error(run_lowbit("eval", str(directory), "--no-latency", "--windows", "1", "--seq-len", "16"),
                      "ONNX Runtime cannot load it: [ONNXRuntimeError] : 9 : NOT_IMPLEMENTED")
