"""``lowbit-bench deploy``: the deployed form of the flagship recipe against FP32 and the best local
runtimes, and whether the deployed model still computes what was compiled (-> ``bench/DEPLOY.md``).

What it measures, so the numbers can be trusted:

- **Faithfulness.** ``w4a8-dint4`` compiled from the optimum KV-cache export for ``qdq`` and for
  ``ort-cpu`` (the files the speed section runs). Perplexity on the evaluation split of both texts (pydoc, news) of: the ``qdq``
  graph run as written (every ORT optimization off), the same file at ORT's default options, the
  ``ort-cpu`` file at default options with the lowbit library, and an ``ort-cpu`` compile that keeps
  the export's attention nodes (the same weights: the float32 summation order is all that differs
  from the row before, so the two show how far order alone moves a W4A8 model whose activations
  are rounded at run time). Each is given as a difference from the first.
- **Speed.** On the optimum KV-cache export (what ``ORTModelForCausalLM`` and ``lowbit generate``
  run): FP32; ONNX Runtime's ``MatMulNBitsQuantizer`` int4 (blocks of 32, symmetric, its default
  accuracy level 4); lowbit ``w4a8-dint4`` for ``ort-cpu`` (the deployable form) and for ``qdq``;
  and, where their venvs are set up (``lowbit-bench peers-setup``), llama.cpp (llama-cpp-python
  on the shipped GGUF: as shipped and requantized Q4_0 / Q4_K_M) and ONNX Runtime GenAI's int4
  CPU model. Prefill is 128 tokens at batch 1. Decode is one token after that prefill: for ORT
  models, the median of ``repeats`` steps; for the peers, their own ``speed`` command (median
  per-token time of 32 greedy tokens). Every contender runs at each thread count, in the same
  process order, best of ``rounds``.
- **Size.** The model file plus its external data, against the FP32 export.
- **Where decode time goes.** ORT's profiler on the ``ort-cpu`` model: kernel time per decode
  step by op type. Against it, the memory-bandwidth bound: the bytes of weights a decode step
  reads (every initializer except the embedding table, of which one row is read) over the
  machine's copy bandwidth, measured here with numpy on a 256 MB array.

The machine is shared (2 cores): read ratios within one run, not absolute times.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_OUTPUT", "RECIPE", "add_arguments", "build_contenders", "run", "speed_rows", "speed_table"]

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "DEPLOY.md"
RECIPE = "w4a8-dint4"
PEERS = {"llamacpp": ("q4_1", "q4_0", "q4_k_m"), "genai": ("int4",)}
PREFILL = 128


def cpu_flags() -> str:
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    try:
        line = next(li for li in Path("/proc/cpuinfo").read_text().splitlines() if li.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = set(line.split(":", 1)[1].split())
    return ", ".join(f for f in wanted if f in have) or "none of " + ", ".join(wanted)


def copy_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Best read+write bandwidth of a numpy copy of a ``megabytes`` array, in GB/s (counted as
    the bytes read: a decode step reads its weights once and writes little)."""
    src = np.ones(megabytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def _size(path: Path) -> int:
    directory = path if path.is_dir() else path.parent
    return sum(f.stat().st_size for f in directory.iterdir() if f.name.startswith(("model.onnx", "model.gguf"))
               or f.suffix in (".onnx", ".data", ".gguf", ".bin"))  # fmt: skip


def decode_weight_bytes(model_dir: Path) -> int:
    """Bytes of every initializer a step reads whole: all but the tables only lookups read (a
    Gather reads one row of them; a table shared with a tied LM head is read whole by the head)."""
    import onnx_ir as ir

    model = ir.load(model_dir / "model.onnx")
    total = 0
    for value in model.graph.initializers.values():
        lookups_only = value.uses() and all((n.op_type == "Gather" and i == 0) or (n.op_type == "GatherLowbit" and i < 3)
                                            for n, i in value.uses())  # GatherLowbit: codes, scales, global scale
        if not lookups_only and value.const_value is not None:
            total += value.const_value.nbytes
    return total


def _domain_ppl(path: Path, windows: int, level: str | None = None) -> dict[str, float]:
    """Perplexity of ``path`` on each text's evaluation windows, with the lowbit library
    (``level``: an ``onnxruntime.GraphOptimizationLevel`` name; ORT's default when None)."""
    import onnxruntime as ort

    from lowbit import runtime_ext
    from lowbit.models import data
    from lowbit.models.evaluate import perplexity
    from lowbit.models.registry import load_tokenizer

    tok = load_tokenizer(path)
    opts = runtime_ext.session_options()
    if level is not None:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return {d: perplexity(path, data.evaluation_windows(tok, 512, windows, domain=d), session_options=opts,
                          progress=False).ppl for d in ("pydoc", "news")}  # fmt: skip


def _unfused(out: Path) -> Path:
    import lowbit
    from lowbit.models.export import export_model

    return lowbit.compile(export_model("smollm2-135m", with_past=True), RECIPE, target="ort-cpu",
                          overrides=["ort_cpu.fuse_attention=false"]).save(out)  # fmt: skip


def faithfulness_rows(built: dict[str, Path], windows: int) -> list[dict[str, Any]]:
    """Perplexity rows of the files in ``built``: ``qdq``, ``ort-cpu`` and ``ort-cpu-unfused`` (the
    same weights with the export's attention: float32 summation order is all that differs)."""
    cases = [("qdq, as written (ORT_DISABLE_ALL)", built["qdq"], "ORT_DISABLE_ALL"),
             ("qdq, ORT default options", built["qdq"], None),
             ("ort-cpu, ORT default options + lowbit library", built["ort-cpu"], None),
             ("ort-cpu with the export's attention (`ort_cpu.fuse_attention=false`): summation order only",
              built["ort-cpu-unfused"], None)]  # fmt: skip
    rows = []
    for name, path, level in cases:
        rows.append({"name": name, "ppl": _domain_ppl(path, windows, level), "windows": windows})
        log.info("%s: %s", name, rows[-1]["ppl"])
    return rows


def _ort_speed(path: Path, threads: int, repeats: int) -> tuple[float, float]:
    import onnxruntime as ort

    from lowbit import runtime_ext
    from lowbit.models.evaluate import latency

    opts = runtime_ext.session_options()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    lat = latency(path, prefill_tokens=PREFILL, repeats=repeats, session_options=opts)
    return lat.prefill_ms, lat.decode_ms


def build_contenders(work: Path, *, recipe: str = RECIPE, qdq: bool = True, peers: dict[str, tuple[str, ...]] = PEERS,
                     export: Path | None = None, overrides: tuple[str, ...] = ()
                     ) -> tuple[dict[str, tuple[str, Path, Any]], list[str]]:  # fmt: skip
    """name -> (description, path, speed function(threads, repeats) -> (prefill ms, decode ms));
    and the peers that could not be built, with why. ``export``: another KV-cache model directory
    than SmolLM2's (then no peers: they start from SmolLM2's own files); ``overrides``: recipe keys."""
    import lowbit
    from lowbit.bench.ortcpu_bench import _matmul_nbits
    from lowbit.bench.peer_contenders import hf_directory
    from lowbit.bench.peer_envs import PeerTool, PeerUnavailable, is_set_up
    from lowbit.errors import LowbitError
    from lowbit.models.export import export_model
    from lowbit.models.registry import resolve_model

    fp32_label = "FP32 optimum export" if export is None else "FP32 (the KV-cache model given)"
    if export is None:
        export = export_model("smollm2-135m", with_past=True)
    else:
        peers = {}
    ort_paths = {
        "fp32": (fp32_label, export),
        "ort-matmulnbits-int4": ("ORT MatMulNBitsQuantizer int4, sym, block 32 (lm_head FP32)", _matmul_nbits(export, work / "nbits")),
        f"lowbit-{recipe}-ort-cpu": (f"lowbit `{recipe}`, target ort-cpu (deployable)",
                                     lowbit.compile(export, recipe, target="ort-cpu", overrides=overrides).save(work / "ort-cpu")),
    }  # fmt: skip
    if qdq:
        ort_paths[f"lowbit-{recipe}-qdq"] = (f"lowbit `{recipe}`, target qdq (standard QDQ, ORT executes it as written)",
                                             lowbit.compile(export, recipe, target="qdq", overrides=overrides).save(work / "qdq"))
    contenders = {name: (desc, path, lambda n, r, p=path: _ort_speed(p, n, r)) for name, (desc, path) in ort_paths.items()}
    missing = []
    prompt = (np.arange(PREFILL, dtype=np.int64) % 1000 + 100)
    for peer, configs in peers.items():
        if not is_set_up(peer):
            missing.append(f"{peer}: not set up (`lowbit-bench peers-setup {peer}`)")
            continue
        tool = PeerTool(peer)
        calib = work / "calib.npy"
        np.save(calib, np.zeros((1, 16), np.int64))  # the configurations run here read no calibration
        inputs = {"onnx": export / "model.onnx", "hf": hf_directory(export_model("smollm2-135m")),
                  "gguf": resolve_model("smollm2-135m").path, "calib": calib}  # fmt: skip
        for config in configs:
            out = work / f"{peer}-{config}"
            out.mkdir()
            try:
                result = tool.build(config, inputs, out)
            except (PeerUnavailable, LowbitError) as e:
                missing.append(f"{peer} {config}: {e}")
                continue

            def speed(n: int, r: int, tool=tool, out=out) -> tuple[float, float]:
                s = tool.speed(out, prompt, 32, n, work)
                return s["prefill_ms"], s["decode_ms_per_token"]

            contenders[f"{peer}-{config}"] = (f"{peer} {config} ({result.get('runtime', 'its runtime')})", out / result["model"], speed)
    return contenders, missing


def speed_rows(contenders: dict, threads: tuple[int, ...], rounds: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for n in threads:
        best: dict[str, tuple[float, float]] = {}
        for _ in range(rounds):
            for name, (_, _, speed) in contenders.items():
                prefill, decode = speed(n, repeats)
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], prefill), min(old[1], decode))
                log.info("threads %d %s: prefill %.1f ms, decode %.2f ms", n, name, prefill, decode)
        rows.append({"threads": n, "best": best})
    return rows


