"""Target ort-cpu: 4-bit QDQ sites lowered to lowbit.MatMulLowbit / GatherLowbit.

The packed weights must decode to lowbit.formats' values bit for bit; the lowered model must equal
the qdq model (executed as written, ORT_ENABLE_BASIC: no MatMulNBits int8 fusion) up to float32
summation order, with the native library and through the ONNX function fallbacks.
"""

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import lowbit
from lowbit import formats
from lowbit import runtime_ext as rx
from lowbit.core.context import CompileContext
from lowbit.compiler.pipeline import build_pipeline
from lowbit.core.recipe import load_recipe
from lowbit.errors import LowbitError
from lowbit.models.synthetic import tiny_decoder
from lowbit.core.linear_sites import find_linear_sites
from lowbit.emit.ort_cpu import FindEmbeddingsPass, LowerOrtCpuPass, kernel_reason, nbits_int8_weight
from lowbit.encode.weights import EncodeWeightsPass
from lowbit.runtime_ext.reference import decode_weight
from lowbit.core.analyses import WEIGHT_ENCODINGS

IDS = (np.arange(12, dtype=np.int64) * 5 % 64)[None]
RTOL = 1e-5  # float32 reassociation across 2 layers; a wrong code or scale moves outputs >1e-2


@pytest.fixture(scope="module")
def native_lib():
    from lowbit.runtime_ext import build

    return build.build()


def _compile(overrides, target="ort-cpu", calibration=None, merge=False, **tiny):
    """``merge``: keep MergeSiblingMatMulsPass (off here: these tests check one node per site)."""
    model = tiny_decoder(**tiny)
    if target == "ort-cpu" and not merge:
        overrides = [*overrides, "ort_cpu.merge_siblings=false"]
    originals = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    compiled = lowbit.compile(model, "w8", target=target, calibration=calibration,
                              overrides=overrides)
    return compiled, originals


def _run(model: ir.Model, *, native: bool | None, ids=IDS, basic: bool = False) -> np.ndarray:
    """native True/False: with/without the library; None: plain ORT_ENABLE_BASIC (qdq as written).

    ``basic``: ORT_ENABLE_BASIC also with the library (QDQ sites left in the graph would
    otherwise fuse into MatMulNBits, whose int8 activations move outputs by ~1e-3)."""
    opts = rx.session_options() if native else ort.SessionOptions()
    if native is None or basic:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]


