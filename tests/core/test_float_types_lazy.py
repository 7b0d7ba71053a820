"""lowbit.core.float_types, lazily: folding float16 storage reads no large weight, each read of a
widened constant is numpy's exact widening of the float16 source, and everything downstream
(serialization, ONNX Runtime sessions and segments, the compile, whole or block by block) takes
the lazy constant and writes what the eager fold wrote, byte for byte."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lowbit.compiler.api import compile as lowbit_compile
from lowbit.core import float_types
from lowbit.core.float_types import FloatTypesPass, widened_source
from lowbit.models.synthetic_llm import write_decoder
from lowbit.ort import observe as observation
from lowbit.ort.segments import _segment_model, model_weight_bytes, split_segments
from lowbit.ort.session import ort_session

SMALL_CALIBRATION = ("calibration.windows=2", "calibration.seq_len=32", "calibration.slac_windows=1")
ALL_LAZY, ALL_EAGER = 0, 1 << 62  # values of float_types.LAZY_BYTES
EMBEDDING = "model.embed_tokens.weight"  # the tiny decoder's only weight of LAZY_BYTES or more


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory) -> Path:
    return write_decoder("tiny", tmp_path_factory.mktemp("lazy") / "tiny", dtype="float16", progress=False)


def _widened_by_numpy(directory: Path) -> dict[str, np.ndarray]:
    model = ir.load(directory / "model.onnx")
    return {name: v.const_value.numpy().astype(np.float32) for name, v in model.graph.initializers.items()}


def _folded(directory: Path) -> ir.Model:
    model = ir.load(directory / "model.onnx")
    assert FloatTypesPass()(model).modified
    return model


def _feeds() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, 49152, (1, 16), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_fold_reads_no_large_weight_and_each_read_widens_exactly(tiny_f16):
    expected = _widened_by_numpy(tiny_f16)
    model = ir.load(tiny_f16 / "model.onnx")
    sources = {name: v.const_value for name, v in model.graph.initializers.items()}
    assert FloatTypesPass()(model).modified
    tensors = {name: v.const_value for name, v in model.graph.initializers.items()}
    lazy = {name for name, t in tensors.items() if isinstance(t, ir.LazyTensor)}
    assert lazy == {n for n, a in expected.items() if a.nbytes >= float_types.LAZY_BYTES} == {EMBEDDING}
    tensor, source = tensors[EMBEDDING], sources[EMBEDDING]
    assert isinstance(source, ir.ExternalTensor) and widened_source(tensor) is source
    assert source.raw is None  # the fold did not even map the data file
    assert (tensor.dtype, tuple(tensor.shape), tensor.nbytes) == (ir.DataType.FLOAT, expected[EMBEDDING].shape,
                                                                  expected[EMBEDDING].nbytes)  # fmt: skip
    assert model_weight_bytes(model) == sum(a.nbytes for a in expected.values())
    first, second = tensor.numpy(), tensor.numpy()
    assert first is not second  # nothing cached: each read widens again
    for array in (first, second, np.frombuffer(tensor.tobytes(), np.float32).reshape(first.shape)):
        assert array.dtype == np.float32 and np.array_equal(array, expected[EMBEDDING])
    with pytest.raises(ValueError, match="read-only"):
        first[0, 0] = 0.0  # a write would be lost, so it fails as on an external tensor
    assert source.raw is None  # each read closed the map it opened
    for name in set(tensors) - lazy:  # small weights: widened at the fold
        assert widened_source(tensors[name]) is None and tensors[name].dtype == ir.DataType.FLOAT
        assert np.array_equal(tensors[name].numpy(), expected[name])


def test_lazy_constants_serialize_and_run_in_onnx_runtime(tiny_f16, tmp_path, monkeypatch):
    monkeypatch.setattr(float_types, "LAZY_BYTES", ALL_LAZY)
    expected = _widened_by_numpy(tiny_f16)
    model = _folded(tiny_f16)
    assert all(isinstance(v.const_value, ir.LazyTensor) for v in model.graph.initializers.values())
    for name, value in model.graph.initializers.items():
        proto = ir.serde.serialize_tensor(value.const_value)
        assert proto.name == name and onnx.numpy_helper.to_array(proto).tobytes() == expected[name].tobytes()
    for external in ("model.onnx.data", None):
        path = tmp_path / f"{bool(external)}" / "model.onnx"
        path.parent.mkdir()
        ir.save(model, path, external_data=external)
        saved = {name: v.const_value.tobytes() for name, v in ir.load(path).graph.initializers.items()}
        assert saved == {name: a.tobytes() for name, a in expected.items()}
    assert all(isinstance(v.const_value, ir.LazyTensor) for v in model.graph.initializers.values())
    # ONNX Runtime: a session over the saved model, and a segment borrowing the widened arrays
    reference = ort.InferenceSession(str(tiny_f16 / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = reference.run(["logits"], _feeds())[0]
    assert np.array_equal(ort_session(model).run(["logits"], _feeds())[0], logits)
    segment = split_segments(model, 1)[0]  # not canonicalized: no norm to cut at, one segment
    embedded = next(n for n in segment.nodes if n.op_type == "Gather").outputs[0]
    _, borrowed = _segment_model(model, segment, [embedded], {})
    assert EMBEDDING in borrowed
    for name, array in borrowed.items():
        assert array.dtype == np.float32 and np.array_equal(array, expected[name])


def _compiled_files(source: Path, recipe: str, out: Path, *, lazy_bytes: int, blockwise: bool,
                    monkeypatch) -> dict[str, bytes]:  # fmt: skip
    """The compiled model's files (reports aside: they hold timings)."""
    with monkeypatch.context() as m:
        m.setattr(float_types, "LAZY_BYTES", lazy_bytes)
        if blockwise:  # the tiny model counts as large, every norm starts a block
            m.setattr(observation, "WHOLE_MODEL_BYTES", 0)
            m.setattr(observation, "SEGMENT_BYTES", 1)
        compiled = lowbit_compile(source, recipe, overrides=SMALL_CALIBRATION)
        assert ("blockwise" in compiled.report) == blockwise
        compiled.save(out)
    return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if not f.name.startswith("report")}


