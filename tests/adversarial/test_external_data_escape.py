"""External data may only come from inside the model's directory: a tensor whose location climbs
out (``../``), is absolute, or is a symbolic link to a file elsewhere is refused with one line by
every command that reads weights, and nothing of the outside file reaches an output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from onnx import TensorProto, helper

from .conftest import assert_user_error, run_lowbit

SECRET = b"SECRET!!"  # 8 bytes: two float32 values


def _model(directory: Path, name: str, location: str) -> Path:
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        weight.external_data.add(key=key, value=value)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 2])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, 2])
    nodes = [helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["x", "axes"], ["x3"]),
             helper.make_node("Mul", ["x3", "w"], ["logits"])]  # fmt: skip
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
    graph = helper.make_graph(nodes, "g", [ids], [logits], [weight, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    path = directory / name
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def place(tmp_path: Path) -> Path:
    (tmp_path / "secret.bin").write_bytes(SECRET)
    m = tmp_path / "m"
    m.mkdir()
    _model(m, "up.onnx", "../secret.bin")
    _model(m, "abs.onnx", str(tmp_path / "secret.bin"))
    os.symlink(tmp_path / "secret.bin", m / "link.bin")
    _model(m, "link.onnx", "link.bin")
    return tmp_path


CASES = {  # command -> model -> the fragment of its one-line refusal
    "compile": {"up.onnx": "points outside the directory", "abs.onnx": "should be a relative path",
                "link.onnx": "is a symbolic link"},
    "eval": {"up.onnx": "is not a file inside the model's directory",
             "abs.onnx": "is not a file inside the model's directory",
             "link.onnx": "links outside the model's directory"},
}


@pytest.mark.parametrize("command, name", [(c, n) for c, names in CASES.items() for n in names])
def test_external_data_outside_the_directory_is_refused(place, command, name):
    args = ["-o", "out.onnx", "-r", "w8"] if command == "compile" else ["--no-latency"]
    assert_user_error(run_lowbit(command, f"m/{name}", *args, cwd=place), CASES[command][name])
    assert not (place / "out.onnx").exists()
