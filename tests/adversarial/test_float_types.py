"""Every float type ONNX allows for weights and activations, through `lowbit compile`.

The decided contract (``core/float_types.py``):

- float32: compiles (the rest of the suite);
- float16 / bfloat16 weights *stored* and Cast to float32 before use ("fp16 storage, fp32
  compute"): compile exactly -- the compiled model equals the compile of the float32 model
  holding the same (rounded) weights, tensor for tensor -- and match the input's logits within
  quantization error. Before the fold, weights above the folder's 8192-element limit stayed
  behind their Cast: smoothing / RPTQ recipes then wrote a silently wrong model (relative logit
  error 0.4-1.0 instead of 0.02), hence the larger-than-default tiny decoder here;
- float16 / bfloat16 *compute* (weights, activations and logits in that type): refused with one
  line naming the first such tensor, exit 2, nothing written, before calibration runs the model
  (ONNX Runtime itself runs the float16 model but has no CPU kernels for bfloat16 compute).
  Before, both compiled with exit 0 to a model ONNX Runtime refused to load (float32
  DequantizeLinear outputs bound to float16 MatMuls), or crashed with a traceback when the
  recipe calibrates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import lowbit
from lowbit.errors import LowbitError
from lowbit.models.synthetic import TinyConfig, tiny_decoder
from lowbit.core import float_types
from lowbit.core.float_types import FloatTypesPass, check_float_types

from .conftest import TEXT, assert_user_error, run_lowbit, write_tokenizer

F16, BF16, F32, F64 = ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE
NAMES = {F16: "float16", BF16: "bfloat16"}
# Weights of 96 x 96 and 96 x 128 exceed the constant folder's 8192 elements, as real ones do.
CFG = TinyConfig(hidden=96, heads=4, ffn=128, vocab=128, norm_form="fused")
IDS = (np.arange(24, dtype=np.int64) * 37 % 128)[None]
WINDOWS = [np.random.default_rng(i).integers(0, 128, 32) for i in range(4)]
CAL_SET = ["calibration.seq_len=32", "calibration.slac_lengths=[]"]
# Relative max logit error vs the input's own logits (measured: w8 0.005, w8a8 0.008,
# w8a8-smooth 0.017, w4-dint4 0.06).
TOL = {"w8": 0.02, "w8a8": 0.03, "w8a8-smooth": 0.05, "w4-dint4-ortcpu": 0.12}
REFUSAL = ("lowbit compile: error: tensor 'embed_tokens.weight' (input of Gather '{gather}') is {dtype}: lowbit "
           "compiles float32 models (float16/bfloat16 weights Cast to float32 before use are fine); "
           "export the model in float32")


def _float_inits(model: ir.Model):
    return [(n, v) for n, v in model.graph.initializers.items() if v.dtype == F32]


def computing_in(dtype: ir.DataType, norm_form: str = "fused") -> ir.Model:
    """(a)/(b): the tiny decoder computing in ``dtype``: weights, activations and logits."""
    model = tiny_decoder(_cfg(norm_form))
    for name, v in _float_inits(model):
        v.const_value = ir.tensor(v.const_value.numpy().astype(dtype.numpy()), dtype=dtype, name=name)
        v.type = ir.TensorType(dtype)
    for node in model.graph:
        for out in node.outputs:
            if out.dtype == F32:
                out.type = ir.TensorType(dtype)
    model.graph.outputs[0].type = ir.TensorType(dtype)
    return model


def _cfg(norm_form: str) -> TinyConfig:
    return TinyConfig(**{**CFG.__dict__, "norm_form": norm_form})


def stored_as(dtype: ir.DataType, norm_form: str = "fused") -> ir.Model:
    """(c)/(d): every float initializer stored in ``dtype`` and Cast to float32 before use."""
    model = tiny_decoder(_cfg(norm_form))
    graph = model.graph
    for name, v in _float_inits(model):
        uses = list(v.uses())
        v.const_value = ir.tensor(v.const_value.numpy().astype(dtype.numpy()), dtype=dtype, name=name)
        v.type = ir.TensorType(dtype)
        cast = ir.node("Cast", [v], attributes={"to": F32}, name=f"{name}.cast")
        cast.outputs[0].name, cast.outputs[0].type = f"{name}.f32", ir.TensorType(F32)
        graph.insert_before(graph[0], cast)
        for use in uses:
            use.node.replace_input_with(use.idx, cast.outputs[0])
    return model


def rounded(dtype: ir.DataType, norm_form: str = "fused") -> ir.Model:
    """The float32 model holding the ``dtype``-rounded weights: what storage must compile to."""
    model = tiny_decoder(_cfg(norm_form))
    for name, v in _float_inits(model):
        v.const_value = ir.tensor(v.const_value.numpy().astype(dtype.numpy()).astype(np.float32), name=name)
    return model


def logits(path_or_model) -> np.ndarray:
    source = str(path_or_model) if isinstance(path_or_model, Path) else ir.to_proto(path_or_model).SerializeToString()
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": IDS})[0].astype(np.float64)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def same_tensors(a: ir.Model, b: ir.Model) -> None:
    """Identical initializers (names, dtypes, bits) and op sequence."""
    ta = {n: v.const_value.numpy() for n, v in a.graph.initializers.items()}
    tb = {n: v.const_value.numpy() for n, v in b.graph.initializers.items()}
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and np.array_equal(ta[name], tb[name]), name
    assert [n.op_type for n in a.graph] == [n.op_type for n in b.graph]


def gather_name(model: ir.Model) -> str:
    return next(n.name for n in model.graph if n.op_type == "Gather")


# -- what ONNX Runtime itself runs -------------------------------------------------------------


def test_ort_runs_float16_compute_and_storage_but_not_bfloat16_compute():
    base = logits(tiny_decoder(CFG))
    for model in (computing_in(F16), stored_as(F16), stored_as(BF16)):
        assert rel(logits(model), base) < 0.02  # float16 / bfloat16 rounding of the weights
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        logits(computing_in(BF16))


# -- (c) / (d): float16 / bfloat16 storage compiles exactly ------------------------------------


@pytest.mark.parametrize(("dtype", "norm_form", "recipe"), [
    (F16, "fused", "w8"), (BF16, "decomposed", "w8"),
    (F16, "decomposed", "w4-dint4-ortcpu"), (BF16, "fused", "w4-dint4-ortcpu"),
])  # fmt: skip
def test_cli_compiles_stored_weights_exactly(tmp_path, dtype, norm_form, recipe):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    ir.save(stored_as(dtype, norm_form), src)
    proc = run_lowbit("compile", str(src), "-o", str(out), "-r", recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "15/15 linear sites quantized" in proc.stdout
    assert rel(logits(out), logits(src)) < TOL[recipe]
    expected = lowbit.compile(rounded(dtype, norm_form), recipe).model
    same_tensors(ir.load(out), expected)


@pytest.mark.parametrize(("dtype", "recipe"), [(F16, "w8a8"), (BF16, "w8a8"), (F16, "w8a8-smooth")])
def test_api_calibrated_stored_weights_exactly(dtype, recipe):
    """Calibrated recipes (token windows through the API), each preserving pass --verify'd."""
    source = stored_as(dtype)
    before = logits(source)
    compiled = lowbit.compile(source, recipe, calibration=WINDOWS, overrides=CAL_SET, verify=True)
    passes = {p["pass"]: p for p in compiled.report["passes"]}
    assert passes["FloatTypesPass"]["modified"] and passes["FloatTypesPass"]["verified_rel_diff"] == 0.0
    assert not [n for n in compiled.model.graph if n.op_type == "Cast"]
    assert rel(logits(compiled.model), before) < TOL[recipe]
    expected = lowbit.compile(rounded(dtype), recipe, calibration=WINDOWS, overrides=CAL_SET)
    same_tensors(compiled.model, expected.model)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_lazy_widening_compiles_what_eager_widening_compiles(dtype, monkeypatch):
    """Every weight widened lazily (``LAZY_BYTES`` 0; the default widens these small ones at the
    fold), from in-memory float16 / bfloat16 sources: --verify'd exact, and the same compiled
    model as the eager fold, tensor for tensor."""
    monkeypatch.setattr(float_types, "LAZY_BYTES", 0)
    lazy = lowbit.compile(stored_as(dtype), "w8a8-smooth", calibration=WINDOWS, overrides=CAL_SET, verify=True)
    passes = {p["pass"]: p for p in lazy.report["passes"]}
    assert passes["FloatTypesPass"]["modified"] and passes["FloatTypesPass"]["verified_rel_diff"] == 0.0
    monkeypatch.setattr(float_types, "LAZY_BYTES", 1 << 62)
    eager = lowbit.compile(stored_as(dtype), "w8a8-smooth", calibration=WINDOWS, overrides=CAL_SET)
    same_tensors(lazy.model, eager.model)


