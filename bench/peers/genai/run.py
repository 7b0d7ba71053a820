"""Peer runner for ONNX Runtime GenAI: its model builder quantizes, its generator runs.

Builds SmolLM2 from the Hugging Face directory with `onnxruntime_genai.models.builder`
(fused GroupQueryAttention graph with a KV cache, CPU execution provider) and runs it with
`onnxruntime_genai`'s Generator, the path the tool's users run. Configurations:

  int4              builder defaults for `-p int4 -e cpu`: MatMulNBits int4 symmetric, blocks of 32,
                    accuracy_level 4 (int8 activations, the CPU default), RTN; the tied embedding
                    reuses the int4 LM-head weights (GatherBlockQuantized).
  int4-kquant       the same with algo_config=k_quant (k-quant weight search, still all int4).
  int4-kquant-mixed algo_config=k_quant_mixed: k_quant int4 body, LM head and the
                    quantization-sensitive MatMuls (llama.cpp "mixed" choice) in int8.
                    (k_quant stores zero points, so both k_quant configs are asymmetric.)
  fp32              `-p fp32 -e cpu`: the same fused graph unquantized (accuracy/speed reference).

No configuration calibrates (the builder's weight-only methods are data-free).
Threads are set through the genai config overlay (decoder session_options.intra_op_num_threads).
`speed` times prefill as append_tokens + the first greedy pick, then --new-tokens decode steps.
See bench/peers/PROTOCOL.md for the subcommands and the files they write.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

CONFIGS = {
    "int4": ("int4", []),
    "int4-kquant": ("int4", ["algo_config=k_quant"]),
    "int4-kquant-mixed": ("int4", ["algo_config=k_quant_mixed"]),
    "fp32": ("fp32", []),
}

FLOAT_BITS = {1: 32, 10: 16, 16: 16}  # onnx TensorProto FLOAT, FLOAT16, BFLOAT16


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def versions():
    from importlib.metadata import version

    names = ["onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "torch", "transformers"]
    return {n: version(n) for n in names}


def weight_stats(model_path):
    """Bits per linear-layer weight (packed weights + scales + zero points) and the MatMulNBits settings."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}

    def storage_bits(name):
        t = inits[name]
        bits = FLOAT_BITS.get(t.data_type, 8)  # quantized weights/zero points are packed into uint8
        return int(np.prod(t.dims)) * bits

    weights = bits = 0
    settings = set()
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            weights += a["K"] * a["N"]
            bits += sum(storage_bits(n) for n in node.input[1:4] if n in inits)
            asym = len(node.input) > 3 and node.input[3] in inits
            settings.add((a["bits"], a["block_size"], a.get("accuracy_level", 0), "asym" if asym else "sym"))
        elif node.op_type == "MatMul" and node.input[1] in inits:
            weights += int(np.prod(inits[node.input[1]].dims))
            bits += storage_bits(node.input[1])
    embedding_bits = [onnx.helper.get_attribute_value(x) for n in m.graph.node if n.op_type == "GatherBlockQuantized"
                      for x in n.attribute if x.name == "bits"]
    return bits / weights, sorted(settings), (embedding_bits or [None])[0]


def build(args):
    out = pathlib.Path(args.out)
    precision, extra = CONFIGS[args.config]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", args.hf, "-o", str(out / "model"),
           "-p", precision, "-e", "cpu", "-c", str(out / "cache")]
    if extra:
        cmd += ["--extra_options", *extra]
    log("running: " + " ".join(cmd) + f"  (builder log: {out / 'build.log'})")
    t0 = time.perf_counter()
    with open(out / "build.log", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = (out / "build.log").read_text().strip().splitlines()[-1:]
        result = {"config": args.config, "unavailable": f"builder exited {rc}: {' '.join(tail)}"}
    else:
        bpw, settings, embedding_bits = weight_stats(out / "model" / "model.onnx")
        grid = "fp32 weights" if not settings else "; ".join(
            f"int{b} {s}, groups of {bs}, accuracy_level {al}" for b, bs, al, s in settings)
        result = {
            "config": args.config,
            "model": "model",
            "runtime": "onnxruntime-genai",
            "compile_seconds": round(seconds, 2),
            "weight_grid": f"{grid} ({' '.join(extra) or 'builder defaults'}); tied embedding: "
                           + (f"GatherBlockQuantized on the int{embedding_bits} LM-head weights" if embedding_bits else "float"),
            "bits_per_weight": round(bpw, 4),
            "calibration_windows": 0,
            "versions": versions(),
            "note": " ".join(["onnxruntime_genai.models.builder -p", precision, "-e cpu", *extra])
                    + "; data-free (no calibration); compile_seconds is the whole builder run"
                    " (HF load + graph + quantize + save).",
        }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    log(json.dumps(result))


def load_model(out, threads):
    import onnxruntime_genai as og

    config = og.Config(str(pathlib.Path(out) / "model"))
    opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
    return og, og.Model(config)


def logits(args):
    og, model = load_model(args.out, args.threads)
    windows = np.load(args.windows)
    n, t = windows.shape
    dest = None
    for i in range(n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=t + 1)
        gen = og.Generator(model, params)  # fresh generator: empty KV cache
        gen.append_tokens(windows[i:i + 1])  # one forward over the whole window
        out = np.asarray(gen.get_output("logits"), dtype=np.float32)[0]
        if dest is None:
            dest = np.lib.format.open_memmap(args.logits, mode="w+", dtype=np.float32, shape=(n, t, out.shape[-1]))
        dest[i] = out
        log(f"window {i + 1}/{n}")
    dest.flush()


def speed(args):
    og, model = load_model(args.out, args.threads)
    prompt = np.load(args.prompt).reshape(1, -1)
    total = prompt.shape[1] + args.new_tokens + 1
    prefill, decode = [], []
    for rep in range(4):  # the first run warms up and is not counted
        params = og.GeneratorParams(model)
        # greedy; min_length keeps EOS from ending the run early
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)  # prefill forward
        gen.generate_next_token()  # picks the first new token from the prefill logits
        t1 = time.perf_counter()
        for _ in range(args.new_tokens):  # each call: one decode forward + greedy pick
            gen.generate_next_token()
        t2 = time.perf_counter()
        if rep:
            prefill.append((t1 - t0) * 1e3)
            decode.append((t2 - t1) * 1e3 / args.new_tokens)
    print(json.dumps({"prefill_ms": round(statistics.median(prefill), 3),
                      "decode_ms_per_token": round(statistics.median(decode), 3), "threads": args.threads}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("configs", help="print the configurations as a JSON list")
    b = sub.add_parser("build", help="build one configuration into --out")
    b.add_argument("--config", required=True, choices=list(CONFIGS))
    for name in ("--onnx", "--gguf", "--calib"):
        b.add_argument(name, help="accepted for the protocol, unused by this peer")
    b.add_argument("--hf", required=True, help="Hugging Face directory (read only; the builder does not write there)")
    b.add_argument("--out", required=True)
    lg = sub.add_parser("logits", help="full-window logits, one window per forward from an empty KV cache")
    lg.add_argument("--out", required=True)
    lg.add_argument("--windows", required=True)
    lg.add_argument("--logits", required=True)
    lg.add_argument("--threads", type=int, default=2)
    sp = sub.add_parser("speed", help="prefill + greedy decode timing through the genai Generator")
    sp.add_argument("--out", required=True)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--new-tokens", type=int, default=64)
    sp.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()
    if args.cmd == "configs":
        print(json.dumps(list(CONFIGS)))
    else:
        {"build": build, "logits": logits, "speed": speed}[args.cmd](args)


if __name__ == "__main__":
    main()
