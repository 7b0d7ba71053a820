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


def _build_all(kind: str, fp32_dir: Path, ctx_args: dict, cfg: BenchConfig, root: Path) -> list:
    from lowbit.bench.contenders import BuildContext, contenders_for

    built = []
    names = list(cfg.contenders) if cfg.contenders else None
    for c in contenders_for(kind, names):
        work = root / c.name
        work.mkdir()
        log.info("building %s", c.name)
        ctx = BuildContext(work_dir=work, **ctx_args)
        path, seconds = c.build(fp32_dir, ctx)
        built.append((c, path, seconds, ctx))
    return built


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


def smollm2_section(cfg: BenchConfig) -> str:
    """SmolLM2-135M: perplexity, ratio to FP32, compile time, size, bits/weight per contender."""
    from lowbit.models import data, evaluate, footprint
    from lowbit.models.export import export_model
    from lowbit.models.registry import SHIPPED, load_tokenizer

    fp32_dir = export_model("smollm2-135m")
    tok = load_tokenizer(fp32_dir)
    calib = data.calibration_windows(tok, cfg.seq_len, cfg.calib_windows, text_file=cfg.calib_text)
    evalw = data.evaluation_windows(tok, cfg.seq_len, cfg.eval_windows, text_file=cfg.eval_text)
    calib_source = cfg.calib_text or "the calibration split (pydoc_data.topics, even sorted keys)"
    eval_source = cfg.eval_text or "the evaluation split (pydoc_data.topics, odd sorted keys)"
    ctx_args = {
        "feeds": tuple({"input_ids": w[None, :]} for w in calib), "windows": calib,
        "description": f"{cfg.calib_windows} windows x {cfg.seq_len} tokens of {calib_source} "
                       f"(each contender takes the first N, N in the calibration column)",
        "peer_windows": cfg.peer_calib_windows,
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as root:
        for c, path, seconds, ctx in _build_all("causal-lm", fp32_dir, ctx_args, cfg, Path(root)):
            default, basic = _session_pair(c)
            ppl_basic = evaluate.perplexity(path, evalw, session_options=basic)
            ppl = _as_ort_runs_it(lambda: evaluate.perplexity(path, evalw, session_options=default))
            ppl_ov = _in_openvino(lambda: evaluate.perplexity(path, evalw, runtime="openvino").ppl) if c.openvino else None
            bits = footprint.linear_weight_bits(path)
            calib_cell = c.calibration(ctx) if c.calibration else "-"
            rows.append((c, ppl, ppl_basic, seconds, footprint.size_on_disk(path), bits.bits_per_weight, ppl_ov, calib_cell))
    base = next((r[2].ppl for r in rows if r[0].name == "fp32"), None)
    lines = [
        "## SmolLM2-135M-Instruct: perplexity",
        "",
        f"Source weights: {SHIPPED['smollm2-135m'].weight_grid}. A 4-bit block-32 asymmetric "
        "quantizer reproduces them almost exactly; read 4-bit results with that in mind.",
        f"Evaluation: {rows[0][2].windows} windows x {cfg.seq_len} tokens of {eval_source}, "
        f"{rows[0][2].tokens} scored tokens, ORT CPU. Calibration: {ctx_args['description']}.",
        "",
        "ppl: ONNX Runtime CPU with default session options (QDQ fused into int8 kernels). "
        "ppl (QDQ in float): the same model at ORT_ENABLE_BASIC, which executes every "
        "DequantizeLinear -> MatMul in float, i.e. the quantization the graph describes. "
        "ppl OpenVINO: the same file run by OpenVINO's CPU plugin (int8 kernels), for contenders "
        "meant for it.",
        "",
        "| contender | weight grid | calibration | ppl | ratio to FP32 | ppl (QDQ in float) | ppl OpenVINO | compile s "
        "| size MB | bits/weight (linear) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, ppl, ppl_basic, seconds, size, bpw, ppl_ov, calib_cell in rows:
        shown = f"{ppl.ppl:.2f}" if not isinstance(ppl, str) else ppl
        ratio = f"{(ppl if not isinstance(ppl, str) else ppl_basic).ppl / base:.3f}" if base else "-"
        ov = "-" if ppl_ov is None else ppl_ov if isinstance(ppl_ov, str) else f"{ppl_ov:.2f}"
        lines.append(f"| {c.name} | {c.weight_grid} | {calib_cell} | {shown} | {ratio} | {ppl_basic.ppl:.2f} | {ov} | "
                     f"{seconds:.1f} | {size / 1e6:.1f} | {bpw:.2f} |")
    lines += ["", "ratio to FP32: of the default-options ppl, or of the float-QDQ ppl where ORT's default "
              "run fails. An `ORT error` cell: ONNX Runtime's QDQ fusion (MatMulIntegerToFloat) rejects "
              "the graph at default options although the same graph runs at ORT_ENABLE_BASIC. An "
              "`OpenVINO error` cell: OpenVINO's CPU plugin rejects the graph (per-channel activation "
              "QDQ, which the qdq target emits for RPTQ clusters)."]
    return "\n".join(lines)


def minilm_section(cfg: BenchConfig) -> str:
    """MiniLM-L6: mean cosine of pooled embeddings to the FP32 export, per contender."""
    from lowbit.models import data, evaluate, footprint
    from lowbit.models.export import export_model
    from lowbit.models.registry import load_tokenizer

    fp32_dir = export_model("minilm-l6")
    tok = load_tokenizer(fp32_dir)
    calib_texts = data.text_samples("calibration", cfg.texts, text_file=cfg.calib_text)
    eval_texts = data.text_samples("evaluation", cfg.texts, text_file=cfg.eval_text)
    feeds = []
    for s in range(0, len(calib_texts), 16):
        enc = tok(calib_texts[s : s + 16], padding=True, truncation=True, max_length=128, return_tensors="np")
        feeds.append({k: enc[k].astype("int64") for k in ("input_ids", "attention_mask", "token_type_ids")})
    ctx_args = {"feeds": tuple(feeds), "windows": None,
                "description": f"{len(calib_texts)} paragraphs of the calibration split"}
    lines = [
        "## all-MiniLM-L6-v2: embedding cosine to FP32",
        "",
        f"Evaluation: mean cosine of mean-pooled embeddings over {len(eval_texts)} paragraphs of the "
        f"evaluation split (max 128 tokens). Calibration: {ctx_args['description']}.",
        "",
        "| contender | weight grid | cosine to FP32 | cosine (QDQ in float) | cosine OpenVINO | compile s "
        "| size MB | bits/weight (linear) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as root:
        for c, path, seconds, _ in _build_all("encoder", fp32_dir, ctx_args, cfg, Path(root)):
            default, basic = _session_pair(c)
            cos = _as_ort_runs_it(lambda: evaluate.embedding_cosine(path, fp32_dir, eval_texts, tokenizer=tok, session_options=default))
            cos_b = evaluate.embedding_cosine(path, fp32_dir, eval_texts, tokenizer=tok, session_options=basic)
            cos_ov = _in_openvino(lambda: f"{evaluate.embedding_cosine(path, fp32_dir, eval_texts, tokenizer=tok, runtime='openvino'):.5f}") if c.openvino else "-"
            size, bpw = footprint.size_on_disk(path), footprint.linear_weight_bits(path).bits_per_weight
            shown = cos if isinstance(cos, str) else f"{cos:.5f}"
            lines.append(f"| {c.name} | {c.weight_grid} | {shown} | {cos_b:.5f} | {cos_ov} | {seconds:.1f} | "
                         f"{size / 1e6:.1f} | {bpw:.2f} |")
    return "\n".join(lines)
