"""OpenVINO NNCF peer runner for the lowbit side-by-side benchmark (see ../PROTOCOL.md).

Quality model: the FP32 ONNX export converted to OpenVINO IR (openvino.convert_model), then
compressed with NNCF's OpenVINO backend (the backend NNCF documents as preferred for weight
compression, and the only one with GPTQ):

  fp32           unchanged IR, run at f32 inference precision (the runtime's FP32 reference)
  int4-awq-g128  nncf.compress_weights INT4_ASYM, ratio 1.0, group 128 (NNCF default; layers with
                 576 input channels fall back to group 64 via GroupSizeFallbackMode.ADJUST),
                 data-aware AWQ + scale estimation, embedding/lm_head in INT8_ASYM backup precision
  int4-awq-g32   the same with group 32
  int4-gptq-g32  INT4_ASYM, group 32, GPTQ + scale estimation
  int8-sq        nncf.quantize W8A8, model_type=TRANSFORMER, SmoothQuant (matmul alpha 0.95)

Encoder configurations (`--kind encoder`, MiniLM): the FP32 ONNX encoder converted to OpenVINO IR
and quantized W8A8 with nncf.quantize(model_type=TRANSFORMER), NNCF's documented recipe for BERT
models, calibrated on the bench's feed batches (one NNCF sample per batch of 16 paragraphs):

  int8           NNCF's defaults for transformers: mixed preset, SmoothQuant (matmul alpha 0.95,
                 on by default for model_type=TRANSFORMER), fast bias correction
  int8-nosq      the same with SmoothQuant switched off (matmul alpha -1)

Speed model: the ONNX export has no KV cache, so `build` also exports a stateful (KV cache) IR
from the Hugging Face directory with optimum-intel and compresses it to the same format (mode,
group size, ratio, backup precision); `speed` runs prefill + greedy decode on it. Only the runtime
graph matters there, so the INT4 speed model skips the data-aware corrections (AWQ, scale
estimation, GPTQ change weight values, not the graph) and int8-sq calibrates on 4 windows.

Inference uses the OpenVINO CPU plugin with INFERENCE_PRECISION_HINT=f32 unless --precision bf16
is given (the plugin's default on this CPU is bf16).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = ["fp32", "int4-awq-g128", "int4-awq-g32", "int4-gptq-g32", "int8-sq"]
ENCODER_CONFIGS = ["int8", "int8-nosq"]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def versions():
    from importlib.metadata import version

    return {p: version(p) for p in ("nncf", "openvino", "optimum-intel", "transformers", "torch")}


def kv_inputs(ids):
    """Inputs of the stateful optimum-intel model for a [1, T] prompt starting at position 0."""
    t = ids.shape[1]
    return {
        "input_ids": ids,
        "attention_mask": np.ones((1, t), dtype=np.int64),
        "position_ids": np.arange(t, dtype=np.int64)[None],
        "beam_idx": np.zeros(1, dtype=np.int32),
    }


def compress(model, config, windows, speed_only=False):
    """Apply the NNCF algorithm of `config` to an ov.Model; returns (model, settings line).
    speed_only: the stateful KV-cache model, used for timing only (see the module docstring)."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedCompressionParameters,
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        GroupSizeFallbackMode,
    )

    items = [w[None].astype(np.int64) for w in windows[: 4 if speed_only else None]]
    dataset = nncf.Dataset(items, kv_inputs if speed_only else (lambda x: {"input_ids": x}))
    n = len(items)
    if config == "fp32":
        return model, "fp32 (no quantization)"
    if config == "int8-sq":
        sq = AdvancedSmoothQuantParameters(matmul=0.95)
        model = nncf.quantize(
            model,
            dataset,
            subset_size=n,
            model_type=nncf.ModelType.TRANSFORMER,
            advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alphas=sq),
        )
        return model, ("int8 W8A8 (nncf.quantize, transformer, mixed preset: symmetric per-channel "
                       "weights, asymmetric per-tensor activations), SmoothQuant alpha 0.95")
    group = 128 if config.endswith("g128") else 32
    gptq = "gptq" in config
    data_aware = not speed_only
    adv = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)
    model = nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode.INT4_ASYM,
        ratio=1.0,
        group_size=group,
        dataset=dataset if data_aware else None,
        subset_size=n,
        awq=data_aware and not gptq,
        gptq=data_aware and gptq,
        scale_estimation=data_aware,
        advanced_parameters=adv,
    )
    algo = "GPTQ + scale estimation" if gptq else "AWQ + scale estimation"
    return model, (f"int4 asymmetric, groups of {group} (fallback ADJUST), {algo}, "
                   "embedding/lm_head (tied) int8 asymmetric per-channel")