@pytest.mark.parametrize("blockwise", [False, True], ids=["whole", "blockwise"])
@pytest.mark.parametrize("recipe", ["w8a8-rptq", "w4a8-dint4"])
def test_lazy_fold_compiles_byte_for_byte_what_the_eager_fold_compiles(tiny_f16, tmp_path, recipe, blockwise,
                                                                      monkeypatch):  # fmt: skip
    lazy = _compiled_files(tiny_f16, recipe, tmp_path / "lazy", lazy_bytes=ALL_LAZY, blockwise=blockwise,
                           monkeypatch=monkeypatch)  # fmt: skip
    eager = _compiled_files(tiny_f16, recipe, tmp_path / "eager", lazy_bytes=ALL_EAGER, blockwise=blockwise,
                            monkeypatch=monkeypatch)  # fmt: skip
    assert "model.onnx" in lazy
    assert lazy.keys() == eager.keys()
    for name in lazy:
        assert lazy[name] == eager[name], name


_FOLD_MEMORY = textwrap.dedent("""
    import sys
    import onnx_ir as ir
    from lowbit.core.float_types import fold_float_storage

    def status(key):  # bytes
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith(key + ":"))

    model = ir.load(sys.argv[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current resident memory
    before = status("VmRSS")
    folded = fold_float_storage(model)
    resident, peak = status("VmRSS"), status("VmHWM")
    values = model.graph.initializers.values()
    lazy = sum(isinstance(v.const_value, ir.LazyTensor) for v in values)
    widened = sum(v.const_value.nbytes for v in values)
    print(folded, lazy, widened, resident - before, peak - before)
""")


@pytest.mark.slow
def test_folding_a_large_float16_model_holds_no_float32_weights(tmp_path):
    """Llama-3.2-1B shape, 2 layers: 0.77 GB float16, 1.5 GB once widened. The fold used to hold all
    of it in float32 (resident +1.5 GB, peak +2.2 GB); lazily it holds nothing (measured +0 MB)."""
    directory = write_decoder("llama-3.2-1b", tmp_path / "llama", dtype="float16", layers=2, progress=False)
    try:
        proc = subprocess.run([sys.executable, "-c", _FOLD_MEMORY, str(directory / "model.onnx")],
                              capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    finally:
        shutil.rmtree(directory)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folded, lazy, widened, resident, peak = map(int, proc.stdout.split())
    assert folded == 20 and lazy == 15 and widened > 1.5e9  # 2 x 7 linears and the embedding
    assert resident < 100 << 20 and peak < 100 << 20, (resident, peak)
