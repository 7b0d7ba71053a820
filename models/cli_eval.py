"""``lowbit eval PATH [--baseline PATH]``: accuracy, size and latency of an ONNX model.

Causal LMs: perplexity on non-overlapping ``--seq-len`` windows of the evaluation split (or
``--eval-text``). Encoders: mean cosine of pooled embeddings to ``--baseline`` (the FP32 model).
``--runtime openvino`` runs both models in OpenVINO's CPU plugin instead of ONNX Runtime (the
cosine reference stays ONNX Runtime's FP32). Always: size on disk, effective bits per linear
weight, median latency. With ``--baseline`` the
baseline is measured on the same windows and the ratio is printed. ``--json FILE`` also writes
the numbers (atomically).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

__all__ = ["add_arguments", "run", "EvalOptions", "evaluate_saved"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="ONNX model: a .onnx file or a directory with model.onnx")
    parser.add_argument("--baseline", metavar="PATH", help="reference model (e.g. the FP32 export)")
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    parser.add_argument("--texts", type=int, default=64, help="texts for encoder cosine (default 64)")
    parser.add_argument("--eval-text", metavar="FILE", help="evaluate on this UTF-8 text instead of the pydoc split")
    parser.add_argument("--repeats", type=int, default=10, help="latency repetitions (default 10)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                        help="run the models in ONNX Runtime (default) or OpenVINO (CPU plugin)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


@dataclass(frozen=True)
class EvalOptions:
    """What ``lowbit eval`` measures; the keyword arguments of :func:`evaluate_saved`."""

    baseline: str | None = None  # reference model path (FP32 export): ratio / cosine to it
    seq_len: int = 512  # tokens per perplexity window
    windows: int = 8  # perplexity windows of the evaluation split
    texts: int = 64  # encoder: paragraphs for the embedding cosine
    eval_text: str | None = None  # a user's UTF-8 text file instead of the evaluation split
    latency: bool = True  # measure prefill (and decode) latency
    repeats: int = 10  # latency repetitions (median reported)
    runtime: str = "onnxruntime"  # or "openvino": which runtime executes the models

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.windows < 1 or self.texts < 1 or self.repeats < 1:
            raise LowbitError("--seq-len must be >= 2 and --windows, --texts, --repeats >= 1")


def _measure(path: str, kind: str, opts: EvalOptions, tokenizer: Any, data: Any) -> dict:
    from lowbit.models import evaluate, footprint

    bits = footprint.linear_weight_bits(path)
    row: dict[str, Any] = {
        "path": path, "kind": kind, "size_bytes": footprint.size_on_disk(path),
        "linear_sites": bits.sites,
        "bits_per_weight": bits.bits_per_weight if bits.sites else None,  # JSON has no NaN
    }
    if kind == "causal-lm":
        row["perplexity"] = asdict(evaluate.perplexity(path, data, runtime=opts.runtime))
    elif opts.baseline:
        row["cosine"] = evaluate.embedding_cosine(path, opts.baseline, data, tokenizer=tokenizer, runtime=opts.runtime)
    if opts.latency:
        row["latency"] = asdict(evaluate.latency(path, repeats=opts.repeats, runtime=opts.runtime))
    return row


def _tokenizer(path: str, baseline: str | None) -> Any:
    from lowbit.models.registry import load_tokenizer, onnx_model_file

    try:
        return load_tokenizer(onnx_model_file(path))
    except LowbitError:
        if not baseline:
            raise
        # A bare compiled .onnx may sit without tokenizer files; the baseline export has them.
        return load_tokenizer(onnx_model_file(baseline))


def _vocab_size(tokenizer: Any) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:  # a stand-in tokenizer without a vocabulary
        return None


def evaluate_saved(path: str | Path, **options: Any) -> dict[str, Any]:
    """Measure the model at ``path`` (and its baseline) as ``lowbit eval`` does.

    ``options`` are :class:`EvalOptions` fields. Returns ``{"model": row, "baseline": row or
    None, "ppl_ratio": model ppl / baseline ppl or None}``; a row holds path, kind, size_bytes,
    linear_sites, bits_per_weight, perplexity (PerplexityResult as dict) or cosine, latency.
    """
    from lowbit.core.model_checks import check_token_ids, onnx_vocab_limits
    from lowbit.models import data as textdata
    from lowbit.models.footprint import load_graph_only
    from lowbit.models.registry import onnx_model_file, onnx_model_kind

    opts = EvalOptions(**options)
    path = str(path)
    kind = onnx_model_kind(onnx_model_file(path))
    if opts.baseline:
        base_kind = onnx_model_kind(onnx_model_file(opts.baseline))
        if base_kind != kind:
            raise LowbitError(f"{path} is a {kind} but the baseline is a {base_kind}")
    # types, external data and graph of both models, before minutes of tokenizing and running
    limits = {p: onnx_vocab_limits(load_graph_only(p)[1]) for p in (path, opts.baseline) if p}
    tokenizer = _tokenizer(path, opts.baseline)
    if kind == "causal-lm":
        data = textdata.evaluation_windows(tokenizer, opts.seq_len, opts.windows, text_file=opts.eval_text)
        for p, sizes in limits.items():  # ids past the embedding or the logits: refused before running
            check_token_ids([data], sizes, what=opts.eval_text or "evaluation text", model=p,
                            vocab_size=_vocab_size(tokenizer))
    else:
        data = textdata.text_samples("evaluation", opts.texts, text_file=opts.eval_text)
    model = _measure(path, kind, opts, tokenizer, data)
    base = _measure(str(opts.baseline), kind, opts, tokenizer, data) if opts.baseline else None
    ratio = None
    if base is not None and kind == "causal-lm":
        ratio = model["perplexity"]["ppl"] / base["perplexity"]["ppl"]
    return {"model": model, "baseline": base, "ppl_ratio": ratio}


def _print(result: dict[str, Any], opts: EvalOptions) -> None:
    rows = [result["model"]] + ([result["baseline"]] if result["baseline"] else [])
    first = rows[0]
    if first["kind"] == "causal-lm":
        p = first["perplexity"]
        source = opts.eval_text or "pydoc_data.topics evaluation split (odd sorted keys)"
        print(f"data: {p['windows']} windows x {opts.seq_len} tokens of {source}; {p['tokens']} scored tokens")
    print(f"{'model':<40} {'size MB':>9} {'bits/w':>7} {'metric':>14} {'prefill ms':>11} {'decode ms':>10}")
    for row in rows:
        if row["kind"] == "causal-lm":
            metric = f"ppl {row['perplexity']['ppl']:.3f}"
        else:
            metric = f"cos {row['cosine']:.5f}" if "cosine" in row else "cos n/a"
        lat = row.get("latency") or {}
        pre = f"{lat['prefill_ms']:.1f}" if lat else "-"
        dec = f"{lat['decode_ms']:.2f}" if lat.get("decode_ms") is not None else "-"
        bpw = f"{row['bits_per_weight']:.2f}" if row["bits_per_weight"] is not None else "-"
        name = str(row["path"])[-40:]
        print(f"{name:<40} {row['size_bytes'] / 1e6:>9.1f} {bpw:>7} {metric:>14} {pre:>11} {dec:>10}")
    if result["ppl_ratio"] is not None:
        print(f"ppl ratio to baseline: {result['ppl_ratio']:.4f}")


def run(args: argparse.Namespace) -> int:
    from lowbit.files.fsutil import atomic_path, check_writable_parent, recover_around

    recover_around(*(p for p in (args.path, args.baseline) if p))  # a compile killed mid-swap is put right first

    opts = EvalOptions(baseline=args.baseline, seq_len=args.seq_len, windows=args.windows,
                       texts=args.texts, eval_text=args.eval_text, latency=not args.no_latency, runtime=args.runtime,
                       repeats=args.repeats)
    if args.json:
        check_writable_parent(Path(args.json))
    result = evaluate_saved(args.path, **asdict(opts))
    _print(result, opts)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return 0