def weight_bits(model, kinds=("MatMul", "Gather")):
    """(bits per weight, bits per weight of the 4-bit layers alone, weight count) over the low-bit
    weights of an ov.Model, counting their zero points and scales. Walks back from each weight input
    of the `kinds` ops (MatMul, Gather) through the decompression subgraph (Convert, Subtract,
    Multiply, Reshape)."""
    low = {"u4": 4, "i4": 4, "u8": 8, "i8": 8}
    layers = {}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind not in kinds:
            continue
        consts, stack, seen = [], [op.input_value(1 if kind == "MatMul" else 0).get_node()], set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            t = node.get_type_name()
            if t == "Constant":
                consts.append(node)
            elif t in ("Convert", "Subtract", "Multiply"):
                stack += [i.get_source_output().get_node() for i in node.inputs()]
            elif t in ("Reshape", "Transpose"):
                stack.append(node.input_value(0).get_node())
        size = lambda c: int(np.prod(c.get_output_shape(0)))
        ints = [c for c in consts if c.get_output_element_type(0).get_type_name() in low]
        if not ints:
            continue
        w = max(ints, key=size)
        bits = sum(size(c) * c.get_output_element_type(0).bitwidth for c in consts)
        layers[w.get_friendly_name()] = (size(w), bits, low[w.get_output_element_type(0).get_type_name()])
    if not layers:
        return None, None, 0
    n = sum(v[0] for v in layers.values())
    n4 = sum(v[0] for v in layers.values() if v[2] == 4)
    b4 = sum(v[1] for v in layers.values() if v[2] == 4)
    return sum(v[1] for v in layers.values()) / n, (b4 / n4 if n4 else None), n


def load_feeds(path):
    """The encoder calibration batches of FEEDS.npz (arrays `<input>.<batch>`), in batch order."""
    batches = {}
    with np.load(path) as z:
        for key in z.files:
            name, i = key.rsplit(".", 1)
            batches.setdefault(int(i), {})[name] = z[key].astype(np.int64)
    return [batches[i] for i in sorted(batches)]


