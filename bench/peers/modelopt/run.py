"""Peer runner for NVIDIA ModelOpt's ONNX post-training quantization (CPU only).

Quantizes the FP32 ONNX export with `modelopt.onnx.quantization.quantize`, calibrating with
ONNX Runtime's CPU execution provider, and runs the result in ONNX Runtime (CPU).
Configurations:

  int8          W8A8 QDQ on the MatMuls: per-channel weights, per-tensor activations, entropy calibration
                (ModelOpt's default for int8).
  int4-awq-lite INT4 weight-only, blocks of 128, symmetric, AWQ-lite scale search.
  int4-awq-clip INT4 weight-only, blocks of 128, symmetric, AWQ clip search (ModelOpt's default for int4).
  fp8           W8A8 FP8 (E4M3) QDQ on the MatMuls, entropy calibration (ONNX Runtime CPU cannot load it).

Encoder configuration (`--kind encoder`, MiniLM), calibrated on the bench's feed batches through a
CalibrationDataReader (one batch of 16 padded paragraphs per calibration step):

  int8          W8A8 QDQ on the MatMuls, int8 symmetric per-channel weights and per-tensor activations,
                entropy calibration (ModelOpt's int8 defaults with op_types_to_quantize=["MatMul"]: its
                default placement, which also quantizes the residual Adds, drops the embedding cosine
                to FP32 to ~0.85 here).

ModelOpt defaults to an FP16 output model (`high_precision_dtype="fp16"`), meant for TensorRT; on the
CPU EP FP16 falls back to slow or missing kernels, so the non-quantized parts are kept in FP32 here.
See bench/peers/PROTOCOL.md for the subcommands and result files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from importlib import metadata

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # calibration progress bars would flood stderr

# name -> (quantize_mode, calibration_method, calibration windows used, extra quantize() kwargs, grid)
CONFIGS = {
    # ModelOpt's default int8/fp8 placement also quantizes the residual Adds and the inputs of the
    # RMSNormalization ops it does not recognise (perplexity ~1e16 here), so only MatMuls are quantized.
    "int8": ("int8", "entropy", 32, {"op_types_to_quantize": ["MatMul"]},
             "int8 symmetric: per-output-channel weights, per-tensor activations (entropy calibration), QDQ"),
    # awq_lite's fast path runs the model once per window and caches every MatMul input
    # (~300 MB per 512-token window); without it, it runs every window once per weight (211 x N forwards).
    "int4-awq-lite": ("int4", "awq_lite", 8, {"enable_fast_path_using_high_sysram": True},
                      "int4 symmetric weight-only, blocks of 128 (fp32 scales), AWQ-lite scale search"),
    # awq_clip runs every window once per weight (211 x N full forwards) but its clip search keeps
    # only 64 tokens of them, so more than 2 windows only adds forwards. (Not yet built to the end here.)
    "int4-awq-clip": ("int4", "awq_clip", 2, {},
                      "int4 symmetric weight-only, blocks of 128 (fp32 scales), AWQ clip search"),
    # ModelOpt builds it on CPU, but ONNX Runtime 1.24 CPU rejects the model (it fuses the FP8 DQ ->
    # MatMul into MatMulIntegerToFloat, which takes no float8), so `build` reports it unavailable.
    "fp8": ("fp8", "entropy", 32, {"op_types_to_quantize": ["MatMul"]},
            "fp8 e4m3 QDQ on MatMul weights and activations (entropy calibration)"),
}
# name -> (quantize_mode, calibration_method, extra quantize() kwargs, grid); calibrated on every feed batch
ENCODER_CONFIGS = {
    "int8": ("int8", "entropy", {"op_types_to_quantize": ["MatMul"]},
             "int8 symmetric: per-output-channel weights, per-tensor activations (entropy calibration), QDQ, "
             "MatMul only"),
}
MODEL_FILE = "model.onnx"


def log(msg: str) -> None:
    print(f"[modelopt] {msg}", file=sys.stderr, flush=True)


def versions() -> dict:
    return {p: metadata.version(p) for p in ("nvidia-modelopt", "onnxruntime", "onnx", "numpy")}


def report_unavailable(out_dir: str, result_path: str, config: str, error: Exception) -> None:
    """The one-line reason a build failed here, as the protocol's result.json; partial outputs go."""
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]
    log(f"unavailable: {reason}")
    for name in os.listdir(out_dir):  # the caller's `finally` removes its work directory
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    write_json(result_path, {"config": config, "unavailable": reason})


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def copy_onnx(src: str, dst_dir: str) -> str:
    """Copy the export (graph + external data files beside it) so ModelOpt can write next to it."""
    src_dir = os.path.dirname(os.path.abspath(src))
    for name in os.listdir(src_dir):
        if name.startswith(os.path.basename(src)):
            shutil.copy(os.path.join(src_dir, name), dst_dir)
    return os.path.join(dst_dir, os.path.basename(src))