# -- (a) / (b): float16 / bfloat16 compute is refused ------------------------------------------


@pytest.mark.parametrize(("dtype", "recipe", "output"), [
    (F16, "w8", "out.onnx"), (F16, "w4-dint4-ortcpu", "outdir"),
    (BF16, "w8", "outdir"), (BF16, "w4-dint4-ortcpu", "out.onnx"),
])  # fmt: skip
def test_cli_refuses_half_precision_compute(tmp_path, dtype, recipe, output):
    model = computing_in(dtype)
    src = tmp_path / "in.onnx"
    ir.save(model, src)
    proc = run_lowbit("compile", str(src), "-o", str(tmp_path / output), "-r", recipe)
    line = assert_user_error(proc, "export the model in float32")
    assert line == REFUSAL.format(gather=gather_name(model), dtype=NAMES[dtype])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]  # no output, no report


def test_cli_refuses_bfloat16_before_calibration(tmp_path):
    """w8a8 on a model directory with a tokenizer: calibration would run the model in ONNX
    Runtime, which has no bfloat16 MatMul; the refusal comes first."""
    model = computing_in(BF16, "decomposed")
    directory = tmp_path / "model"
    directory.mkdir()
    ir.save(model, directory / "model.onnx")
    write_tokenizer(directory)
    (directory / "calib.txt").write_text(TEXT)
    before = sorted(p.name for p in directory.iterdir())
    proc = run_lowbit("compile", str(directory), "-o", str(tmp_path / "out"), "-r", "w8a8",
                      "--calib-text", str(directory / "calib.txt"))
    line = assert_user_error(proc, "export the model in float32")
    assert line == REFUSAL.format(gather=gather_name(model), dtype="bfloat16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in directory.iterdir()) == before


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_api_refuses_half_precision_before_calibration(dtype):
    model = computing_in(dtype)
    expected = REFUSAL.format(gather=gather_name(model), dtype=NAMES[dtype]).removeprefix("lowbit compile: error: ")
    with pytest.raises(LowbitError) as e:
        lowbit.compile(model, "w8a8", calibration=WINDOWS, overrides=CAL_SET)
    assert str(e.value) == expected


# -- the pass on forms the tiny decoder does not have ------------------------------------------


def _graph(inputs, outputs, nodes, inits, opset=21) -> ir.Model:
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=inits, opset_imports={"": opset})
    return ir.Model(graph, ir_version=10)