def _rel(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def _ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def _init(model: ir.Model, value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


@pytest.mark.parametrize("fmt,block,ffn", [("dint4", 16, 48), ("nvfp4", 16, 48), ("int4", 16, 48),
                                           ("mxfp4", 32, 64), ("dint4", 64, 64)])
def test_lowered_weights_decode_bit_exact_and_model_equals_qdq(native_lib, fmt, block, ffn):
    # blocks of 32 or 64 must divide down_proj's K (ffn 64)
    overrides = [f"weights.format={fmt}", f"weights.block_size={block}"]
    compiled, originals = _compile(overrides, ffn=ffn)
    model = compiled.model
    lowered = [n for n in model.graph if n.op_type == "MatMulLowbit"]
    assert len(lowered) == 15 and _ops(model)["DequantizeLinear"] == 0
    assert compiled.report["ort_cpu"]["lowered"] == 15
    for node in lowered:  # the MatMul weight W[K, N] the kernel decodes, vs formats
        codes, scales, gscale = (_init(model, v) for v in node.inputs[1:4])
        block_size = node.attributes.get_int("block_size")
        w = decode_weight(codes, scales, gscale, fmt, block_size).T
        name = node.name.removesuffix(".lowbit")
        source = originals.get(f"{name}.weight")
        if source is None:  # tied lm_head: the folded transpose of the embedding table
            source = originals["embed_tokens.weight"].T
        want = formats.fake_quantize(source, fmt, axis=0, block_size=block or None)
        np.testing.assert_array_equal((w + np.float32(0)).view(np.uint32),
                                      (want + np.float32(0)).view(np.uint32), err_msg=name)
    qdq, _ = _compile(overrides, target="qdq", ffn=ffn)
    reference = _run(qdq.model, native=None)
    assert _rel(_run(model, native=True), reference) < RTOL
    assert _rel(_run(model, native=False), reference) < RTOL


def test_nvfp4_and_mxfp4_scales_are_stored_as_bytes(native_lib):
    for fmt, block in (("nvfp4", 16), ("mxfp4", 32)):
        compiled, _ = _compile([f"weights.format={fmt}", f"weights.block_size={block}"], ffn=64)
        dtypes = {n.inputs[2].const_value.dtype for n in compiled.model.graph
                  if n.op_type == "MatMulLowbit"}
        assert dtypes == {ir.DataType.UINT8}, fmt


def test_block_that_does_not_divide_the_reduction_axis_stays_qdq(native_lib):
    # ffn = 48: blocks of 32 fit the hidden axis (32) but not down_proj's 48 inputs
    compiled, _ = _compile(["weights.format=dint4", "weights.block_size=32"])
    kept = compiled.report["ort_cpu"]["kept_qdq"]
    assert sorted(kept) == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    assert _ops(compiled.model)["MatMulLowbit"] == 13
    assert _ops(compiled.model)["DequantizeLinear"] == 2
    qdq, _ = _compile(["weights.format=dint4", "weights.block_size=32"], target="qdq")
    assert _rel(_run(compiled.model, native=True, basic=True), _run(qdq.model, native=None)) < RTOL


def test_symmetric_int8_activations_fold_into_int8_static(native_lib, token_windows):
    overrides = ["weights.format=dint4", "weights.block_size=16", "activations.format=int8",
                 "activations.symmetric=true"]
    compiled, _ = _compile(overrides, calibration=token_windows)
    model = compiled.model
    modes = Counter(n.attributes.get_string("act_mode") for n in model.graph
                    if n.op_type == "MatMulLowbit")
    assert modes == {"int8_static": 15}
    ops = _ops(model)
    assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == 0
    # the op's act_scale is the QDQ scale: inside the calibrated range (a causal prefix of a
    # calibration window) the int8 inputs are the same and only summation order differs
    qdq, _ = _compile(overrides, target="qdq", calibration=token_windows)
    ids = token_windows[0][None, :12]
    reference = _run(qdq.model, native=None, ids=ids)
    assert _rel(_run(model, native=True, ids=ids), reference) < RTOL
    assert _rel(_run(model, native=False, ids=ids), reference) < RTOL
    # outside it the kernel clamps at -127 where QuantizeLinear clamps at -128 (module docs)
    assert _rel(_run(model, native=True), _run(qdq.model, native=None)) < 0.05


def test_asymmetric_activation_qdq_stays_and_feeds_float_mode(native_lib, token_windows):
    overrides = ["weights.format=nvfp4", "weights.block_size=16", "activations.format=int8"]
    compiled, _ = _compile(overrides, calibration=token_windows)
    model = compiled.model
    modes = {n.attributes.get_string("act_mode") for n in model.graph if n.op_type == "MatMulLowbit"}
    assert modes == {"float32"}
    assert _ops(model)["QuantizeLinear"] == 9  # one per input group: qkv, o, gate/up, down x 2, lm_head
    qdq, _ = _compile(overrides, target="qdq", calibration=token_windows)
    assert _rel(_run(model, native=True), _run(qdq.model, native=None)) < RTOL


def test_dynamic_activations_use_int8_rows(native_lib):
    overrides = ["weights.format=dint4", "weights.block_size=16"]
    compiled, _ = _compile(overrides + ["ort_cpu.dynamic_activations=true"])
    modes = {n.attributes.get_string("act_mode") for n in compiled.model.graph
             if n.op_type == "MatMulLowbit"}
    assert modes == {"int8_dynamic"}
    exact, _ = _compile(overrides)
    reference = _run(exact.model, native=True)
    diff = _rel(_run(compiled.model, native=True), reference)
    assert 1e-5 < diff < 0.05  # int8 rows: a real but small change
    assert _rel(_run(compiled.model, native=False), _run(compiled.model, native=True)) < RTOL


@pytest.mark.parametrize("vocab", [64, 512])  # 64 x 32: the folder copies the lm_head's Transpose
def test_tied_embedding_shares_the_lm_head_table(native_lib, vocab):
    compiled, originals = _compile(["weights.format=dint4", "weights.block_size=16",
                                    "ort_cpu.embeddings=true"], vocab=vocab)
    model = compiled.model
    gather = next(n for n in model.graph if n.op_type == "GatherLowbit")
    lm_head = next(n for n in model.graph if n.op_type == "MatMulLowbit"
                   and n.outputs[0].name == "logits")
    assert all(a is b for a, b in zip(gather.inputs[:3], lm_head.inputs[1:4]))
    assert compiled.report["ort_cpu"]["embeddings"][0]["shared_with_lm_head"]
    floats = [v for v in model.graph.initializers.values()
              if v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size >= vocab * 32]
    assert floats == []  # the FP32 table is gone
    table = originals["embed_tokens.weight"]
    want = formats.fake_quantize(table, "dint4", axis=1, block_size=16)
    got = decode_weight(*(v.const_value.numpy() for v in gather.inputs[:3]), "dint4", 16)
    np.testing.assert_array_equal(got, want)
    ids = (np.arange(12, dtype=np.int64) * 37 % vocab)[None]
    assert _rel(_run(model, native=False, ids=ids), _run(model, native=True, ids=ids)) < RTOL


def test_untied_embedding_is_encoded_on_its_own(native_lib):
    compiled, originals = _compile(["weights.format=nvfp4", "weights.block_size=16",
                                    "ort_cpu.embeddings=true", "sites.exclude=['*MatMul_57*']"])
    entry = compiled.report["ort_cpu"]["embeddings"][0]
    assert not entry["shared_with_lm_head"] and entry["op"] == "GatherLowbit nvfp4_b16_uint8"
    gather = next(n for n in compiled.model.graph if n.op_type == "GatherLowbit")
    got = decode_weight(*(v.const_value.numpy() for v in gather.inputs[:3]), "nvfp4", 16)
    want = formats.fake_quantize(originals["embed_tokens.weight"], "nvfp4", axis=1, block_size=16)
    np.testing.assert_array_equal(got, want)


def test_embeddings_need_a_4bit_weight_format():
    with pytest.raises(LowbitError, match="target ort-cpu packs dint4, nvfp4, int4, mxfp4 weights"):
        _compile(["weights.format=int8", "ort_cpu.embeddings=true"])


def _pipeline(overrides, ffn=64):
    model = tiny_decoder(ffn=ffn)
    ctx = CompileContext(model, load_recipe("w8", overrides + ["target=ort-cpu", "ort_cpu.merge_siblings=false"]))
    encodings = {}
    for step in build_pipeline(ctx)[:-1]:
        step(model)
        if isinstance(step, EncodeWeightsPass):
            encodings = dict(ctx.analyses.get(WEIGHT_ENCODINGS))
    return model, ctx, encodings


def test_sites_the_kernels_refuse_are_reported_and_stay_qdq():
    model, ctx, encodings = _pipeline(["weights.format=dint4", "weights.block_size=32"], ffn=48)
    # blocks of 32 fit the hidden axis (32) but not down_proj's 48 inputs
    kept = ctx.report["ort_cpu"]["kept_qdq"]
    assert sorted(kept) == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    assert set(kept.values()) == {"reduction axis 48 must be a multiple of 16 and of block_size=32"}
    assert _ops(model)["MatMulLowbit"] == 13 and _ops(model)["DequantizeLinear"] == 2
    assert len(encodings) == 15


@pytest.mark.parametrize("fmt,block", [("dint4", 16), ("nvfp4", 0), ("mxfp4", 32), ("int4", 32)])
def test_packed_arrays_are_the_site_encodings(fmt, block):
    """The kernel arrays are pack_matmul_weight of the encode step's encoding, byte for byte
    (nvfp4: its own E4M3 scale bytes and global scale, nothing recovered from a graph)."""
    model, ctx, encodings = _pipeline([f"weights.format={fmt}", f"weights.block_size={block}"])
    lowered = {n.name.removesuffix(".lowbit"): n for n in model.graph if n.op_type == "MatMulLowbit"}
    assert sorted(lowered) == sorted(encodings) and len(lowered) == 15
    scale_dtype = "float32" if fmt in ("dint4", "int4") else "uint8"
    for name, node in lowered.items():
        enc = encodings[name]
        assert enc.blocking.block_size == min(formats.get_format(fmt).block_size(block), enc.shape[enc.axis])
        packed = rx.pack_matmul_weight(enc, scale_dtype=scale_dtype)
        for value, want in zip(node.inputs[1:4], (packed.codes, packed.scales, packed.global_scale)):
            got = value.const_value.numpy()
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
        w = decode_weight(packed.codes, packed.scales, packed.global_scale, fmt, packed.spec.block_size)
        want = formats.decode(enc) if enc.axis == 1 else formats.decode(enc).T
        np.testing.assert_array_equal((w + np.float32(0)).view(np.uint32), (want + np.float32(0)).view(np.uint32))


def test_kernel_reason_names_what_the_kernels_cannot_take():
    sites = {s.name: s for s in find_linear_sites(tiny_decoder(ffn=48).graph)}
    site = sites["layers.0.mlp.down_proj"]  # K = 48
    w = site.weight.const_value.numpy()
    assert kernel_reason(site, formats.encode(w, "dint4", axis=0, block_size=16)) is None
    assert kernel_reason(site, formats.encode(w, "int8", axis=0)).startswith(
        "int8 weights without an int8 per-token-group activation quantizer")
    assert kernel_reason(site, formats.encode(w, "int8", axis=0), act_group=16) is None
    assert "powers of two" in kernel_reason(site, formats.encode(w, "int8", axis=0), act_group=24)
    assert "whole activation groups" in kernel_reason(site, formats.encode(w, "int8", axis=0), act_group=32)
    assert kernel_reason(site, formats.encode(w, "int3", axis=0, block_size=16)).startswith("int3 has no lowbit kernel")
    assert kernel_reason(site, formats.encode(w, "dint4", axis=0, block_size=32)) == \
        "reduction axis 48 must be a multiple of 16 and of block_size=32"
    assert "block_size must be 16" in kernel_reason(site, formats.encode(w, "int4", axis=0, block_size=8))
    assert kernel_reason(site, formats.encode(w, "int4", axis=0, block_size=16, symmetric=False)) == \
        "asymmetric weights (zero point): the lowbit kernels are symmetric"


def test_pipeline_adds_the_passes_only_for_ort_cpu():
    def names(target):
        ctx = CompileContext(tiny_decoder(), load_recipe("w8", [f"target={target}", "weights.format=dint4",
                                                                "weights.block_size=32"]))
        return [type(p) for p in build_pipeline(ctx)]

    assert FindEmbeddingsPass not in names("qdq") and LowerOrtCpuPass not in names("qdq")
    steps = names("ort-cpu")
    assert steps.index(FindEmbeddingsPass) < steps.index(EncodeWeightsPass) < steps.index(LowerOrtCpuPass)


def test_saved_model_runs_with_and_without_the_library(native_lib, tmp_path):
    compiled, _ = _compile(["weights.format=dint4", "weights.block_size=16",
                            "ort_cpu.embeddings=true"])
    path = compiled.save(tmp_path / "tiny_ortcpu.onnx")
    outs = []
    for opts in (rx.session_options(), ort.SessionOptions()):
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"input_ids": IDS})[0])
    assert outs[0].shape == (1, 12, 64) and _rel(outs[1], outs[0]) < RTOL


