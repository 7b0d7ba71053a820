"""Per-op kernel time of W4A8 on SmolLM2's linear shapes: GroupQuant + MatMulLowbit(float32)
against MatMulLowbit(act_mode=int8_group), with ORT's FP32 MatMul (MLAS SGEMM) for reference.

``python -m lowbit.bench.kernel_bench [--threads 1 2] [--rows 1 128] [--repeat 3]`` prints a
Markdown table. Each case is one ONNX model holding ``copies`` independent copies of the op
(distinct random dINT4 weights, block 32, float32 block scales, packed by ``pack_matmul_weight``)
reading one input A[M, K]: together the copies hold >= ``stream_mb`` MB of weights, so every op
streams its weights from DRAM as in a real decode step (SmolLM2's 30 layers hold 66 MB of codes +
scales). The time of an op is ONNX Runtime's own profile of its kernel (``*_kernel_time`` events:
no Python, no output copies, but ORT's fixed per-node cost, ~4 us for its own MatMul too); a
measurement is the median over copies and runs of one session (one alive at a time), and the table
keeps the best of ``--repeat`` measurements per cell, the variants taking turns between them (a
shared machine's load only adds time). ``bound`` = (codes + scales bytes) / 26.7 GB/s, the DRAM
bandwidth bench/DEPLOY.md measured with a numpy copy (``--gbps`` overrides it).

Assumes the native library is built (``make native``); ``LOWBIT_ORT_ISA`` selects the kernels as
for any session (the table names the set in use).
"""

from __future__ import annotations

__all__ = ["SHAPES", "measure", "run", "main"]

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576)}
VARIANTS = ("gq_f32", "int8_group", "fp32")
LABELS = {"gq_f32": "GroupQuant + f32", "int8_group": "int8_group", "fp32": "FP32 MatMul"}
GROUP, BLOCK = 64, 32
OPSET, IR_VERSION = 21, 10


def _lowbit_nodes(i: int, k: int, n: int, variant: str, rng) -> tuple[list, list]:
    from lowbit import formats
    from lowbit import runtime_ext as rx

    w = rng.standard_normal((k, n)).astype(np.float32)
    packed = rx.pack_matmul_weight(formats.encode(w, "dint4", axis=0, block_size=BLOCK))
    inits = [numpy_helper.from_array(arr, f"{name}{i}") for name, arr in packed.arrays.items()]
    names = [f"codes{i}", f"scales{i}", f"global_scale{i}"]
    if variant == "int8_group":
        spec = packed.matmul_spec("int8_group", GROUP)
        return [rx.make_matmul_node("A", *names, f"Y{i}", spec, name=f"op{i}")], inits
    inits.append(numpy_helper.from_array(np.full((k // GROUP, 1), 127, np.float32), f"qmax{i}"))
    gq = rx.make_group_quant_node("A", f"qmax{i}", f"Aq{i}", GROUP, name=f"gq{i}")
    return [gq, rx.make_matmul_node(f"Aq{i}", *names, f"Y{i}", packed.matmul_spec(), name=f"op{i}")], inits


def _model(k: int, n: int, variant: str, copies: int, seed: int = 0) -> onnx.ModelProto:
    """``copies`` ops (nodes op<i>, with GroupQuant gq<i> before each in gq_f32) reading A."""
    from lowbit import runtime_ext as rx

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for i in range(copies):
        if variant == "fp32":
            w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
            nodes.append(helper.make_node("MatMul", ["A", f"W{i}"], [f"Y{i}"], name=f"op{i}"))
            inits.append(numpy_helper.from_array(w, f"W{i}"))
        else:
            more_nodes, more_inits = _lowbit_nodes(i, k, n, variant, rng)
            nodes += more_nodes
            inits += more_inits
    outputs = [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, ["M", n]) for i in range(copies)]
    graph = helper.make_graph(nodes, "copies", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              outputs, inits)
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)])
    return rx.attach_functions(model) if variant != "fp32" else model


def weight_bytes(k: int, n: int, variant: str) -> int:
    """Bytes one op reads for its weights: codes + float32 block scales, or float32 W."""
    return k * n * 4 if variant == "fp32" else k * n // 2 + n * (k // BLOCK) * 4


def _copies(k: int, n: int, variant: str, stream_mb: float) -> int:
    return max(2, min(400, int(np.ceil(stream_mb * 2**20 / weight_bytes(k, n, variant)))))


def _session(model: onnx.ModelProto, variant: str, threads: int, profile_dir: str):
    import onnxruntime as ort

    from lowbit import runtime_ext as rx

    opts = ort.SessionOptions() if variant == "fp32" else rx.session_options()
    opts.intra_op_num_threads = threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(profile_dir, variant)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _op_times(profile: str) -> list[list[float]]:
    """Per session run, the microseconds of each op copy (gq<i> + op<i> summed)."""
    with open(profile) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    seen: dict[str, int] = {}  # node name -> runs seen so far: the run an event belongs to
    runs: list[dict[str, float]] = []
    for e in events:
        node = e["name"].removesuffix("_kernel_time")
        run = seen.get(node, 0)
        seen[node] = run + 1
        while len(runs) <= run:
            runs.append({})
        copy = node.removeprefix("gq").removeprefix("op")
        runs[run][copy] = runs[run].get(copy, 0.0) + e["dur"]
    return [list(r.values()) for r in runs]


