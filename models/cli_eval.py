"""``lowbit eval PATH [--baseline PATH]``: accuracy, size and latency of an ONNX model.

Causal LMs: perplexity on non-overlapping ``--seq-len`` windows of the evaluation split (or
``--eval-text``). Encoders: mean cosine of pooled embeddings to ``--baseline`` (the FP32 model).
Always: size on disk, effective bits per linear weight, median latency. With ``--baseline`` the
baseline is measured on the same windows and the ratio is printed. ``--json FILE`` also writes
the numbers (atomically).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

__all__ = ["add_arguments", "run", "evaluate_path"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="ONNX model: a .onnx file or a directory with model.onnx")
    parser.add_argument("--baseline", metavar="PATH", help="reference model (e.g. the FP32 export)")
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    parser.add_argument("--texts", type=int, default=64, help="texts for encoder cosine (default 64)")
    parser.add_argument("--eval-text", metavar="FILE", help="evaluate on this UTF-8 text instead of the pydoc split")
    parser.add_argument("--repeats", type=int, default=10, help="latency repetitions (default 10)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def _check_args(args: argparse.Namespace) -> None:
    if args.seq_len < 2 or args.windows < 1 or args.texts < 1 or args.repeats < 1:
        raise LowbitError("--seq-len must be >= 2 and --windows, --texts, --repeats >= 1")
    if args.json:
        from lowbit.compiler.fsutil import check_writable_parent

        check_writable_parent(Path(args.json))


def _measure(path: str, kind: str, args: argparse.Namespace, tokenizer: Any, data: Any) -> dict:
    from lowbit.models import evaluate, footprint

    bits = footprint.linear_weight_bits(path)
    row: dict[str, Any] = {
        "path": path, "kind": kind, "size_bytes": footprint.size_on_disk(path),
        "linear_sites": bits.sites,
        "bits_per_weight": bits.bits_per_weight if bits.sites else None,  # JSON has no NaN
    }
    if kind == "causal-lm":
        row["perplexity"] = asdict(evaluate.perplexity(path, data))
    elif args.baseline:
        row["cosine"] = evaluate.embedding_cosine(path, args.baseline, data, tokenizer=tokenizer)
    if not args.no_latency:
        row["latency"] = asdict(evaluate.latency(path, repeats=args.repeats))
    return row


def evaluate_path(args: argparse.Namespace) -> list[dict]:
    """Rows of measurements: the model, then the baseline if given."""
    from lowbit.models import data as textdata
    from lowbit.models.registry import load_tokenizer, onnx_model_file, onnx_model_kind

    kind = onnx_model_kind(onnx_model_file(args.path))
    if args.baseline:
        base_kind = onnx_model_kind(onnx_model_file(args.baseline))
        if base_kind != kind:
            raise LowbitError(f"{args.path} is a {kind} but the baseline is a {base_kind}")
    try:
        tokenizer = load_tokenizer(onnx_model_file(args.path))
    except LowbitError:
        if not args.baseline:
            raise
        # A bare compiled .onnx may sit without tokenizer files; the baseline export has them.
        tokenizer = load_tokenizer(onnx_model_file(args.baseline))
    if kind == "causal-lm":
        data = textdata.evaluation_windows(tokenizer, args.seq_len, args.windows, text_file=args.eval_text)
    else:
        data = textdata.text_samples("evaluation", args.texts, text_file=args.eval_text)
    rows = [_measure(args.path, kind, args, tokenizer, data)]
    if args.baseline:
        rows.append(_measure(args.baseline, kind, args, tokenizer, data))
    return rows


def _print(rows: list[dict], args: argparse.Namespace) -> None:
    first = rows[0]
    if first["kind"] == "causal-lm":
        p = first["perplexity"]
        source = args.eval_text or "pydoc_data.topics evaluation split (odd sorted keys)"
        print(f"data: {p['windows']} windows x {args.seq_len} tokens of {source}; {p['tokens']} scored tokens")
    header = f"{'model':<40} {'size MB':>9} {'bits/w':>7} {'metric':>14} {'prefill ms':>11} {'decode ms':>10}"
    print(header)
    for row in rows:
        if row["kind"] == "causal-lm":
            metric = f"ppl {row['perplexity']['ppl']:.3f}"
        else:
            metric = f"cos {row['cosine']:.5f}" if "cosine" in row else "cos n/a"
        lat = row.get("latency") or {}
        pre = f"{lat['prefill_ms']:.1f}" if lat else "-"
        dec = f"{lat['decode_ms']:.2f}" if lat.get("decode_ms") is not None else "-"
        name = str(row["path"])[-40:]
        bpw = f"{row['bits_per_weight']:.2f}" if row["bits_per_weight"] is not None else "-"
        print(f"{name:<40} {row['size_bytes'] / 1e6:>9.1f} {bpw:>7} {metric:>14} {pre:>11} {dec:>10}")
    if len(rows) == 2 and first["kind"] == "causal-lm":
        ratio = first["perplexity"]["ppl"] / rows[1]["perplexity"]["ppl"]
        print(f"ppl ratio to baseline: {ratio:.4f}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    rows = evaluate_path(args)
    _print(rows, args)
    if args.json:
        from lowbit.compiler.fsutil import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(rows, indent=2) + "\n")
    return 0