def _file_bytes(directory) -> int:
    return sum(f.stat().st_size for f in directory.glob("model.onnx*"))


@pytest.mark.slow
def test_kv_cache_smollm2_generates_through_optimum(native_lib, smollm2_with_past_export, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    from lowbit.models.registry import load_tokenizer

    compiled = lowbit.compile(smollm2_with_past_export, "w8", target="ort-cpu", overrides=[
        "weights.format=dint4", "weights.block_size=32", "ort_cpu.embeddings=true"])
    ops = _ops(compiled.model)
    # 30 x (q/k/v, o, gate/up, down: siblings merged) + lm_head
    assert ops["MatMulLowbit"] == 121 and ops["Split"] == 60 and ops["GatherLowbit"] == 1
    assert ops["DequantizeLinear"] == 0
    assert compiled.report["ort_cpu"]["embeddings"][0]["shared_with_lm_head"]
    out = compiled.save(tmp_path / "smollm2_ortcpu")
    assert _file_bytes(out) <= 0.20 * _file_bytes(smollm2_with_past_export)  # issue 7 size goal
    tokenizer = load_tokenizer(smollm2_with_past_export)
    prompt = tokenizer("The Python language is", return_tensors="pt")
    texts = []
    for opts in (rx.session_options(), ort.SessionOptions()):  # native ops, then the fallbacks
        model = ORTModelForCausalLM.from_pretrained(out, session_options=opts)
        ids = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0]
        assert len(ids) == prompt["input_ids"].shape[1] + 12
        texts.append(tokenizer.decode(ids[prompt["input_ids"].shape[1]:]))
    assert texts[0] == texts[1]
    assert len(set(texts[0].split())) >= 4  # real words, not one token repeated