def _init(name: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
    tensor = ir.tensor(array.astype(dtype.numpy()), dtype=dtype, name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(array.shape), const_value=tensor)


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_pass_folds_through_element_moves_constants_and_castlike():
    """Transpose chains (a tied head), Gather then Cast (an embedding), a Constant node behind
    CastLike, a float64 constant (rounded as the run-time Cast rounds), and a Cast that is itself
    a graph output (kept as a float -> float no-op): same outputs bit for bit, no half floats left."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(F32), shape=ir.Shape([2, 4]))
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2]))
    w = _init("w", rng.standard_normal((3, 4)), F16)
    table = _init("table", rng.standard_normal((5, 4)), BF16)
    d = _init("d", np.array(1 / 3), F64)
    t1 = ir.node("Transpose", [w], attributes={"perm": [1, 0]})
    t2 = ir.node("Identity", [t1.outputs[0]])
    cw = ir.node("Cast", [t2.outputs[0]], attributes={"to": F32})
    mm = ir.node("MatMul", [x, cw.outputs[0]])
    g = ir.node("Gather", [table, ids], attributes={"axis": 0})
    cg = ir.node("Cast", [g.outputs[0]], attributes={"to": F32})
    const = ir.node("Constant", [], attributes={"value": ir.tensor(np.full((4,), 0.1, np.float16))})
    cl = ir.node("CastLike", [const.outputs[0], x])
    cd = ir.node("Cast", [d], attributes={"to": F32})
    add = ir.node("Add", [ir.node("Mul", [cg.outputs[0], cl.outputs[0]]).outputs[0], cd.outputs[0]])
    nodes = [t1, t2, cw, mm, g, cg, const, cl, cd, add.inputs[0].producer(), add]
    mm.outputs[0].name, add.outputs[0].name, cw.outputs[0].name = "y", "z", "head"
    for v in (mm.outputs[0], add.outputs[0], cw.outputs[0]):
        v.type = ir.TensorType(F32)
    cl.outputs[0].type = ir.TensorType(F32)  # CastLike's target type, as inference gives it
    model = _graph([x, ids], [mm.outputs[0], add.outputs[0], cw.outputs[0]], nodes, [w, table, d])
    feeds = {"x": rng.standard_normal((2, 4)).astype(np.float32), "ids": np.array([4, 1])}
    before = _run(model, feeds)
    assert FloatTypesPass()(model).modified
    for a, b in zip(before, _run(model, feeds)):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)
    assert {n: v.dtype for n, v in model.graph.initializers.items()} == {"w": F32, "table": F32, "d": F32}
    assert [n.op_type for n in model.graph].count("Cast") == 1  # the graph output 'head'
    assert not [n for n in model.graph if n.op_type == "CastLike"]


def _refused(model: ir.Model) -> str:
    with pytest.raises(LowbitError) as e:
        FloatTypesPass()(model)
    return str(e.value)


def test_pass_refuses_every_other_non_float32_tensor():
    rng = np.random.default_rng(1)
    # a float16 graph input (inputs_embeds-style interface)
    h = ir.Value(name="inputs_embeds", type=ir.TensorType(F16), shape=ir.Shape([2, 4]))
    out = ir.node("Relu", [h])
    out.outputs[0].name = "o"
    assert _refused(_graph([h], [out.outputs[0]], [out], [])).startswith("graph input 'inputs_embeds' is float16")

    def x() -> ir.Value:
        return ir.Value(name="x", type=ir.TensorType(F32), shape=ir.Shape([2, 4]))

    # a float32 model computing in float16 after an autocast-style Cast
    x1 = x()
    down = ir.node("Cast", [x1], attributes={"to": F16}, name="to_half")
    down.outputs[0].name = "x_half"
    assert _refused(_graph([x1], [down.outputs[0]], [down], [])).startswith("Cast 'to_half' makes 'x_half' float16")

    # a float16 weight used both through a Cast and directly
    w = _init("w", rng.standard_normal((4, 4)), F16)
    c = ir.node("Cast", [w], attributes={"to": F32}, name="widen")
    x2 = x()
    m = ir.node("MatMul", [x2, c.outputs[0]])
    direct = ir.node("Add", [w, w], name="half_add")
    message = _refused(_graph([x2], [m.outputs[0], direct.outputs[0]], [c, m, direct], [w]))
    assert message.startswith("tensor 'w' (input of Cast 'widen') is float16: ")
    assert message.endswith("; export the model in float32")

    # float64 compute
    d = _init("d", rng.standard_normal(4), F64)
    a = ir.node("Add", [d, d], name="double_add")
    message = _refused(_graph([], [a.outputs[0]], [a], [d]))
    assert message.startswith("tensor 'd' (input of Add 'double_add') is float64")


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_check_without_changing_the_model_agrees_with_the_pass(dtype):
    """``check_float_types``: the same refusal, usable before the pipeline (e.g. before --verify
    runs the input); it accepts the storage forms and leaves every model as it was."""
    storage = stored_as(dtype)
    proto = ir.to_proto(storage).SerializeToString()
    check_float_types(storage)
    assert ir.to_proto(storage).SerializeToString() == proto
    model = computing_in(dtype)
    with pytest.raises(LowbitError) as early:
        check_float_types(model)
    with pytest.raises(LowbitError) as late:
        FloatTypesPass()(model)
    assert str(early.value) == str(late.value)
