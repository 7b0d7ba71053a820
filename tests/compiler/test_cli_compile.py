"""`lowbit compile` / `recipes` / `report` end to end on a tiny model, and every user-error path:
one line on stderr, exit code 2, no traceback, nothing left behind."""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from lowbit.models.synthetic import tiny_decoder


def lowbit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    ir.save(tiny_decoder(norm="rms", norm_form="decomposed"), path)
    return path


def test_compile_weight_only_writes_model_and_reports(tiny_onnx, tmp_path):
    out = tmp_path / "out.onnx"
    proc = lowbit("compile", str(tiny_onnx), "-o", str(out), "--recipe", "w8", "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "15/15 linear sites quantized" in proc.stdout
    onnx.checker.check_model(str(out), full_check=True)
    report = json.loads((tmp_path / "out.report.json").read_text())
    fused = [p for p in report["passes"] if p["pass"] == "FuseNormsPass"][0]
    assert fused["modified"] and fused["verified_rel_diff"] < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["lowbit.recipe"] == "w8" and meta["lowbit.weight_formats"] == "int8"
    shown = lowbit("report", str(out))
    assert shown.returncode == 0 and "## Passes" in shown.stdout


def test_recipes_lists_names_and_keys():
    proc = lowbit("recipes")
    assert proc.returncode == 0
    assert "w4a8-dint4" in proc.stdout and "weights.block_size" in proc.stdout


def _assert_user_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_input(tmp_path):
    _assert_user_error(lowbit("compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")), "no such file")
    assert not list(tmp_path.iterdir())


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not protobuf")
    _assert_user_error(lowbit("compile", str(bad), "-o", str(tmp_path / "o.onnx")), "not an ONNX model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_unknown_recipe_and_key(tiny_onnx, tmp_path):
    _assert_user_error(lowbit("compile", str(tiny_onnx), "-o", str(tmp_path / "o.onnx"), "-r", "w9a9"), "unknown recipe 'w9a9'")
    _assert_user_error(lowbit("compile", str(tiny_onnx), "-o", str(tmp_path / "o.onnx"), "--set", "weights.formt=int4"),
                       "unknown recipe key 'weights.formt'")  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_unwritable_output(tiny_onnx, tmp_path):
    _assert_user_error(lowbit("compile", str(tiny_onnx), "-o", str(tmp_path / "missing_dir" / "o.onnx")), "does not exist")


def test_activation_recipe_without_calibration_data(tiny_onnx, tmp_path):
    _assert_user_error(lowbit("compile", str(tiny_onnx), "-o", str(tmp_path / "o.onnx"), "-r", "w8a8"), "needs calibration data")
    assert not list(tmp_path.iterdir())


def test_nan_weights_are_rejected(tmp_path):
    model = tiny_decoder(norm="rms", norm_form="fused")
    w = model.graph.initializers["layers.0.mlp.up_proj.weight"]
    arr = w.const_value.numpy().copy()
    arr[0, :3] = float("nan")
    w.const_value = ir.tensor(arr, name=w.name)
    path = tmp_path / "nan.onnx"
    ir.save(model, path)
    _assert_user_error(lowbit("compile", str(path), "-o", str(tmp_path / "o.onnx"), "-r", "w8"),
                       "weight layers.0.mlp.up_proj has 3 NaN/Inf values")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.onnx"]


def test_dump_dir_saves_the_model_after_every_pass(tiny_onnx, tmp_path):
    dumps = tmp_path / "dumps"
    proc = lowbit("compile", str(tiny_onnx), "-o", str(tmp_path / "o.onnx"), "-r", "w8", "--dump-dir", str(dumps))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "o.report.json").read_text())
    names = sorted(p.name for p in dumps.glob("*.onnx"))
    assert len(names) == len(report["passes"]) and names[0].startswith("00_")
    fused = [n for n in names if "FuseNormsPass" in n][0]
    ops = {n.op_type for n in onnx.load(str(dumps / fused)).graph.node}
    assert "RMSNormalization" in ops and "Pow" not in ops
