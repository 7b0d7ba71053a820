"""Single-layer latency of the lowbit MatMulLowbit kernels against ORT's own paths.

``python -m lowbit.bench.runtime_bench`` prints a Markdown section; :func:`run` returns it (the
lead places it in bench/RESULTS.md). Cases: Y = A[M, K] @ W[K, N] for GEMV (M=1) and GEMM
(M=128) on 576x1536, 1536x576 and 4096x4096 weights (K x N, SmolLM2's q/up, down and a large
layer), each as one ONNX model run by ONNX Runtime CPU:

- FP32 MatMul (MLAS sgemm);
- ORT MatMulNBits 4-bit, block 32, symmetric (``MatMulNBitsQuantizer``, accuracy_level 4 =
  int8 activations inside, ORT's fastest CPU path) - the speed anchor;
- lowbit MatMulLowbit dINT4 (block 32) and NVFP4 (block 16, E4M3 scale bytes) with float32
  activations, and dINT4 W4A8 (int8_dynamic activations).

Assumes the native library is built (``make native``). Weights are random normal, encoded with
lowbit.formats (kernel time does not depend on values). Timing: median of repeated
``session.run`` after warm-up, the variants taking turns (so load drift hits all alike),
sequential execution, intra_op_num_threads stated. With one thread ORT computes on the calling
thread, so that table reports the calling thread's CPU time (robust on a shared machine); with
more threads it reports wall time.
"""

from __future__ import annotations

__all__ = ["run", "main", "SHAPES", "ROWS"]

import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPES = ((576, 1536), (1536, 576), (4096, 4096))  # (K, N)
ROWS = (1, 128)
OPSET, IR_VERSION = 21, 10
VARIANTS = ("fp32", "nbits", "dint4", "nvfp4", "dint4_w4a8")
LABELS = {
    "fp32": "FP32 MatMul", "nbits": "MatMulNBits 4b/32", "dint4": "lowbit dINT4/32",
    "nvfp4": "lowbit NVFP4/16", "dint4_w4a8": "lowbit dINT4 W4A8",
}