@pytest.mark.slow
def test_smollm2_perplexity_equals_qdq(native_lib, smollm2_export, eval_windows, tmp_path):
    """Issue 7 acceptance on 2 of the 8 evaluation windows (the bench runs all 8): the ort-cpu
    model, packed from the same encodings, gives the qdq model's perplexity within 0.1%."""
    from lowbit.models.evaluate import perplexity

    overrides = ["weights.format=dint4", "weights.block_size=32"]
    compiled = lowbit.compile(smollm2_export, "w8", target="qdq", overrides=overrides)
    qdq_path = compiled.save(tmp_path / "qdq.onnx")
    compiled = lowbit.compile(smollm2_export, "w8", target="ort-cpu", overrides=overrides)
    assert compiled.report["ort_cpu"]["lowered"] == 211 and not compiled.report["ort_cpu"]["kept_qdq"]
    ortcpu_path = compiled.save(tmp_path / "ortcpu.onnx")
    as_written = ort.SessionOptions()
    as_written.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    windows = eval_windows[:2]
    want = perplexity(qdq_path, windows, session_options=as_written, progress=False).ppl
    got = perplexity(ortcpu_path, windows, session_options=rx.session_options(), progress=False).ppl
    assert abs(got / want - 1) < 1e-3, (got, want)


