"""The ``ort-cpu`` deploy target on SmolLM2-135M: perplexity vs ``qdq``, speed, file size.

``run() -> str`` returns Markdown (``python -m lowbit.bench.ortcpu_bench``). What it measures, so
the numbers can be trusted:

- perplexity on 8 evaluation windows x 512 tokens of the torch-dynamo export, for the same weight
  recipe (``w8`` with dINT4 weights in blocks of 32 along K, weight-only, RTN) compiled to
  ``qdq`` and to ``ort-cpu``. ``qdq`` is run twice: with ORT's default optimizations and at
  ``ORT_ENABLE_BASIC`` (the graph executed as written); since lowbit.emit.fusion_barrier both
  compute the same. ``ort-cpu`` runs with the lowbit library; it should equal them to float32
  summation order.
- speed on the optimum KV-cache export (``ORTModelForCausalLM``'s form): median prefill of 128
  tokens (batch 1) and median one-token decode step after that prefill, all contenders in one
  run with the same ``intra_op_num_threads``; decode tokens/s = 1000 / decode ms. Contenders: FP32,
  ONNX Runtime ``MatMulNBitsQuantizer`` 4-bit (symmetric, blocks of 32, its default
  accuracy_level; lm_head stays FP32 because it reaches its MatMul through a Transpose), lowbit
  ``qdq`` and lowbit ``ort-cpu`` (embeddings packed, float32 or dynamic int8 activations).
- file size: ``model.onnx`` plus external data, vs the FP32 export.
- a decode-step profile (ORT's profiler, per op type) of FP32 and of ``ort-cpu``, to show what
  limits decode.

The machine is shared (2 cores, other jobs): read ratios of the same run, not absolute times.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["run", "perplexity_rows", "speed_rows", "decode_profile"]

log = logging.getLogger(__name__)

WEIGHTS = ["weights.format=dint4", "weights.block_size=32"]  # weight-only dINT4, blocks of 32
PREFILL = 128


@dataclass(frozen=True)
class _Variant:
    name: str
    description: str
    build: Callable[[Path, Path], Path]  # (fp32 export dir, work dir) -> model dir or file
    native: bool  # needs the lowbit library registered


def _lowbit(target: str, extra: list[str]) -> Callable[[Path, Path], Path]:
    def build(export: Path, work: Path) -> Path:
        import lowbit

        return lowbit.compile(export, "w8", target=target, overrides=WEIGHTS + extra).save(work)
    return build


def _fp32(export: Path, work: Path) -> Path:
    return export


def _matmul_nbits(export: Path, work: Path) -> Path:
    import shutil

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from lowbit.models.export import fix_ir_version

    work.mkdir(parents=True, exist_ok=True)
    for f in export.iterdir():  # config / tokenizer, as optimum wants them
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, work / f.name)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(export / "model.onnx")), bits=4, block_size=32,
                                     is_symmetric=True, op_types_to_quantize=("MatMul",))
    quantizer.process()
    # external data: a 1B model's FP32 table and lm_head alone pass protobuf's 2 GB limit
    quantizer.model.save_model_to_file(str(work / "model.onnx"), use_external_data_format=True)
    fix_ir_version(work / "model.onnx")
    return work


SPEED_VARIANTS = [
    _Variant("fp32", "FP32 optimum export", _fp32, False),
    _Variant("ort-matmulnbits", "ORT MatMulNBitsQuantizer int4 sym, block 32 (lm_head FP32)",
             _matmul_nbits, False),
    _Variant("lowbit-qdq", "lowbit qdq, dINT4/32 weights as int8 2v codes", _lowbit("qdq", []),
             False),
    _Variant("lowbit-ort-cpu", "lowbit ort-cpu, dINT4/32 packed, embeddings packed, fp32 acts",
             _lowbit("ort-cpu", ["ort_cpu.embeddings=true"]), True),
    _Variant("lowbit-ort-cpu-a8", "as above, int8 dynamic per-row activations (W4A8)",
             _lowbit("ort-cpu", ["ort_cpu.embeddings=true", "ort_cpu.dynamic_activations=true"]),
             True),
]


def _options(native: bool, threads: int, *, basic: bool = False, profile: str | None = None):
    import onnxruntime as ort

    from lowbit import runtime_ext as rx

    opts = rx.session_options() if native else ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if basic:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return opts


def _size(path: Path) -> int:
    directory = path if path.is_dir() else path.parent
    return sum(f.stat().st_size for f in directory.glob("model.onnx*"))


def perplexity_rows(work: Path, windows: np.ndarray, threads: int) -> list[dict[str, Any]]:
    """ppl of qdq (default / as written) and ort-cpu variants on the dynamo export."""
    from lowbit.models.evaluate import perplexity
    from lowbit.models.export import export_model

    export = export_model("smollm2-135m")
    cases = [  # (name, build, native, basic)
        ("fp32", _fp32, False, False),
        ("lowbit-qdq (ORT default options)", _lowbit("qdq", []), False, False),
        ("lowbit-qdq (ORT_ENABLE_BASIC: as written)", None, False, True),
        ("lowbit-ort-cpu", _lowbit("ort-cpu", []), True, False),
        ("lowbit-ort-cpu + packed embeddings", _lowbit("ort-cpu", ["ort_cpu.embeddings=true"]),
         True, False),
        ("lowbit-ort-cpu + packed embeddings + int8 dynamic acts",
         _lowbit("ort-cpu", ["ort_cpu.embeddings=true", "ort_cpu.dynamic_activations=true"]),
         True, False),
    ]
    rows, path = [], None
    for name, build, native, basic in cases:
        if build is not None:
            t0 = time.perf_counter()
            path = build(export, work / f"ppl_{len(rows)}")
            compile_s = time.perf_counter() - t0
        res = perplexity(path, windows, session_options=_options(native, threads, basic=basic),
                         progress=False)
        rows.append({"name": name, "ppl": res.ppl, "compile_s": compile_s if build else None})
        log.info("ppl %s: %.4f", name, res.ppl)
    return rows


def speed_rows(work: Path, threads: int, repeats: int) -> tuple[list[dict[str, Any]], dict]:
    """Prefill / decode latency and size of every speed variant; also returns their paths."""
    from lowbit.models.evaluate import latency
    from lowbit.models.export import export_model

    export = export_model("smollm2-135m", with_past=True)
    rows, paths = [], {}
    for v in SPEED_VARIANTS:
        path = v.build(export, work / v.name)
        paths[v.name] = (path, v.native)
        lat = latency(path, prefill_tokens=PREFILL, repeats=repeats,
                      session_options=_options(v.native, threads))
        rows.append({"name": v.name, "description": v.description, "prefill_ms": lat.prefill_ms,
                     "decode_ms": lat.decode_ms, "size": _size(path)})
        log.info("speed %s: prefill %.1f ms, decode %.2f ms", v.name, lat.prefill_ms, lat.decode_ms)
    return rows, paths


def decode_profile(path: Path, native: bool, threads: int, steps: int = 20, *,
                   prefill: bool = False) -> list[tuple[str, float]]:
    """(op type, ms per decode step) from ORT's profiler, largest first (``prefill``: per
    128-token prefill run instead)."""
    from lowbit.ort.feeds import build_feeds
    from lowbit.models.evaluate import open_session

    with tempfile.TemporaryDirectory() as tmp:
        session = open_session(path, _options(native, threads, profile=f"{tmp}/prof"))
        ids = (np.arange(PREFILL, dtype=np.int64) % 2)[None, :]
        names = [o.name for o in session.get_outputs()]
        outs = dict(zip(names, session.run(None, build_feeds(session, ids))))
        past = {n.replace("present.", "past_key_values.", 1): outs[n] for n in names
                if n.startswith("present.")}
        step = build_feeds(session, ids) if prefill else build_feeds(session, ids[:, -1:], past=past)
        for _ in range(steps):
            session.run(None, step)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    window_start = runs[1]["ts"] if len(runs) > 1 else 0  # skip the first (warm-up) prefill
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= window_start:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / steps
    return sorted(per_op.items(), key=lambda kv: -kv[1])


def _md_ppl(rows: list[dict[str, Any]]) -> list[str]:
    ref = next(r["ppl"] for r in rows if "as written" in r["name"])
    out = ["| model | ppl | vs qdq as written | compile s |", "|---|---:|---:|---:|"]
    for r in rows:
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        out.append(f"| {r['name']} | {r['ppl']:.4f} | {100 * (r['ppl'] / ref - 1):+.3f}% | {comp} |")
    return out


def _md_speed(rows: list[dict[str, Any]]) -> list[str]:
    fp32 = rows[0]
    nbits = next(r for r in rows if r["name"] == "ort-matmulnbits")
    out = ["| contender | prefill 128 ms | prefill / FP32 | decode ms/token | decode tok/s | "
           "decode / FP32 | decode / MatMulNBits | size MB | size / FP32 |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['prefill_ms']:.1f} | {r['prefill_ms'] / fp32['prefill_ms']:.2f} | "
            f"{r['decode_ms']:.2f} | {1000 / r['decode_ms']:.1f} | "
            f"{r['decode_ms'] / fp32['decode_ms']:.2f} | {r['decode_ms'] / nbits['decode_ms']:.2f} | "
            f"{r['size'] / 1e6:.1f} | {r['size'] / fp32['size']:.3f} |")
    return out


def _md_profile(profiles: dict[str, list[tuple[str, float]]]) -> list[str]:
    out = []
    for name, prof in profiles.items():
        total = sum(ms for _, ms in prof)
        top = ", ".join(f"{op} {ms:.2f} ms ({100 * ms / total:.0f}%)" for op, ms in prof[:6])
        out.append(f"- {name}: {total:.2f} ms of kernel time per decode step; {top}")
    return out


def run(threads: int = 1, repeats: int = 10) -> str:
    """Measure everything (about 10 minutes on 2 shared cores) and return Markdown."""
    import onnxruntime as ort

    from lowbit.models.data import evaluation_windows
    from lowbit.models.export import export_model
    from lowbit.models.registry import load_tokenizer

    windows = evaluation_windows(load_tokenizer(export_model("smollm2-135m")), 512, 8)
    with tempfile.TemporaryDirectory(prefix="lowbit_ortcpu_") as tmp:
        work = Path(tmp)
        ppl = perplexity_rows(work, windows, threads)
        speed, paths = speed_rows(work, threads, repeats)
        profiles = {name: decode_profile(paths[name][0], paths[name][1], threads)
                    for name in ("fp32", "ort-matmulnbits", "lowbit-ort-cpu", "lowbit-ort-cpu-a8")}
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "## ort-cpu target: SmolLM2-135M", "",
        "Command: `python -m lowbit.bench.ortcpu_bench`", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"load average at end {load}; onnxruntime {ort.__version__}; "
        f"intra_op_num_threads={threads}, sequential execution; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        "Weights: recipe `w8` with `weights.format=dint4`, `weights.block_size=32` (weight-only "
        "RTN, absmax scales). SmolLM2's FP32 weights come from a Q4_1 GGUF (block-32 asymmetric "
        "4-bit grid), see FACTS.md.", "",
        "### Perplexity (8 evaluation windows x 512 tokens, torch-dynamo export)", "",
        *_md_ppl(ppl), "",
        f"### Speed and size (optimum KV-cache export; prefill {PREFILL} tokens, batch 1; decode: "
        f"one token after the prefill; median of {repeats})", "",
        *_md_speed(speed), "",
        "### Decode-step profile (ORT profiler, kernel time by op type)", "",
        *_md_profile(profiles), "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(run())