def linear_weight_bits(model_path: str) -> tuple[float | None, str]:
    """Bits per quantized MatMul weight (data + scales + zero points) and which weight MatMuls stayed FP32."""
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    four_bit = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)

    def size(name: str) -> tuple[int, int]:  # (elements, bits)
        t = inits[name]
        n = int(np.prod(t.dims))
        width = 4 if t.data_type in four_bit else onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * 8
        return n, n * width

    def origin(name: str) -> str:  # walk back through layout ops and Q/DQ to a weight initializer
        while name in producer and producer[name].op_type in ("Transpose", "Reshape", "Cast",
                                                              "QuantizeLinear", "DequantizeLinear"):
            name = producer[name].input[0]
        return name

    elems = bits = 0
    fp32 = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        src = node.input[1]
        while src in producer and producer[src].op_type in ("Transpose", "Reshape", "Cast"):
            src = producer[src].input[0]
        dq = producer.get(src)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            n, b = size(dq.input[0])
            elems += n
            bits += b + sum(size(x)[1] for x in dq.input[1:] if x in inits)
        elif origin(src) in inits:  # FP32 weight, possibly fake-quantized (Q/DQ) at run time
            fp32.append(node.name)
    bpw = round(bits / elems, 4) if elems else None
    return bpw, f"{len(fp32)} weight MatMul(s) with FP32-stored weights: {', '.join(fp32) or 'none'}"


def build(args: argparse.Namespace) -> None:
    mode, method, windows, extra, grid = CONFIGS[args.config]
    os.makedirs(args.out, exist_ok=True)
    result_path = os.path.join(args.out, "result.json")
    calib = np.load(args.calib)[:windows].astype(np.int64)  # one [1, T] window per calibration step
    work = tempfile.mkdtemp(prefix="modelopt-", dir=args.out)
    try:
        from modelopt.onnx.quantization import quantize

        src = copy_onnx(args.onnx, work)
        out_model = os.path.join(args.out, MODEL_FILE)
        log(f"quantizing {args.config}: mode={mode} method={method} on {len(calib)} windows of {calib.shape[1]}")
        t0 = time.perf_counter()
        quantize(
            onnx_path=src,
            quantize_mode=mode,
            calibration_method=method,
            calibration_data={"input_ids": calib},
            calibration_shapes=f"input_ids:1x{calib.shape[1]}",
            calibration_eps=["cpu"],
            high_precision_dtype="fp32",
            dq_only=mode in ("int8", "fp8"),  # store 8-bit weights (weight DQ only), not FP32 weights + QDQ
            use_external_data_format=True,
            output_path=out_model,
            log_level="INFO",
            **extra,
        )
        seconds = time.perf_counter() - t0
        if not os.path.exists(out_model):
            raise RuntimeError("ModelOpt finished without writing a model")
        check_runs(out_model, calib[:1, :16])
    except Exception as e:  # any failure on this machine is reported, not raised
        report_unavailable(args.out, result_path, args.config, e)
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)

    bpw, fp32_note = linear_weight_bits(out_model)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    write_json(result_path, {
        "config": args.config,
        "model": MODEL_FILE,
        "runtime": "onnxruntime",
        "compile_seconds": round(seconds, 1),
        "weight_grid": grid,
        "bits_per_weight": bpw,
        "calibration_windows": len(calib),
        "versions": versions(),
        "note": (f"modelopt.onnx.quantization.quantize(quantize_mode={mode!r}, calibration_method={method!r}, "
                 "calibration_eps=['cpu'], high_precision_dtype='fp32'"
                 f"{', dq_only=True' if mode != 'int4' else ''}"
                 f"{''.join(f', {k}={v!r}' for k, v in extra.items())}; other options default). "
                 f"bits_per_weight counts quantized MatMul weights only; {fp32_note} (the lm_head "
                 "MatMul reads a Transpose of its own copy of the tied embedding; int4 skips it, int8/fp8 "
                 "quantize it at run time with Q/DQ); the embedding Gather stays FP32. "
                 f"Model files: {size / 2**20:.1f} MiB."),
    })
    log(f"built {args.config} in {seconds:.1f}s, {bpw} bits/weight, {size / 2**20:.1f} MiB")