@pytest.mark.parametrize("tied", [True, False])
def test_int8_sites_behind_int8_groups_become_exact_matmulnbits(tied, token_windows, native_lib):
    """The int8 LM head of a W4A8 recipe: ORT's MatMulNBits (bits=8, blocks = the activation
    group) re-quantizes activations that already are int8 codes per group, so the lowered model
    equals the qdq model as written up to float32 summation order, at ORT's default options."""
    recipe = "w4a8-dint4"
    overrides = ["sites.int8_weights=[\"lm_head\"]", "activations.group_size=32"]
    if tied:  # no R1 rotation: the head reads the embedding table through a Transpose
        overrides += ["rotate.residual=false", "rotate.heads=false", "rotate.online=[]"]
    def model():
        tiny = tiny_decoder(hidden=64, ffn=128, vocab=64)
        next(n for n in tiny.graph if n.outputs[0].name == "logits").name = "lm_head"
        return tiny

    lowered = lowbit.compile(model(), recipe, target="ort-cpu", calibration=token_windows, overrides=overrides)
    qdq = lowbit.compile(model(), recipe, target="qdq", calibration=token_windows, overrides=overrides)
    nbits = [n for n in lowered.model.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1 and nbits[0].outputs[0].name == "logits"
    attrs = {k: nbits[0].attributes.get_int(k) for k in ("K", "N", "bits", "block_size", "accuracy_level")}
    assert attrs == {"K": 64, "N": 64, "bits": 8, "block_size": 32, "accuracy_level": 4}
    assert not lowered.report["ort_cpu"]["kept_qdq"]
    entry = lowered.report["sites"][next(k for k in lowered.report["sites"] if "ort_cpu" in lowered.report["sites"][k]
                                         and "MatMulNBits" in lowered.report["sites"][k]["ort_cpu"])]
    assert entry["weights"] == "int8"
    ids = np.asarray(token_windows[0], np.int64)[None]
    as_written = _run(qdq.model, native=True, ids=ids, basic=True)
    default = ort.InferenceSession(ir.to_proto(lowered.model).SerializeToString(), rx.session_options(),
                                   providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    assert _rel(default, as_written) < RTOL


def test_nbits_int8_weight_layout_decodes_to_the_encoding():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 24)).astype(np.float32)  # stored [K, N]
    for enc in (formats.encode(w, "int8", axis=0), formats.encode(w, "int8", axis=0, block_size=32),
                formats.encode(w.T.copy(), "int8", axis=1)):
        codes, scales = nbits_int8_weight(enc, 16)
        assert codes.shape == (24, 4, 16) and codes.dtype == np.uint8 and scales.shape == (96,)
        decoded = ((codes.astype(np.float32) - 128) * scales.reshape(24, 4, 1)).reshape(24, 64)
        want = formats.decode(enc) if enc.axis == 1 else formats.decode(enc).T
        np.testing.assert_array_equal(decoded, want)


