"""AMD Quark (``amd-quark``) ONNX quantizer as a lowbit bench peer.

Quantizes the FP32 ONNX export with Quark's ONNX flow (``quark.onnx.ModelQuantizer``) and runs
the result in ONNX Runtime on CPU. Configurations:

  int8-sq        W8A8 QDQ: uint8 asymmetric activations (MinMax, moving average, as in Quark's
                 INT8_TRANSFORMER_DEFAULT preset), int8 symmetric per-channel weights, MatMul
                 only, SmoothQuant (alpha 0.5) first.
  int4-gptq      MatMulNBits 4-bit (GPTQ, group 32), contrib op of ONNX Runtime.
  int4-hqq       MatMulNBits 4-bit (HQQ, group 32), data free.
  int4-rtn       MatMulNBits 4-bit, Quark's DEFAULT algorithm (round to nearest), asymmetric,
                 group 32, data free.
  mxint8         MXINT8 (int8 elements, shared power-of-two scale per 32) on weights and
                 activations, as Quark's MXQuantizeDequantize custom op (needs Quark's
                 custom-op library at run time).

Encoder configuration (``--kind encoder``, MiniLM), calibrated on the bench's feed batches (one
batch of 16 padded paragraphs per calibration step):

  int8           W8A8 QDQ for ONNX Runtime's CPU int8 kernels: int8 symmetric per-channel weights,
                 uint8 asymmetric per-tensor activations (MinMax, moving average), MatMul inputs only.
                 Two of Quark's options differ from its defaults: OpTypesToExcludeOutputQuantization
                 ["MatMul"] (Quark otherwise also quantizes every MatMul output, the bias Add's input:
                 embedding cosine ~0.94 instead of ~0.99 here) and DedicatedQDQPair (the Q/K/V MatMuls
                 get their own Q/DQ pair, so the residual Add beside them reads the float LayerNorm
                 output). SmoothQuant (alpha 0.5) lowered the cosine here, so it is not used.

Protocol: bench/peers/PROTOCOL.md (subcommands ``configs``, ``build``, ``logits``, ``speed``).
Run with the peer venv's Python; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

CONFIGS = ["int8-sq", "int4-gptq", "int4-hqq", "int4-rtn", "mxint8"]
GROUP = 32
GPTQ_BATCH = 8  # Quark's ONNX GPTQ reads only the first calibration batch: make it 8 windows.
NEEDS_CUSTOM_OPS = {"mxint8"}
ENCODER_CONFIGS = ["int8"]


def log(msg: str) -> None:
    print(f"[quark] {msg}", file=sys.stderr, flush=True)


class WindowReader:
    """Quark/ORT CalibrationDataReader over token windows, ``batch`` windows per feed."""

    def __init__(self, windows: np.ndarray, batch: int = 1) -> None:
        self.feeds = [{"input_ids": windows[i : i + batch]} for i in range(0, len(windows), batch)]
        self.pos = 0

    def get_next(self) -> dict | None:
        if self.pos >= len(self.feeds):
            return None
        self.pos += 1
        return self.feeds[self.pos - 1]

    def rewind(self) -> None:
        self.pos = 0


class FeedsReader(WindowReader):
    """The encoder calibration batches of FEEDS.npz (arrays ``<input>.<batch>``), one per feed."""

    def __init__(self, path: str) -> None:
        batches: dict[int, dict[str, np.ndarray]] = {}
        with np.load(path) as z:
            for key in z.files:
                name, i = key.rsplit(".", 1)
                batches.setdefault(int(i), {})[name] = z[key].astype(np.int64)
        self.feeds = [batches[i] for i in sorted(batches)]
        self.pos = 0


def make_encoder_qconfig(name: str):
    """(QConfig, weight_grid text) of an encoder configuration."""
    from quark.onnx import CalibMethod, Int8Spec, QConfig, QLayerConfig, QuantGranularity, UInt8Spec

    if name != "int8":
        raise SystemExit(f"unknown encoder config {name!r}; choose from {ENCODER_CONFIGS}")
    layer = QLayerConfig(
        activation=UInt8Spec(calibration_method=CalibMethod.MinMax),
        weight=Int8Spec(quant_granularity=QuantGranularity.Channel),
    )
    opts = {
        "OpTypesToQuantize": ["MatMul"],
        "MatMulConstBOnly": True,
        "CalibMovingAverage": True,
        "OpTypesToExcludeOutputQuantization": ["MatMul"],
        "DedicatedQDQPair": True,
    }
    return QConfig(global_config=layer, **opts), (
        "int8 symmetric per-channel weights, uint8 asymmetric per-tensor activations (MinMax, moving average), "
        "MatMul inputs only (no MatMul output QDQ, dedicated QDQ pairs)")


def make_qconfig(name: str):
    """Return (QConfig, calibration windows used, weight_grid text) for one configuration."""
    from quark.onnx import (
        CalibMethod,
        GPTQConfig,
        Int8Spec,
        MXInt8Spec,
        QConfig,
        QLayerConfig,
        QuantGranularity,
        SmoothQuantConfig,
        UInt8Spec,
    )

    if name == "int8-sq":
        layer = QLayerConfig(
            activation=UInt8Spec(calibration_method=CalibMethod.MinMax),
            weight=Int8Spec(quant_granularity=QuantGranularity.Channel),
        )
        opts = {"OpTypesToQuantize": ["MatMul"], "MatMulConstBOnly": True, "CalibMovingAverage": True}
        cfg = QConfig(global_config=layer, algo_config=[SmoothQuantConfig(alpha=0.5)], **opts)
        return cfg, 32, "int8 symmetric per-channel weights, uint8 asymmetric per-tensor activations (MinMax, moving average), SmoothQuant alpha 0.5, MatMul only"
    if name in ("int4-gptq", "int4-hqq", "int4-rtn"):
        algo = {"int4-gptq": "GPTQ", "int4-hqq": "HQQ", "int4-rtn": "DEFAULT"}[name]
        opts = {
            "UseMatMulNBits": True,
            "MatMulNBitsParams": {
                "Algorithm": algo,
                "GroupSize": GROUP,
                "Bits": 4,
                "Symmetric": algo == "GPTQ",
                "AccuracyLevel": 0,
            },
        }
        algos = []
        if algo == "GPTQ":
            algos = [GPTQConfig(bits=4, group_size=GROUP, block_size=128, perc_damp=0.01, act_order=False)]
        cfg = QConfig(global_config=QLayerConfig(activation=UInt8Spec(), weight=Int8Spec()), algo_config=algos, **opts)
        if algo == "GPTQ":
            return cfg, GPTQ_BATCH, f"int4 MatMulNBits, groups of {GROUP}, GPTQ (damp 0.01, no act-order), symmetric"
        if algo == "HQQ":
            return cfg, 0, f"uint4 MatMulNBits, groups of {GROUP}, HQQ (asymmetric, float zero points)"
        return cfg, 0, f"uint4 MatMulNBits, groups of {GROUP}, round to nearest, asymmetric min/max (uint4 zero points)"
    if name == "mxint8":
        cfg = QConfig(global_config=QLayerConfig(activation=MXInt8Spec(), weight=MXInt8Spec()))
        return cfg, 0, "MXINT8: int8 elements with a shared E8M0 scale per block of 32, weights and activations (fake-quant custom op)"
    raise SystemExit(f"unknown config {name!r}; choose from {CONFIGS}")


def linear_bits(model_path: Path) -> float | None:
    """Bits per weight of the quantized MatMul weights, scales and zero points (lm_head counted if quantized)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=True)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    bits = 0
    elems = 0
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            elems += attrs["K"] * attrs["N"]
            bits += sum(inits[x].nbytes * 8 for x in n.input[1:] if x in inits)
    producers = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in producers:
            continue
        dq = producers[n.input[1]]
        if dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            elems += inits[dq.input[0]].size
            bits += sum(inits[x].nbytes * 8 for x in dq.input if x in inits)
    return round(bits / elems, 4) if elems else None


