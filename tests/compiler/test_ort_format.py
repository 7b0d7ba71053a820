""".ort mobile output (``save(..., ort_format=True)`` / ``lowbit compile --ort-format``) on the tiny
decoder: the .ort and its operator config land beside the .onnx, the .ort gives the same logits bit
for bit, and a failed conversion leaves nothing behind and says so in one line."""

import subprocess
import sys

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import lowbit
from lowbit.ort import ort_format
from lowbit.errors import LowbitError
from lowbit.models.synthetic import tiny_decoder


@pytest.fixture(scope="module")
def npu_model():
    rng = np.random.default_rng(7)
    windows = [rng.integers(0, 64, 24) for _ in range(4)]
    return lowbit.compile(tiny_decoder(), "npu-w8a8", calibration=windows)


def onnx_and_ort_logits(onnx_file, ort_file, ids):
    """The .ort (default options) and the .onnx with the converter's own session config: the
    .ort already holds ORT's optimized graph, the .onnx gets the same optimizations at load."""
    opts = ort.SessionOptions()
    for key, value in ort_format.ORT_SESSION_CONFIG.items():
        opts.add_session_config_entry(key, value)
    feed = {"input_ids": ids[None]}
    from_onnx = ort.InferenceSession(str(onnx_file), opts).run(None, feed)[0]
    return from_onnx, ort.InferenceSession(str(ort_file)).run(None, feed)[0]


def test_ort_file_and_config_beside_the_onnx_with_identical_logits(npu_model, tmp_path):
    path = npu_model.save(tmp_path / "m.onnx", ort_format=True)
    ort_file, config = tmp_path / "m.ort", tmp_path / "m.required_operators_and_types.config"
    assert ort_file.is_file() and config.is_file()
    text = config.read_text()
    assert "MatMulIntegerToFloat" in text.splitlines()[-1] and "m.ort" in text and "/tmp" not in text
    # Exact: the same optimized graph and the same kernels on the same input.
    from_onnx, from_ort = onnx_and_ort_logits(path, ort_file, np.arange(20) * 3 % 64)
    np.testing.assert_array_equal(from_ort, from_onnx)


def test_directory_output_gets_model_ort(npu_model, tmp_path):
    out = npu_model.save(tmp_path / "out", ort_format=True)
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.ort", "model.required_operators_and_types.config"} <= names


def test_failed_conversion_is_one_line_and_leaves_nothing(npu_model, tmp_path, monkeypatch):
    import onnxruntime.tools.convert_onnx_models_to_ort as converter

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported thing\nsecond line")

    monkeypatch.setattr(converter, "convert_onnx_models_to_ort", broken)
    with pytest.raises(LowbitError, match="could not convert it to the .ort format: unsupported thing$"):
        npu_model.save(tmp_path / "m.onnx", ort_format=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_ort_format(tmp_path):
    source = tmp_path / "tiny.onnx"
    ir.save(tiny_decoder(norm="rms", norm_form="decomposed"), source)
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "lowbit", "compile", str(source), "-o", str(out), "-r", "w8",
                           "-t", "npu", "--ort-format"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / 'out.ort'} and out.required_operators_and_types.config" in proc.stdout
    ids = np.arange(12) % 64
    from_onnx, from_ort = onnx_and_ort_logits(out, tmp_path / "out.ort", ids)
    np.testing.assert_array_equal(from_ort, from_onnx)