def _graph_model(nodes, inits, k: int, n: int, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    return helper.make_model(graph, ir_version=IR_VERSION,
                             opset_imports=[helper.make_opsetid("", OPSET), *extra_opsets])


def _fp32_model(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    return _graph_model([helper.make_node("MatMul", ["A", "W"], ["Y"])],
                        [numpy_helper.from_array(w, "W")], k, n)


def _nbits_model(w: np.ndarray) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(_fp32_model(w), bits=4, block_size=32, is_symmetric=True,
                             accuracy_level=4)
    q.process()
    model = q.model.model
    if not any(nd.op_type == "MatMulNBits" for nd in model.graph.node):
        raise RuntimeError("MatMulNBitsQuantizer did not produce a MatMulNBits node")
    return model


def _lowbit_model(w: np.ndarray, fmt: str, block: int, scale_dtype: str, act_mode: str):
    from lowbit import formats
    from lowbit import runtime_ext as rx

    k, n = w.shape
    packed = rx.pack_matmul_weight(formats.encode(w, fmt, axis=0, block_size=block),
                                   scale_dtype=scale_dtype)
    inits = [numpy_helper.from_array(arr, name) for name, arr in packed.arrays.items()]
    node = rx.make_matmul_node("A", "codes", "scales", "global_scale", "Y",
                               packed.matmul_spec(act_mode))
    model = _graph_model([node], inits, k, n, [helper.make_opsetid(rx.DOMAIN, 1)])
    return rx.attach_functions(model)


def _build(variant: str, w: np.ndarray) -> onnx.ModelProto:
    if variant == "fp32":
        return _fp32_model(w)
    if variant == "nbits":
        return _nbits_model(w)
    if variant == "dint4":
        return _lowbit_model(w, "dint4", 32, "float32", "float32")
    if variant == "nvfp4":
        return _lowbit_model(w, "nvfp4", 16, "uint8", "float32")
    return _lowbit_model(w, "dint4", 32, "float32", "int8_dynamic")


def _time_round_robin(sessions: dict, a: np.ndarray, min_seconds: float,
                      max_rounds: int, clock) -> dict[str, float]:
    """Median ms per session; the sessions take turns so machine-load drift hits all alike."""
    feed = {"A": a}
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, feed)
    samples: dict[str, list[float]] = {v: [] for v in sessions}
    start = time.perf_counter()
    rounds = 0
    while rounds < 5 or (time.perf_counter() - start < min_seconds and rounds < max_rounds):
        for v, sess in sessions.items():
            t0 = clock()
            sess.run(None, feed)
            samples[v].append((clock() - t0) * 1e3)
        rounds += 1
    return {v: statistics.median(s) for v, s in samples.items()}


def measure(threads: int = 2, min_seconds: float = 1.0, max_rounds: int = 200,
            shapes=SHAPES, rows=ROWS, variants=VARIANTS) -> dict[tuple[int, int, int, str], float]:
    """Median ms per (K, N, M, variant)."""
    import onnxruntime as ort

    from lowbit import runtime_ext as rx

    rng = np.random.default_rng(0)
    out: dict[tuple[int, int, int, str], float] = {}
    for k, n in shapes:
        w = rng.standard_normal((k, n)).astype(np.float32) * np.float32(0.05)
        sessions = {}
        for variant in variants:
            opts = rx.session_options() if variant.startswith(("dint4", "nvfp4")) \
                else ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            sessions[variant] = ort.InferenceSession(_build(variant, w).SerializeToString(),
                                                     opts, providers=["CPUExecutionProvider"])
        for m in rows:
            a = rng.standard_normal((m, k)).astype(np.float32)
            clock = time.thread_time if threads == 1 else time.perf_counter
            for v, ms in _time_round_robin(sessions, a, min_seconds, max_rounds, clock).items():
                out[(k, n, m, v)] = ms
    return out


def _table(res: dict[tuple[int, int, int, str], float], shapes, rows) -> list[str]:
    head = "| K x N | M | " + " | ".join(LABELS[v] for v in VARIANTS) + \
           " | dINT4 / FP32 | dINT4 / NBits |"
    lines = [head, "|" + "---|" * (len(VARIANTS) + 4)]
    for k, n in shapes:
        for m in rows:
            t = {v: res[(k, n, m, v)] for v in VARIANTS}
            cells = " | ".join(f"{t[v]:.3f}" for v in VARIANTS)
            lines.append(f"| {k}x{n} | {m} | {cells} | {t['dint4'] / t['fp32']:.2f} | "
                         f"{t['dint4'] / t['nbits']:.2f} |")
    return lines


def run(threads: tuple[int, ...] = (1, 2), shapes=SHAPES, rows=ROWS) -> str:
    """Measure and return the Markdown section (one table per thread count)."""
    import onnxruntime as ort

    from lowbit import runtime_ext as rx

    lines = [
        "## Single-layer MatMul latency (lowbit native ops vs ORT)",
        "",
        f"ONNX Runtime {ort.__version__} CPU, sequential execution; median ms per "
        "`session.run` (Y = A[M, K] @ W[K, N]); lowbit kernels: "
        f"`{rx.library_path().name}`. MatMulNBits: 4-bit symmetric, block 32, accuracy_level 4 "
        "(int8 activations). lowbit dINT4/NVFP4 use float32 activations; W4A8 quantizes "
        "activations to int8 per row (dynamic).",
    ]
    for t in threads:
        res = measure(threads=t, shapes=shapes, rows=rows)
        clock = "calling-thread CPU time" if t == 1 else "wall time"
        lines += ["", f"intra_op_num_threads={t} ({clock}):", "", *_table(res, shapes, rows)]
    lines += ["", "Command: `python -m lowbit.bench.runtime_bench`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    print(run())


if __name__ == "__main__":
    main()
