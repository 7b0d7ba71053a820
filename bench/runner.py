"""Run the bench: every contender on the same calibration and evaluation data, one report.

The report is Markdown: a header (the command, a machine line), then one section per entry of
:data:`SECTIONS`. A section is ``module:function`` returning a Markdown string; it is imported
only when the bench runs, and sections whose module is not installed yet are left out (other
engineers add sections, e.g. ``lowbit.bench.formats_bench:run``).

Model sections (SmolLM2-135M, MiniLM-L6) build each contender from the FP32 export with one
shared :class:`~lowbit.bench.contenders.BuildContext` and evaluate every result on one shared set
of evaluation windows/texts, so the numbers are side by side in the strict sense.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import logging
import os
import platform
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

from lowbit.errors import LowbitError

__all__ = ["BenchConfig", "SECTIONS", "machine_line", "run_bench", "smollm2_section", "minilm_section"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    seq_len: int = 512  # tokens per window (calibration and evaluation)
    eval_windows: int = 8  # evaluation windows of the evaluation split
    calib_windows: int = 32  # calibration windows of the split; lowbit recipes take their calibration.windows of them
    # of which ORT quantize_static takes this many: the count of the recipes it is compared with
    # (w8a8-rptq, w4a8-*), so compile times and ranges compare on equal calibration data
    peer_calib_windows: int = 32
    texts: int = 64  # encoder: evaluation paragraphs for the cosine; calibration uses as many
    contenders: tuple[str, ...] | None = None  # restrict to these names (None: all registered)
    calib_text: str | None = None  # a user's UTF-8 text file instead of the calibration split
    eval_text: str | None = None  # a user's UTF-8 text file instead of the evaluation split

    def __post_init__(self) -> None:
        if self.seq_len < 2 or min(self.eval_windows, self.calib_windows, self.texts) < 1:
            raise LowbitError("bench: seq_len must be >= 2 and window/text counts >= 1")


# name -> "module:function" returning Markdown. Functions named in _TAKES_CONFIG get the
# BenchConfig (they share its windows); the others are called without arguments.
SECTIONS: dict[str, str] = {
    "smollm2": "lowbit.bench.runner:smollm2_section",
    "minilm": "lowbit.bench.runner:minilm_section",
    "formats": "lowbit.bench.formats_bench:run",
    "runtime": "lowbit.bench.runtime_bench:run",
    "ortcpu": "lowbit.bench.ortcpu_bench:run",
    "greedy": "lowbit.bench.greedy_bench:run",
}
_TAKES_CONFIG = {"smollm2", "minilm"}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def machine_line() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = ", ".join(
        f"{d} {_version(d)}" for d in ("onnxruntime", "onnx", "torch", "transformers", "optimum-onnx")
    )
    # Shared machines: the load at start says how much the timings were contended.
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, {now}, load average at start {load}; "
            f"Python {platform.python_version()}, {versions}")


def _resolve_section(name: str) -> Callable | None:
    target = SECTIONS[name]
    module_name, func_name = target.split(":")
    if importlib.util.find_spec(module_name) is None:
        log.info("bench section %s left out: %s is not installed", name, module_name)
        return None
    return getattr(importlib.import_module(module_name), func_name)


def run_bench(cfg: BenchConfig, command: str, sections: list[str] | None = None) -> str:
    """The whole Markdown report for ``sections`` (default: all available)."""
    names = list(SECTIONS) if sections is None else sections
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise LowbitError(f"unknown bench section(s) {unknown}; known: {', '.join(SECTIONS)}")
    parts = ["# lowbit bench results", "", f"Command: `{command}`", "", f"Machine: {machine_line()}", ""]
    for name in names:
        func = _resolve_section(name)
        if func is None:
            continue
        text = func(cfg) if name in _TAKES_CONFIG else func()
        parts += [text.rstrip(), ""]
    return "\n".join(parts)


def _build_all(kind: str, fp32_dir: Path, ctx_args: dict, cfg: BenchConfig, root: Path,
               unavailable: list[tuple[str, str]]) -> Iterator[tuple[Any, Path, float, Any]]:
    """Build every contender of ``kind`` in turn, yielding (contender, model path, seconds, ctx)
    so each is measured right after its build; the ones that cannot run here go to ``unavailable``."""
    from lowbit.bench.contenders import BuildContext, contenders_for
    from lowbit.bench.peer_envs import PeerUnavailable

    names = list(cfg.contenders) if cfg.contenders else None
    chosen = contenders_for(kind, names)
    for i, c in enumerate(chosen, 1):
        work = root / c.name
        work.mkdir()
        _progress(f"{kind}: building and measuring {c.name} ({i}/{len(chosen)})")
        ctx = BuildContext(work_dir=work, **ctx_args)
        try:
            path, seconds = c.build(fp32_dir, ctx)
        except PeerUnavailable as e:
            unavailable.append((c.name, str(e)))
            continue
        yield c, path, seconds, ctx


def _progress(line: str) -> None:
    """A progress line on stderr (builds take seconds to many minutes each)."""
    import sys

    print(f"[bench {datetime.datetime.now().strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _session_pair(c: Any) -> tuple[Any, Any]:
    """(the contender's session options, the same at ORT_ENABLE_BASIC).

    BASIC keeps every QDQ pair as float DequantizeLinear -> MatMul, i.e. the quantization the
    model *describes*; the default level fuses QDQ into int8 kernels (QLinearMatMul,
    MatMulIntegerToFloat), i.e. what ONNX Runtime *runs*. Both are reported because they can
    differ a lot (uint8 x int8 kernels on CPUs without VNNI can saturate).
    """
    import onnxruntime as ort

    def fresh() -> Any:
        return c.session_options() if c.session_options else ort.SessionOptions()

    basic = fresh()
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return fresh(), basic


def _as_ort_runs_it(measure: Callable[[], Any]) -> Any:
    """The measurement at ORT's default options, or ``"ORT error"`` where ORT's graph fusion
    rejects a graph that runs unfused (the failure is logged, not hidden)."""
    try:
        return measure()
    except Exception as e:  # onnxruntime's Fail / LowbitError from session creation
        log.warning("default-options run failed: %s", str(e).splitlines()[0][:200])
        return "ORT error"


def _in_openvino(measure: Callable[[], Any]) -> Any:
    """The measurement in OpenVINO, or ``"OpenVINO error"`` where its CPU plugin rejects the graph
    (e.g. per-channel activation QDQ: "FakeQuantize ... doesn't support non per-tensor
    quantization"); the failure is logged, not hidden."""
    try:
        return measure()
    except Exception as e:  # LowbitError from OpenVinoSession
        log.warning("OpenVINO run failed: %s", str(e).splitlines()[0][:300])
        return "OpenVINO error"


def _eval_texts(cfg: BenchConfig, tok: Any) -> list[tuple[str, str, Any]]:
    """(name, source, windows) of every evaluation text: both domains, or the user's file."""
    from lowbit.models import data

    if cfg.eval_text:
        return [("text", cfg.eval_text, data.evaluation_windows(tok, cfg.seq_len, cfg.eval_windows, text_file=cfg.eval_text))]
    return [(d, f"{data.DOMAINS[d]}, evaluation split", data.evaluation_windows(tok, cfg.seq_len, cfg.eval_windows, domain=d))
            for d in ("pydoc", "news")]


def _reference_logits(fp32_dir: Path, windows: Any, out: Path) -> Any:
    """FP32 logits of every window, written once to a scratch file and read back lazily."""
    import numpy as np

    from lowbit.models import evaluate

    session = evaluate.open_session(fp32_dir)
    first = evaluate.window_logits(session, windows[0], fp32_dir)
    ref = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(len(windows), *first.shape))
    ref[0] = first
    for i in range(1, len(windows)):
        ref[i] = evaluate.window_logits(session, windows[i], fp32_dir)
    ref.flush()
    del ref
    return np.load(out, mmap_mode="r")


def _scores(c: Any, path: Path, windows: Any, ref: Any, session_options: Any, scratch: Path) -> Any:
    """Perplexity and agreement with FP32 of one contender on one text, or an error cell."""
    from lowbit.models import evaluate

    scores = evaluate.NextTokenScores()
    if c.logits is not None:
        stream = c.logits(path, windows, scratch)
    else:
        session = evaluate.open_session(path, session_options)
        stream = (evaluate.window_logits(session, row, path) for row in windows)
    for i, logits in enumerate(stream):
        scores.add(logits, windows[i], ref[i])
    return scores


PROMPT_TOKENS, NEW_TOKENS = 128, 32  # speed: prefill of a 128-token prompt; decode steps (peers with a KV cache)


def _speed(c: Any, path: Path, prompt: Any, session_options: Any, scratch: Path) -> tuple[Any, Any]:
    """(prefill ms, decode ms per token or None) at 2 threads, in the contender's own runtime."""
    from lowbit.models import evaluate

    if c.speed is not None:
        s = c.speed(path, prompt, scratch)
        return s.get("prefill_ms"), s.get("decode_ms_per_token")
    lat = evaluate.latency(path, prefill_tokens=len(prompt), repeats=5, session_options=session_options)
    return lat.prefill_ms, lat.decode_ms


def _cell(x: Any, fmt: str) -> str:
    if isinstance(x, str):
        return x
    return "-" if x is None or x != x else format(x, fmt)  # x != x: NaN (no linear weight it can read)


def smollm2_section(cfg: BenchConfig) -> str:
    """SmolLM2-135M: every contender (lowbit's recipes and its peers) on both evaluation domains:
    perplexity, ratio, KL divergence and top-1 agreement to FP32, compile time, size, bits/weight, speed."""

    from lowbit.models import data, evaluate, footprint
    from lowbit.models.export import export_model
    from lowbit.models.registry import SHIPPED, load_tokenizer

    fp32_dir = export_model("smollm2-135m")
    tok = load_tokenizer(fp32_dir)
    calib = data.calibration_windows(tok, cfg.seq_len, cfg.calib_windows, text_file=cfg.calib_text)
    texts = _eval_texts(cfg, tok)
    calib_source = cfg.calib_text or "the calibration split (pydoc_data.topics, first three quarters of the even sorted keys)"
    ctx_args = {
        "feeds": tuple({"input_ids": w[None, :]} for w in calib), "windows": calib,
        "description": f"{cfg.calib_windows} windows x {cfg.seq_len} tokens of {calib_source} "
                       f"(each contender takes the first N, N in the calibration column)",
        "peer_windows": cfg.peer_calib_windows,
    }
    prompt = texts[0][2][0][:PROMPT_TOKENS]
    rows, unavailable = [], []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as root_dir:
        root = Path(root_dir)
        refs = {name: _reference_logits(fp32_dir, w, root / f"fp32-{name}.npy") for name, _, w in texts}
        for c, path, seconds, ctx in _build_all("causal-lm", fp32_dir, ctx_args, cfg, root, unavailable):
            info = c.info(path) if c.info else {}
            default, basic = _session_pair(c)
            by_text = {}
            for name, _, windows in texts:
                try:
                    by_text[name] = _scores(c, path, windows, refs[name], default, root)
                except Exception as e:  # ORT's default-options fusion can reject a graph that runs unfused
                    log.warning("%s on %s: %s", c.name, name, str(e).splitlines()[0][:200])
                    by_text[name] = "ORT error" if c.logits is None else "error"
            basic_ppl = None
            if c.logits is None and c.runtime == "onnxruntime":
                basic_ppl = evaluate.perplexity(path, texts[0][2], session_options=basic).ppl
            ppl_ov = _in_openvino(lambda: evaluate.perplexity(path, texts[0][2], runtime="openvino").ppl) if c.openvino else None
            speed = _as_ort_runs_it(lambda: _speed(c, path, prompt, default, root))
            bits = info.get("bits_per_weight") if c.info else footprint.linear_weight_bits(path).bits_per_weight
            size = footprint.size_on_disk(path) if c.info is None else _tree_size(path)
            calib_cell = (f"{info['calibration_windows']} windows" if info.get("calibration_windows") else "-") if c.info \
                else (c.calibration(ctx) if c.calibration else "-")
            rows.append(_row(c, info, by_text, basic_ppl, ppl_ov, speed, seconds, size, bits, calib_cell))
    lines = [
        "## SmolLM2-135M-Instruct: lowbit and its peers",
        "",
        f"Source weights: {SHIPPED['smollm2-135m'].weight_grid}. A 4-bit block-32 asymmetric "
        "quantizer reproduces them almost exactly; read 4-bit results with that in mind.",
        "",
        "Evaluation: " + "; ".join(f"**{n}**: {cfg.eval_windows} windows x {cfg.seq_len} tokens of {src}"
                                    for n, src, _ in texts) + ". Calibration: " + ctx_args["description"] + ".",
        "No recipe setting was chosen on these texts: lowbit's recipe settings come from the tuning split "
        "([TUNING.md](TUNING.md)); the peers run their documented best settings.",
        "",
        "ppl: in the contender's runtime, at that runtime's default options (ONNX Runtime CPU fuses QDQ into int8 "
        "kernels). KL: mean KL(P_FP32 || P_model) of the next-token distribution, nats per token; top-1: how often "
        "the model's most likely next token is FP32's. x FP32: ratio of perplexities. QDQ in float: the same ONNX "
        f"model at ORT_ENABLE_BASIC (the quantization the graph describes). Speed: prefill of a {PROMPT_TOKENS}-token "
        f"prompt and, for models with a KV cache, decode ms per token (greedy, {NEW_TOKENS} tokens), 2 threads, "
        "median; machine load is not controlled.",
        "",
    ]
    return "\n".join(lines + peer_table([n for n, _, _ in texts], rows, unavailable))


def _row(c: Any, info: dict, by_text: dict, basic: Any, ov: Any, speed: Any, seconds: float, size: int, bits: Any,
         calib: str) -> dict:
    """One contender's measurements as plain values (what :func:`peer_table` writes)."""
    texts = {}
    for name, sc in by_text.items():
        if isinstance(sc, str):
            texts[name] = sc
        else:
            agree = sc.agreement()
            texts[name] = {"ppl": sc.perplexity().ppl, "kl": agree.kl, "top1": agree.top1}
    prefill, decode = speed if isinstance(speed, tuple) else (speed, None)
    kind = "fp32" if c.name == "fp32" else "lowbit" if c.name.startswith("lowbit-") else "peer"
    return {"name": c.name, "kind": kind, "runtime": info.get("runtime", c.runtime), "calib": calib, "bits": bits,
            "size": size, "seconds": seconds, "texts": texts, "basic": basic, "ov": ov, "prefill": prefill,
            "decode": decode, "grid": info.get("weight_grid", c.weight_grid), "note": info.get("note", "")}


ACCURACY = (("ppl", "ppl", False), ("kl", "KL", False), ("top1", "top-1", True))  # (key, label, higher is better)


def peer_table(text_names: list[str], rows: list[dict], unavailable: list[tuple[str, str]]) -> list[str]:
    """The SmolLM2 table (one row per contender), its legend, the peers that could not run, and
    every accuracy cell where a peer beats a lowbit recipe of the same or more bits per weight."""
    fp32 = next((r["texts"] for r in rows if r["kind"] == "fp32"), {})
    heads = " | ".join(f"{n} ppl | x FP32 | KL | top-1 %" for n in text_names)
    lines = [f"| contender | runtime | calibration | bits/weight | size MB | compile s | {heads} | QDQ in float ppl "
             "| ppl OpenVINO | prefill ms | decode ms/token |",
             "|---|---|---|---:|---:|---:|" + "---:|" * (4 * len(text_names)) + "---:|---:|---:|---:|"]
    for r in rows:
        cells = []
        for name in text_names:
            t = r["texts"].get(name, "-")
            if isinstance(t, str):
                cells += [t, "-", "-", "-"]
                continue
            base = fp32.get(name)
            ratio = t["ppl"] / base["ppl"] if isinstance(base, dict) else None
            cells += [f"{t['ppl']:.2f}", _cell(ratio, ".3f"), f"{t['kl']:.4f}", f"{100 * t['top1']:.1f}"]
        lines.append(f"| {r['name']} | {r['runtime']} | {r['calib']} | {_cell(r['bits'], '.2f')} | {r['size'] / 1e6:.1f} | "
                     f"{r['seconds']:.1f} | {' | '.join(cells)} | {_cell(r['basic'], '.2f')} | {_cell(r['ov'], '.2f')} | "
                     f"{_cell(r['prefill'], '.1f')} | {_cell(r['decode'], '.2f')} |")
    lines += ["", "Weight grids and notes:", ""]
    for r in rows:
        lines.append(f"- **{r['name']}**: {r['grid']}" + (f" -- {r['note']}" if r["note"] else ""))
    for name, reason in unavailable:
        lines.append(f"- **{name}**: not measured: {reason}")
    wins = _peer_wins(text_names, rows)
    lines += ["", "Where a peer beats a lowbit recipe of the same or more bits per weight (accuracy cells):", ""]
    lines += wins or ["- nowhere"]
    return lines


def _peer_wins(text_names: list[str], rows: list[dict]) -> list[str]:
    out = []
    peers = [r for r in rows if r["kind"] == "peer" and isinstance(r["bits"], (int, float))]
    for mine in (r for r in rows if r["kind"] == "lowbit" and isinstance(r["bits"], (int, float))):
        for peer in (p for p in peers if p["bits"] <= mine["bits"] + 1e-9):
            cells = []
            for name in text_names:
                a, b = peer["texts"].get(name), mine["texts"].get(name)
                if not (isinstance(a, dict) and isinstance(b, dict)):
                    continue
                for key, label, higher in ACCURACY:
                    if (a[key] > b[key]) if higher else (a[key] < b[key]):
                        fmt = (lambda v: f"{100 * v:.1f} %") if key == "top1" else (lambda v: f"{v:.4f}" if key == "kl" else f"{v:.2f}")
                        cells.append(f"{name} {label} {fmt(a[key])} vs {fmt(b[key])}")
            if cells:
                out.append(f"- **{peer['name']}** ({peer['bits']:.2f} bits/weight) beats **{mine['name']}** "
                           f"({mine['bits']:.2f}): {'; '.join(cells)}")
    return out


def _tree_size(path: Path) -> int:
    """Bytes of a peer's model: an ONNX file with its external data, another file with the files
    of the same stem beside it (OpenVINO's .xml + .bin), or every file of the directory it names
    (result.json excluded)."""
    if path.suffix == ".onnx":
        from lowbit.models import footprint

        return footprint.size_on_disk(path)
    if path.is_file():
        extra = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file() and f != path and f.stem == path.stem)
        return path.stat().st_size + extra
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "result.json")