def build(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"config": args.config}
    try:
        from quark.onnx import ModelQuantizer

        if args.kind == "encoder":
            cfg, grid = make_encoder_qconfig(args.config)
            reader = FeedsReader(args.calib_feeds)
            n_calib = len(reader.feeds)
        else:
            cfg, n_calib, grid = make_qconfig(args.config)
            windows = np.load(args.calib).astype(np.int64)
            batch = GPTQ_BATCH if args.config == "int4-gptq" else 1
            reader = WindowReader(windows[: max(n_calib, 1) if n_calib else 1], batch=batch)
        model_path = out / "model.onnx"
        log(f"quantizing {args.onnx} as {args.config}")
        t0 = time.time()
        # Quark only reads the input (its caches go to its own temporary directories).
        ModelQuantizer(cfg).quantize_model(str(args.onnx), str(model_path), calibration_data_reader=reader)
        seconds = time.time() - t0
        if not model_path.exists():
            raise RuntimeError("Quark wrote no model (see its log above)")
        # Keep weights beside the graph in one external file so the directory is self-contained.
        import onnx

        m = onnx.load(str(model_path))
        for f in out.iterdir():
            if f.name not in ("model.onnx",):
                f.unlink() if f.is_file() else shutil.rmtree(f)
        onnx.save_model(m, str(model_path), save_as_external_data=True, location="model.onnx.data")
        result.update(
            model="model.onnx",
            runtime="onnxruntime",
            compile_seconds=round(seconds, 1),
            weight_grid=grid,
            bits_per_weight=linear_bits(model_path),
            calibration_windows=n_calib,
            versions={p: version(p) for p in ("amd-quark", "onnxruntime", "onnx", "torch", "numpy")},
            note=encoder_note(n_calib) if args.kind == "encoder" else note_for(args.config),
        )
    except Exception as exc:  # a configuration that cannot run here is reported, not hidden
        log(f"build failed: {exc!r}")
        result["unavailable"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    log(json.dumps(result))


def note_for(config: str) -> str:
    common = (
        "Quark ONNX flow on the FP32 export; the tied lm_head is a MatMul on a Transpose of the "
        "embedding (no constant weight), so Quark leaves it and the embedding Gather in FP32. "
    )
    return common + {
        "int8-sq": "Calibrated on all 32 windows, one window per batch. QDQ graph run by ORT's CPU int8 kernels.",
        "int4-gptq": (
            "Quark's ONNX GPTQ builds each Hessian from the first calibration batch only; that batch is "
            f"{GPTQ_BATCH} windows. Quark then re-derives per-group scales from the GPTQ output when packing MatMulNBits."
        ),
        "int4-hqq": "HQQ is data free (no calibration windows).",
        "int4-rtn": "Data free; Quark's default MatMulNBits algorithm (ONNX Runtime's block quantizer), asymmetric.",
        "mxint8": "Runs with Quark's custom-op library (quark.onnx.get_library_path()) registered in ORT; weights stay FP32 in the file and are quantized-dequantized at run time.",
    }[config]


def encoder_note(batches: int) -> str:
    return (
        f"Quark ONNX flow on the FP32 encoder export, calibrated on all {batches} feed batches (one per step). "
        "The LayerNorm output feeding each FFN has one quantized consumer (the up-projection), so its Q/DQ pair "
        "is shared with the residual Add beside it (dedicated pairs are made only for tensors with several "
        "quantized consumers); the embedding Gathers, LayerNorms, attention and GELU stay FP32. QDQ graph run "
        "by ORT's CPU int8 kernels, no custom ops."
    )


def session(out_dir: Path, threads: int):
    import onnxruntime as ort

    res = json.loads((out_dir / "result.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if res["config"] in NEEDS_CUSTOM_OPS:
        from quark.onnx import get_library_path

        so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(str(out_dir / res["model"]), so, providers=["CPUExecutionProvider"])


def logits(args: argparse.Namespace) -> None:
    sess = session(Path(args.out), args.threads)
    wins = np.load(args.windows).astype(np.int64)
    dst = None
    for i, w in enumerate(wins):
        y = sess.run(["logits"], {"input_ids": w[None]})[0][0]
        if dst is None:
            dst = np.lib.format.open_memmap(args.logits, mode="w+", dtype=np.float32, shape=(len(wins), *y.shape))
        dst[i] = y
        log(f"window {i + 1}/{len(wins)}")
    dst.flush()


def speed(args: argparse.Namespace) -> None:
    sess = session(Path(args.out), args.threads)
    prompt = np.load(args.prompt).astype(np.int64).reshape(1, -1)
    sess.run(["logits"], {"input_ids": prompt})  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        sess.run(["logits"], {"input_ids": prompt})
        times.append((time.perf_counter() - t0) * 1000)
    print(
        json.dumps(
            {
                "prefill_ms": round(statistics.median(times), 2),
                "decode_ms_per_token": None,
                "decode_note": "the exported graph has no KV cache, so a decode step would re-run the whole sequence; not a fair decode",
                "threads": args.threads,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("configs", help="print the configurations as a JSON list")
    c.add_argument("--kind", choices=["causal-lm", "encoder"], default="causal-lm")
    b = sub.add_parser("build", help="quantize one configuration into --out")
    b.add_argument("--kind", choices=["causal-lm", "encoder"], default="causal-lm")
    b.add_argument("--config", required=True)
    for flag in ("--onnx", "--hf", "--gguf", "--calib", "--calib-feeds", "--out"):
        b.add_argument(flag, required=flag in ("--onnx", "--out"))
    lg = sub.add_parser("logits", help="write float32 logits [N, T, V] for each window")
    lg.add_argument("--out", required=True)
    lg.add_argument("--windows", required=True)
    lg.add_argument("--logits", required=True)
    lg.add_argument("--threads", type=int, default=os.cpu_count())
    sp = sub.add_parser("speed", help="prefill time of a prompt (median of 3)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--new-tokens", type=int, default=64)
    sp.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()
    if args.cmd == "configs":
        print(json.dumps(ENCODER_CONFIGS if args.kind == "encoder" else CONFIGS))
        return
    if args.cmd == "build":
        offered, need = (ENCODER_CONFIGS, "calib_feeds") if args.kind == "encoder" else (CONFIGS, "calib")
        if args.config not in offered:
            ap.error(f"--config {args.config!r}: {args.kind} configurations are {offered}")
        if getattr(args, need) is None:
            ap.error(f"a {args.kind} build needs --{need.replace('_', '-')}")
    {"build": build, "logits": logits, "speed": speed}[args.cmd](args)


if __name__ == "__main__":
    main()