def speed_table(contenders: dict, best: dict[str, tuple[float, float]]) -> list[str]:
    """Markdown rows of one thread count's best (prefill ms, decode ms) per contender."""
    fp32, nbits = best["fp32"], best["ort-matmulnbits-int4"]
    fp32_size = _size(contenders["fp32"][1])
    lines = ["| contender | prefill ms | prefill / FP32 | decode ms/token | tokens/s | tokens/s / MatMulNBits | size MB | size / FP32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, (prefill, decode) in best.items():
        size = _size(contenders[name][1])
        lines.append(f"| {contenders[name][0]} | {prefill:.1f} | {prefill / fp32[0]:.2f} | {decode:.2f} | "
                     f"{1000 / decode:.1f} | {nbits[1] / decode:.2f} | {size / 1e6:.1f} | {size / fp32_size:.3f} |")
    return lines


def _fmt_pct(a: float, ref: float) -> str:
    return f"{100 * (a / ref - 1):+.3f} %"


def render(faithful: list[dict], contenders: dict, speed: list[dict], missing: list[str], profile: list, bound: dict,
           command: str, *, title: str = "SmolLM2-135M") -> str:  # fmt: skip
    from lowbit.bench.runner import machine_line

    lines = [f"# Deployment: {title}", "", f"Command: `{command}`", "", f"Machine: {machine_line()}", "",
             f"CPU flags: {cpu_flags()}.", ""]  # fmt: skip
    if faithful:
        ref = faithful[0]["ppl"]
        lines += ["## Does the deployed model compute what was compiled?", "",
                  f"`{RECIPE}`, perplexity on the evaluation split ({faithful[0]['windows']} x 512 tokens per text), "
                  "difference from the `qdq` graph run as written. Activations are rounded to int8 at run time, so "
                  "a float32 summation-order change moves some codes to their neighbour: the last row differs "
                  "from the one above in summation order only (the same weights, the export's attention "
                  "nodes), which shows how large that effect alone is.", "",
                  "| model | pydoc ppl | vs as written | news ppl | vs as written |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in faithful:
            p = r["ppl"]
            lines.append(f"| {r['name']} | {p['pydoc']:.4f} | {_fmt_pct(p['pydoc'], ref['pydoc'])} | "
                         f"{p['news']:.4f} | {_fmt_pct(p['news'], ref['news'])} |")
        lines.append("")
    lines += ["## Speed and size", "",
              f"KV-cache graph (optimum's signature); prefill {PREFILL} tokens (batch 1); decode: one token after the prefill; best "
              "of the rounds. Size: the model's files.", ""]  # fmt: skip
    for s in speed:
        lines += [f"### {s['threads']} thread{'s' if s['threads'] > 1 else ''}", "", *speed_table(contenders, s["best"]), ""]
    if missing:
        lines += ["Peers not measured: " + "; ".join(missing) + ".", ""]
    if profile:
        total = sum(ms for _, ms in profile)
        lines += ["## Where a decode step goes (ort-cpu, 1 thread)", "",
                  f"ORT profiler, kernel time per decode step: {total:.2f} ms; "
                  + ", ".join(f"{op} {ms:.2f} ms ({100 * ms / total:.0f} %)" for op, ms in profile[:8]) + ".", "",
                  f"Memory-bandwidth bound: {bound['bytes'] / 1e6:.1f} MB of weights per step (every initializer but the "
                  f"embedding table) at {bound['gbs']:.1f} GB/s (numpy copy) = {bound['ms']:.2f} ms per step; the "
                  f"measured decode step is {bound['measured']:.2f} ms, {bound['measured'] / bound['ms']:.1f} x the bound.", ""]  # fmt: skip
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lowbit.bench.cli_bench import add_speed_report_arguments

    add_speed_report_arguments(parser, DEFAULT_OUTPUT, "speed rounds over every contender")
    parser.add_argument("--skip-faithfulness", action="store_true", help="speed and size only")
    parser.add_argument("--synthetic", metavar="SHAPE", default=None,
                        help="speed and size of the synthetic KV-cache decoder of this shape (lowbit.models.synthetic_llm; "
                             "random weights: no faithfulness, no peers), compiled on --calib-windows windows; report "
                             "bench/DEPLOY_<SHAPE>.md unless -o is given")  # fmt: skip
    parser.add_argument("--calib-windows", type=int, default=4, help="calibration windows of the --synthetic compile (default 4)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for the --synthetic compile (repeatable; random weights: e.g. "
                             "rounding.method=rtn keeps a large model's compile light, the graph is the same)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from lowbit.bench.cli_bench import check_speed_report_arguments
    from lowbit.bench.ortcpu_bench import decode_profile
    from lowbit.files.fsutil import atomic_path

    out = check_speed_report_arguments(args)
    synthetic = getattr(args, "synthetic", None)
    if getattr(args, "set", []) and synthetic is None:
        from lowbit.errors import LowbitError

        raise LowbitError("--set applies to the --synthetic compile only (SmolLM2's recipe is the one shipped)")
    if synthetic is not None:
        from lowbit.errors import LowbitError
        from lowbit.models.synthetic_llm import SHAPES

        if synthetic not in SHAPES:
            raise LowbitError(f"--synthetic: unknown shape {synthetic!r} (known: {', '.join(SHAPES)})")
        if args.calib_windows < 1:
            raise LowbitError("--calib-windows must be >= 1")
        if out == DEFAULT_OUTPUT:
            from lowbit.bench.cli_bench import check_report_path

            out = DEFAULT_OUTPUT.with_name(f"DEPLOY_{synthetic}.md")
            check_report_path(out)
    command = "lowbit-bench deploy" + (f" --windows {args.windows}" if args.windows != 8 else "") + (
        " --skip-faithfulness" if args.skip_faithfulness else "") + (
        f" --synthetic {synthetic} --calib-windows {args.calib_windows}" + "".join(f" --set {kv}" for kv in getattr(args, "set", []))
        if synthetic else "") + (
        f" --rounds {args.rounds} --threads {' '.join(map(str, args.threads))}")
    with tempfile.TemporaryDirectory(prefix="lowbit-deploy-") as tmp:
        if synthetic is None:
            contenders, missing = build_contenders(Path(tmp))
            built = {t: contenders[f"lowbit-{RECIPE}-{t}"][1] for t in ("qdq", "ort-cpu")}
            faithful = []
            if not args.skip_faithfulness:
                built["ort-cpu-unfused"] = _unfused(Path(tmp) / "ort-cpu-unfused")
                faithful = faithfulness_rows(built, args.windows)
        else:
            from lowbit.models.synthetic_llm import write_decoder

            model = write_decoder(synthetic, Path(tmp) / "synthetic", with_past=True)
            overrides = (f"calibration.windows={args.calib_windows}", *getattr(args, "set", []))
            contenders, missing = build_contenders(Path(tmp), qdq=False, export=model, overrides=overrides)
            faithful = []
        speed = speed_rows(contenders, tuple(args.threads), args.rounds, repeats=10)
        deployed = contenders[f"lowbit-{RECIPE}-ort-cpu"][1]
        profile = decode_profile(deployed, True, 1)
        bound = {"bytes": decode_weight_bytes(deployed), "gbs": copy_bandwidth_gbs()}
        bound["ms"] = bound["bytes"] / (bound["gbs"] * 1e9) * 1e3
        one = next((s for s in speed if s["threads"] == 1), speed[0])
        bound["measured"] = one["best"][f"lowbit-{RECIPE}-ort-cpu"][1]
        title = f"synthetic {synthetic} (random weights)" if synthetic else "SmolLM2-135M"
        text = render(faithful, contenders, speed, missing, profile, bound, command, title=title)
    with atomic_path(out) as tmp_out:
        tmp_out.write_text(text)
    print(text)
    return 0