def minilm_section(cfg: BenchConfig) -> str:
    """MiniLM-L6: mean cosine of pooled embeddings to the FP32 export on both domains, per contender."""
    from lowbit.models import data, evaluate, footprint
    from lowbit.models.export import export_model
    from lowbit.models.registry import load_tokenizer

    fp32_dir = export_model("minilm-l6")
    tok = load_tokenizer(fp32_dir)
    calib_texts = data.text_samples("calibration", cfg.texts, text_file=cfg.calib_text)
    if cfg.eval_text:
        texts = [("text", data.text_samples("evaluation", cfg.texts, text_file=cfg.eval_text))]
    else:
        texts = [(d, data.text_samples("evaluation", cfg.texts, domain=d)) for d in ("pydoc", "news")]
    feeds = []
    for s in range(0, len(calib_texts), 16):
        enc = tok(calib_texts[s : s + 16], padding=True, truncation=True, max_length=128, return_tensors="np")
        feeds.append({k: enc[k].astype("int64") for k in ("input_ids", "attention_mask", "token_type_ids")})
    ctx_args = {"feeds": tuple(feeds), "windows": None,
                "description": f"{len(calib_texts)} paragraphs of the calibration split"}
    heads = " | ".join(f"cosine {n} | {n} (QDQ in float)" for n, _ in texts)
    lines = [
        "## all-MiniLM-L6-v2: embedding cosine to FP32",
        "",
        "Evaluation: mean cosine of mean-pooled embeddings to the FP32 export over "
        + "; ".join(f"**{n}**: {len(t)} paragraphs of {data.DOMAINS.get(n, cfg.eval_text)}" for n, t in texts)
        + f" (max 128 tokens). Calibration: {ctx_args['description']}.",
        "",
        f"| contender | weight grid | {heads} | cosine OpenVINO (pydoc) | compile s | size MB | bits/weight (linear) |",
        "|---|---|" + "---:|---:|" * len(texts) + "---:|---:|---:|---:|",
    ]
    unavailable: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as root:
        for c, path, seconds, _ in _build_all("encoder", fp32_dir, ctx_args, cfg, Path(root), unavailable):
            info = c.info(path) if c.info else {}
            cells = []
            if info.get("runtime") == "openvino":  # a peer's OpenVINO IR: OpenVINO is its runtime
                for _, t in texts:
                    cos = _in_openvino(lambda: evaluate.embedding_cosine(path, fp32_dir, t, tokenizer=tok, runtime="openvino"))
                    cells += [cos if isinstance(cos, str) else f"{cos:.5f}", "-"]
                cos_ov, size = "-", _tree_size(path)
            else:
                default, basic = _session_pair(c)
                for _, t in texts:
                    cos = _as_ort_runs_it(lambda: evaluate.embedding_cosine(path, fp32_dir, t, tokenizer=tok, session_options=default))
                    cos_b = evaluate.embedding_cosine(path, fp32_dir, t, tokenizer=tok, session_options=basic)
                    cells += [cos if isinstance(cos, str) else f"{cos:.5f}", f"{cos_b:.5f}"]
                cos_ov = _in_openvino(lambda: f"{evaluate.embedding_cosine(path, fp32_dir, texts[0][1], tokenizer=tok, runtime='openvino'):.5f}") if c.openvino else "-"
                size = footprint.size_on_disk(path) if not info else _tree_size(path)
            bpw = info.get("bits_per_weight") if info else footprint.linear_weight_bits(path).bits_per_weight
            grid = info.get("weight_grid", c.weight_grid)
            lines.append(f"| {c.name} | {grid} | {' | '.join(cells)} | {cos_ov} | {seconds:.1f} | "
                         f"{size / 1e6:.1f} | {_cell(bpw, '.2f')} |")
    if unavailable:
        lines += [""] + [f"- **{name}**: not measured: {reason}" for name, reason in unavailable]
    return "\n".join(lines)