class FeedsReader:
    """The encoder calibration batches of FEEDS.npz (arrays `<input>.<batch>`) as the
    CalibrationDataReader ModelOpt takes (get_next / rewind, and get_first for its test run)."""

    def __init__(self, path: str) -> None:
        batches: dict[int, dict[str, np.ndarray]] = {}
        with np.load(path) as z:
            for key in z.files:
                name, i = key.rsplit(".", 1)
                batches.setdefault(int(i), {})[name] = z[key].astype(np.int64)
        self.feeds = [batches[i] for i in sorted(batches)]
        self.pos = 0

    def get_next(self) -> dict | None:
        self.pos += 1
        return self.feeds[self.pos - 1] if self.pos <= len(self.feeds) else None

    def get_first(self) -> dict:
        return self.feeds[0]

    def rewind(self) -> None:
        self.pos = 0


def build_encoder(args: argparse.Namespace) -> None:
    """W8A8 of the FP32 ONNX encoder (inputs input_ids / attention_mask / token_type_ids, output
    last_hidden_state), run by plain ONNX Runtime."""
    mode, method, extra, grid = ENCODER_CONFIGS[args.config]
    os.makedirs(args.out, exist_ok=True)
    result_path = os.path.join(args.out, "result.json")
    reader = FeedsReader(args.calib_feeds)
    work = tempfile.mkdtemp(prefix="modelopt-", dir=args.out)
    try:
        from modelopt.onnx.quantization import quantize

        src = copy_onnx(args.onnx, work)
        out_model = os.path.join(args.out, MODEL_FILE)
        log(f"quantizing encoder {args.config}: mode={mode} method={method} on {len(reader.feeds)} feed batches")
        t0 = time.perf_counter()
        quantize(
            onnx_path=src,
            quantize_mode=mode,
            calibration_method=method,
            calibration_data_reader=reader,
            calibration_eps=["cpu"],
            high_precision_dtype="fp32",
            dq_only=True,  # store int8 weights (weight DQ only), not FP32 weights + QDQ
            use_external_data_format=True,
            output_path=out_model,
            log_level="INFO",
            **extra,
        )
        seconds = time.perf_counter() - t0
        if not os.path.exists(out_model):
            raise RuntimeError("ModelOpt finished without writing a model")
        check_runs(out_model, reader.get_first(), "last_hidden_state")
    except Exception as e:  # any failure on this machine is reported, not raised
        report_unavailable(args.out, result_path, args.config, e)
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)

    bpw, fp32_note = linear_weight_bits(out_model)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    write_json(result_path, {
        "config": args.config,
        "model": MODEL_FILE,
        "runtime": "onnxruntime",
        "compile_seconds": round(seconds, 1),
        "weight_grid": grid,
        "bits_per_weight": bpw,
        "calibration_windows": len(reader.feeds),
        "versions": versions(),
        "note": (f"modelopt.onnx.quantization.quantize(quantize_mode={mode!r}, calibration_method={method!r}, "
                 "calibration_data_reader=<the feed batches>, calibration_eps=['cpu'], high_precision_dtype='fp32', "
                 f"dq_only=True{''.join(f', {k}={v!r}' for k, v in extra.items())}; other options default). "
                 "Each LayerNorm output gets one Q/DQ pair that the residual Add reads too, so the residual "
                 "stream is quantized at the attention and FFN inputs. "
                 f"bits_per_weight counts quantized MatMul weights only; {fp32_note}; the embedding Gathers stay FP32. "
                 f"Model files: {size / 2**20:.1f} MiB."),
    })
    log(f"built encoder {args.config} in {seconds:.1f}s, {bpw} bits/weight, {size / 2**20:.1f} MiB")