def test_int8_group_quantizers_fold_into_the_matmuls(native_lib, token_windows, monkeypatch):
    """w4a8-dint4's run-time int8 group quantizers (lowbit.GroupQuant, qmax 127, groups of 64) fold
    into MatMulLowbit act_mode=int8_group reading GroupQuant's input: no GroupQuant is left, and the
    logits equal the previous form (GroupQuant + act_mode=float32) up to float32 summation order,
    with the native library and through the ONNX function fallbacks."""
    from lowbit.emit import ort_cpu

    def compile_tiny():
        return lowbit.compile(tiny_decoder(hidden=64, ffn=128, vocab=64), "w4a8-dint4", target="ort-cpu",
                              calibration=token_windows, overrides=["ort_cpu.merge_siblings=false"])

    folded = compile_tiny()
    monkeypatch.setattr(ort_cpu, "_int8_group_quant", lambda *args: None)  # the previous form
    previous = compile_tiny()
    assert _ops(folded.model)["GroupQuant"] == 0 and _ops(previous.model)["GroupQuant"] == 9  # 4 per layer + the head
    lowered = [n for n in folded.model.graph if n.op_type == "MatMulLowbit"]
    assert len(lowered) == 15 and folded.report["ort_cpu"]["act_modes"] == {"int8_group": 15}
    assert {(n.attributes.get_string("act_mode"), n.attributes.get_int("act_group")) for n in lowered} == {("int8_group", 64)}
    assert folded.report["sites"]["layers.0.mlp.down_proj"]["ort_cpu"] == "MatMulLowbit dint4_b32_float32_int8_group_g64"
    assert previous.report["ort_cpu"]["act_modes"] == {"float32": 15}
    ids = np.asarray(token_windows[0], np.int64)[None]
    for native in (True, False):
        assert _rel(_run(folded.model, native=native, ids=ids), _run(previous.model, native=native, ids=ids)) < RTOL