def measure(threads: int, rows=(1, 128), shapes=SHAPES, variants=VARIANTS, runs: int = 12,
            stream_mb: float = 64.0) -> dict[tuple[str, int, str], float]:
    """Median microseconds per op, keyed by (shape name, M, variant). One session is alive at a
    time: another session's idle pool threads spin and steal a core from a multi-threaded run
    (measured: 2-thread decode ops up to 1.3x longer)."""
    rng = np.random.default_rng(1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (k, n) in shapes.items():
            feeds = {m: {"A": rng.standard_normal((m, k)).astype(np.float32)} for m in rows}
            for v in variants:
                sess = _session(_model(k, n, v, _copies(k, n, v, stream_mb)), v, threads, tmp)
                for m in rows:  # warm-up (arena, pre-packing), then the row counts take turns
                    sess.run(None, feeds[m])
                for _ in range(runs):
                    for m in rows:
                        sess.run(None, feeds[m])
                per_run = _op_times(sess.end_profiling())[len(rows):]  # the warm-up runs
                del sess
                for j, m in enumerate(rows):  # run r * len(rows) + j had M = rows[j]
                    out[(name, m, v)] = statistics.median(t for r in per_run[j::len(rows)] for t in r)
    return out


def kernel_set() -> str:
    """The kernel set the native library runs in this process (LowbitKernelSet)."""
    from lowbit import runtime_ext as rx

    lib = ctypes.CDLL(str(rx.library_path()))
    lib.LowbitKernelSet.restype = ctypes.c_char_p
    return lib.LowbitKernelSet().decode()


def _table(res, threads: int, rows, shapes, gbps: float) -> list[str]:
    lines = [f"intra_op_num_threads={threads}:", "",
             "| shape (K x N) | M | bound us | GroupQuant + f32 us | int8_group us | FP32 MatMul us "
             "| int8_group / bound | speed-up vs GQ + f32 | int8_group / FP32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (k, n) in shapes.items():
        bound = weight_bytes(k, n, "int8_group") / (gbps * 1e3)
        for m in rows:
            t = {v: res[(name, m, v)] for v in VARIANTS}
            lines.append(f"| {name} {k}x{n} | {m} | {bound:.1f} | {t['gq_f32']:.1f} | {t['int8_group']:.1f} | "
                         f"{t['fp32']:.1f} | {t['int8_group'] / bound:.2f} | {t['gq_f32'] / t['int8_group']:.2f} | "
                         f"{t['int8_group'] / t['fp32']:.2f} |")
    return lines


def best_of(repeat: int, threads: int, **kw) -> dict[tuple[str, int, str], float]:
    """The smallest median of ``repeat`` measurements per cell (a shared machine's load only
    ever adds time)."""
    results = [measure(threads, **kw) for _ in range(repeat)]
    return {key: min(r[key] for r in results) for key in results[0]}


def report(threads=(1, 2), rows=(1, 128), gbps: float = 26.7, runs: int = 12, stream_mb: float = 64.0,
           repeat: int = 1) -> str:
    import onnxruntime as ort

    lines = ["## W4A8 per-op kernel time: GroupQuant + MatMulLowbit(float32) vs MatMulLowbit(int8_group)", "",
             f"ONNX Runtime {ort.__version__}, lowbit kernels `{kernel_set()}`; dINT4 block {BLOCK}, "
             f"activation groups of {GROUP}; median kernel time per op (ORT profile) with weights "
             f"streamed from DRAM, best of {repeat} measurements; bound = codes + scales at {gbps} GB/s."]
    for t in threads:
        res = best_of(repeat, t, rows=rows, runs=runs, stream_mb=stream_mb)
        lines += ["", *_table(res, t, rows, SHAPES, gbps)]
    lines += ["", "Command: `lowbit-bench kernels`."]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 128])
    p.add_argument("--gbps", type=float, default=26.7)
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--stream-mb", type=float, default=64.0,
                   help="weights of all copies of an op (MB); below the caches the weights stay hot")
    p.add_argument("--repeat", type=int, default=3, help="measurements per cell; the table keeps the best")


def run(args: argparse.Namespace) -> int:
    """``lowbit-bench kernels``: counts are checked before anything is measured (one-line errors)."""
    from lowbit.errors import LowbitError

    counts = [*args.threads, *args.rows, args.runs, args.repeat]
    if any(c < 1 for c in counts) or not (args.gbps > 0 and args.stream_mb > 0):
        raise LowbitError("--threads, --rows, --runs and --repeat must be >= 1, --gbps and --stream-mb > 0")
    print(report(tuple(args.threads), tuple(args.rows), args.gbps, args.runs, args.stream_mb, args.repeat))
    return 0


def main(argv: list[str] | None = None) -> int:
    from lowbit.bench.cli import main as bench_main

    return bench_main(["kernels", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