def session(model_path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])


def check_runs(model_path: str, feeds, output: str = "logits") -> None:
    """Fail the build (so it is reported unavailable) if ONNX Runtime CPU cannot run the model.
    `feeds`: an int64 ids array (causal LM) or a dict of inputs."""
    feeds = feeds if isinstance(feeds, dict) else {"input_ids": feeds}
    out = session(model_path, 2).run([output], feeds)[0]
    if not np.isfinite(out).all():
        raise RuntimeError(f"quantized model produces non-finite {output} on ONNX Runtime CPU")


def model_path(out_dir: str) -> str:
    with open(os.path.join(out_dir, "result.json")) as f:
        res = json.load(f)
    if "unavailable" in res:
        sys.exit(f"configuration {res['config']} is unavailable: {res['unavailable']}")
    return os.path.join(out_dir, res["model"])


def logits(args: argparse.Namespace) -> None:
    windows = np.load(args.windows).astype(np.int64)
    sess = session(model_path(args.out), args.threads)
    out = None
    for i, window in enumerate(windows):
        lg = sess.run(["logits"], {"input_ids": window[None]})[0][0]
        if out is None:
            out = np.lib.format.open_memmap(args.logits, mode="w+", dtype=np.float32,
                                            shape=(len(windows),) + lg.shape)
        out[i] = lg
        log(f"window {i + 1}/{len(windows)}")
    out.flush()


def speed(args: argparse.Namespace) -> None:
    prompt = np.load(args.prompt).astype(np.int64).reshape(1, -1)
    sess = session(model_path(args.out), args.threads)
    sess.run(["logits"], {"input_ids": prompt})  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        sess.run(["logits"], {"input_ids": prompt})
        times.append((time.perf_counter() - t0) * 1000)
    print(json.dumps({
        "prefill_ms": round(statistics.median(times), 2),
        "decode_ms_per_token": None,
        "decode_note": "the FP32 export has no KV cache, so ModelOpt's model has none either; "
                       "per-token decode would re-run the whole prefix and is not measured",
        "threads": args.threads,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("configs", help="print the configurations offered, as a JSON list")
    c.add_argument("--kind", choices=["causal-lm", "encoder"], default="causal-lm")
    b = sub.add_parser("build", help="quantize one configuration into OUT_DIR")
    b.add_argument("--kind", choices=["causal-lm", "encoder"], default="causal-lm")
    b.add_argument("--config", required=True)
    b.add_argument("--onnx", required=True, help="FP32 ONNX export")
    b.add_argument("--hf", help="Hugging Face directory (unused)")
    b.add_argument("--gguf", help="GGUF file (unused)")
    b.add_argument("--calib", help="int64 [N, T] calibration windows (.npy; causal LMs)")
    b.add_argument("--calib-feeds", help="encoder calibration batches (.npz of <input>.<batch> arrays)")
    b.add_argument("--out", required=True)
    lg = sub.add_parser("logits", help="write float32 logits [N, T, V] for each window")
    lg.add_argument("--out", required=True)
    lg.add_argument("--windows", required=True)
    lg.add_argument("--logits", required=True)
    lg.add_argument("--threads", type=int, default=2)
    sp = sub.add_parser("speed", help="time prefill of a prompt (median of 3)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--new-tokens", type=int, default=64, help="accepted for the protocol; no KV cache")
    sp.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.cmd == "configs":
        print(json.dumps(list(ENCODER_CONFIGS if args.kind == "encoder" else CONFIGS)))
        return
    if args.cmd == "build":
        encoder = args.kind == "encoder"
        offered, need = (ENCODER_CONFIGS, "calib_feeds") if encoder else (CONFIGS, "calib")
        if args.config not in offered:
            parser.error(f"--config {args.config!r}: {args.kind} configurations are {list(offered)}")
        if getattr(args, need) is None:
            parser.error(f"a {args.kind} build needs --{need.replace('_', '-')}")
        if encoder:
            return build_encoder(args)
    {"build": build, "logits": logits, "speed": speed}[args.cmd](args)


if __name__ == "__main__":
    main()