def build_encoder(a):
    """W8A8 of the FP32 ONNX encoder as an OpenVINO IR (model.xml) with nncf.quantize."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    out = Path(a.out)
    res = {"config": a.config}
    try:
        feeds = load_feeds(a.calib_feeds)
        t0 = time.perf_counter()
        model = ov.convert_model(a.onnx)
        alpha = -1 if a.config == "int8-nosq" else 0.95  # 0.95 is NNCF's default for TRANSFORMER
        model = nncf.quantize(
            model,
            nncf.Dataset(feeds),
            subset_size=len(feeds),
            model_type=nncf.ModelType.TRANSFORMER,
            advanced_parameters=AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha)),
        )
        ov.save_model(model, out / "model.xml", compress_to_fp16=False)
        secs = time.perf_counter() - t0
        log(f"encoder built in {secs:.1f}s")
        ir = ov.Core().read_model(out / "model.xml")
        bpw, _, n = weight_bits(ir, kinds=("MatMul",))
        n_emb = weight_bits(ir, kinds=("Gather",))[2]
    except Exception as e:  # a configuration that cannot run here
        import traceback

        traceback.print_exc()
        res["unavailable"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        (out / "result.json").write_text(json.dumps(res))
        log(res["unavailable"])
        return
    grid = ("int8 W8A8 (nncf.quantize, transformer, mixed preset: symmetric per-channel weights, asymmetric "
            "per-tensor activations), " + ("no SmoothQuant" if alpha < 0 else f"SmoothQuant alpha {alpha}")
            + ", fast bias correction")
    res.update({
        "model": "model.xml", "runtime": "openvino", "compile_seconds": round(secs, 2),
        "weight_grid": grid, "bits_per_weight": round(bpw, 4) if bpw else None,
        "calibration_windows": len(feeds),
        "versions": {p: v for p, v in versions().items() if p in ("nncf", "openvino")},
        "note": (f"OpenVINO IR from the FP32 ONNX export (convert_model), quantized by NNCF's OpenVINO backend; "
                 f"calibrated on {len(feeds)} batches of padded paragraphs, one NNCF sample per batch. "
                 f"bits_per_weight over the {n} int8 MatMul weights (incl. their scales); "
                 + (f"NNCF also stores the {n_emb} embedding-table weights (word, position, token type) in "
                    "int8 (weight-only, not counted). " if n_emb else "the embeddings stay FP32. ")
                 + "The IR keeps the export's input and output names."),
    })
    (out / "result.json").write_text(json.dumps(res, indent=1))
    log(json.dumps(res))


def build(a):
    if a.kind == "encoder":
        return build_encoder(a)
    import openvino as ov

    out = Path(a.out)
    windows = np.load(a.calib)
    res = {"config": a.config}
    try:
        t0 = time.perf_counter()
        model = ov.convert_model(a.onnx)
        model, grid = compress(model, a.config, windows)
        ov.save_model(model, out / "model.xml", compress_to_fp16=False)
        secs = time.perf_counter() - t0
        log(f"quality model built in {secs:.1f}s")
        bpw, bpw4, n = weight_bits(ov.Core().read_model(out / "model.xml"))

        from optimum.intel import OVModelForCausalLM

        t1 = time.perf_counter()
        kv = OVModelForCausalLM.from_pretrained(a.hf, export=True, compile=False, load_in_8bit=False)
        kv_model, _ = compress(kv.model, a.config, windows, speed_only=True)
        ov.save_model(kv_model, out / "kv" / "openvino_model.xml", compress_to_fp16=False)
        kv_secs = time.perf_counter() - t1
        log(f"KV-cache speed model built in {kv_secs:.1f}s")
    except Exception as e:  # a configuration that cannot run here
        import traceback

        traceback.print_exc()
        res["unavailable"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        (out / "result.json").write_text(json.dumps(res))
        log(res["unavailable"])
        return
    note = ("OpenVINO IR from the FP32 ONNX export; inference precision hint f32 (CPU default here is "
            "bf16). speed uses a stateful KV-cache IR exported from the HF dir by optimum-intel"
            + ("" if a.config == "fp32" else " and compressed to the same format without the data-aware "
               "corrections (int8-sq: calibrated on 4 windows)")
            + f" ({kv_secs:.0f}s, not in compile_seconds).")
    if a.config != "fp32":
        note += (f" bits_per_weight over all {n} quantized weights incl. the tied int8 embedding/lm_head"
                 + (f"; 4-bit layers alone: {bpw4:.3f}" if bpw4 else "") + ".")
    res.update({
        "model": "model.xml", "runtime": "openvino", "compile_seconds": round(secs, 2),
        "weight_grid": grid, "bits_per_weight": round(bpw, 4) if bpw else (32.0 if a.config == "fp32" else None),
        "calibration_windows": 0 if a.config == "fp32" else len(windows),
        "versions": versions(), "note": note,
    })
    (out / "result.json").write_text(json.dumps(res, indent=1))
    log(json.dumps(res))


def compile_model(path, threads, precision):
    import openvino as ov

    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return core.compile_model(core.read_model(path), "CPU", cfg)


def logits(a):
    cm = compile_model(Path(a.out) / "model.xml", a.threads, a.precision)
    req = cm.create_infer_request()
    wins = np.load(a.windows)
    dst = None
    for i, w in enumerate(wins):
        y = req.infer({"input_ids": w[None].astype(np.int64)})[cm.output(0)][0]
        if dst is None:
            dst = np.lib.format.open_memmap(a.logits, mode="w+", dtype=np.float32, shape=(len(wins),) + y.shape)
        dst[i] = y
        log(f"window {i + 1}/{len(wins)}")
    dst.flush()


def speed(a):
    cm = compile_model(Path(a.out) / "kv" / "openvino_model.xml", a.threads, a.precision)
    req = cm.create_infer_request()
    prompt = np.load(a.prompt).astype(np.int64)
    runs = []
    for r in range(3):
        req.reset_state()
        t0 = time.perf_counter()
        y = req.infer(kv_inputs(prompt[None]))["logits"]
        prefill = time.perf_counter() - t0
        tok, pos = int(np.argmax(y[0, -1])), len(prompt)
        t1 = time.perf_counter()
        for _ in range(a.new_tokens):
            y = req.infer({
                "input_ids": np.array([[tok]], dtype=np.int64),
                "attention_mask": np.ones((1, pos + 1), dtype=np.int64),
                "position_ids": np.array([[pos]], dtype=np.int64),
                "beam_idx": np.zeros(1, dtype=np.int32),
            })["logits"]
            tok, pos = int(np.argmax(y[0, -1])), pos + 1
        decode = (time.perf_counter() - t1) / a.new_tokens
        runs.append((prefill * 1e3, decode * 1e3))
        log(f"run {r + 1}: prefill {runs[-1][0]:.1f} ms, decode {runs[-1][1]:.2f} ms/token")
    print(json.dumps({
        "prefill_ms": round(float(np.median([p for p, _ in runs])), 3),
        "decode_ms_per_token": round(float(np.median([d for _, d in runs])), 3),
        "threads": a.threads,
        "decode_note": "stateful KV-cache IR (optimum-intel export, same NNCF format), one token per step",
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("configs", help="print the JSON list of configurations")
    c.add_argument("--kind", choices=["causal-lm", "encoder"], default="causal-lm")
    b = sub.add_parser("build", help="build one configuration into --out")
    b.add_argument("--kind", choices=["causal-lm", "encoder"], default="causal-lm")
    b.add_argument("--config", required=True)
    for k in ("onnx", "hf", "gguf", "calib", "calib-feeds", "out"):
        b.add_argument(f"--{k}", required=k in ("onnx", "out"))
    for name, extra in (("logits", ("windows", "logits")), ("speed", ("prompt",))):
        s = sub.add_parser(name, help=f"{name} of a built configuration")
        s.add_argument("--out", required=True)
        for k in extra:
            s.add_argument(f"--{k}", required=True)
        s.add_argument("--threads", type=int, default=0 if name == "logits" else None, required=name == "speed")
        s.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                       help="CPU INFERENCE_PRECISION_HINT (default f32)")
        if name == "speed":
            s.add_argument("--new-tokens", type=int, default=64)
    a = p.parse_args()
    if a.cmd == "configs":
        print(json.dumps(ENCODER_CONFIGS if a.kind == "encoder" else CONFIGS))
        return
    if a.cmd == "build":
        offered, needs = (ENCODER_CONFIGS, ("calib_feeds",)) if a.kind == "encoder" else (CONFIGS, ("hf", "calib"))
        if a.config not in offered:
            p.error(f"--config {a.config!r}: {a.kind} configurations are {offered}")
        missing = [f"--{k.replace('_', '-')}" for k in needs if getattr(a, k) is None]
        if missing:
            p.error(f"a {a.kind} build needs {' '.join(missing)}")
    {"build": build, "logits": logits, "speed": speed}[a.cmd](a)


if __name__ == "__main__":
    main()
