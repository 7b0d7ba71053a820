"""``lowbit eval PATH [--baseline PATH]``: accuracy, size and latency of an ONNX model.

Causal LMs: perplexity on non-overlapping ``--seq-len`` windows of the evaluation split of each
text domain (``--domain``: Python's documentation and news articles, both by default; or
``--eval-text``); with ``--baseline`` (the FP32 model) also the mean KL divergence of the
next-token distribution to the baseline's and top-1 agreement with it. Encoders: mean cosine of
pooled embeddings to ``--baseline``, per domain.
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
    parser.add_argument("--domain", choices=("pydoc", "news", "both"), default="both",
                        help="evaluation text: Python's documentation, news articles, or both (default)")
    parser.add_argument("--eval-text", metavar="FILE", help="evaluate on this UTF-8 text instead of the domains")
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
    eval_text: str | None = None  # a user's UTF-8 text file instead of the domains' evaluation splits
    domains: tuple[str, ...] = ("pydoc", "news")  # models.data.DOMAINS evaluated, first = the headline
    latency: bool = True  # measure prefill (and decode) latency
    repeats: int = 10  # latency repetitions (median reported)
    runtime: str = "onnxruntime"  # or "openvino": which runtime executes the models

    def __post_init__(self) -> None:
        from lowbit.models.data import DOMAINS

        if self.seq_len < 2 or self.windows < 1 or self.texts < 1 or self.repeats < 1:
            raise LowbitError("--seq-len must be >= 2 and --windows, --texts, --repeats >= 1")
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or not self.domains:
            raise LowbitError(f"unknown or no evaluation domains {list(self.domains)} (known: {', '.join(DOMAINS)})")

    def text_sets(self) -> list[tuple[str, str]]:
        """(name, description) of each evaluation text, the headline first."""
        from lowbit.models.data import DOMAINS

        if self.eval_text:
            return [("text", str(self.eval_text))]
        return [(d, f"{DOMAINS[d]}, evaluation split") for d in self.domains]


def _footprint(path: str, opts: EvalOptions) -> dict:
    from lowbit.models import evaluate, footprint

    bits = footprint.linear_weight_bits(path)
    row: dict[str, Any] = {
        "path": path, "size_bytes": footprint.size_on_disk(path), "linear_sites": bits.sites,
        "bits_per_weight": bits.bits_per_weight if bits.sites else None,  # JSON has no NaN
    }
    if opts.latency:
        row["latency"] = asdict(evaluate.latency(path, repeats=opts.repeats, runtime=opts.runtime))
    return row


def _accuracy(path: str, kind: str, opts: EvalOptions, tokenizer: Any, data: Any,
              sessions: tuple[Any, Any]) -> tuple[dict, dict | None]:
    """(the model's, the baseline's) accuracy entries on one text: perplexity (and, with a
    baseline, the model's agreement with it) or embedding cosine. ``sessions``: the causal LM's
    and its baseline's, opened once for every text."""
    from lowbit.models import evaluate

    if kind == "causal-lm":
        mine_s, base_s = sessions
        if not opts.baseline:
            return {"perplexity": asdict(evaluate.perplexity(path, data, runtime=opts.runtime, session=mine_s))}, None
        mine, theirs, agree = evaluate.compare_to_reference(path, opts.baseline, data, runtime=opts.runtime,
                                                            session=mine_s, reference_session=base_s)
        return {"perplexity": asdict(mine), "agreement": asdict(agree)}, {"perplexity": asdict(theirs)}
    if not opts.baseline:
        return {}, None
    return {"cosine": evaluate.embedding_cosine(path, opts.baseline, data, tokenizer=tokenizer,
                                                runtime=opts.runtime)}, {}


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
    None, "ppl_ratio": model ppl / baseline ppl on the headline text or None, "texts": [{name,
    source, windows or texts}]}``. A row holds path, kind, size_bytes, linear_sites,
    bits_per_weight, latency, ``by_text`` (text name -> perplexity as PerplexityResult dict and,
    for the model with a baseline, agreement as AgreementResult dict; or cosine) and the
    headline text's ``perplexity`` / ``cosine`` at the top level.
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
    texts = []
    for name, source in opts.text_sets():
        domain = name if name in textdata.DOMAINS else "pydoc"
        if kind == "causal-lm":
            items = textdata.evaluation_windows(tokenizer, opts.seq_len, opts.windows, text_file=opts.eval_text,
                                                domain=domain)  # fmt: skip
            for p, sizes in limits.items():  # ids past the embedding or the logits: refused before running
                check_token_ids([items], sizes, what=opts.eval_text or source, model=p,
                                vocab_size=_vocab_size(tokenizer))
        else:
            items = textdata.text_samples("evaluation", opts.texts, text_file=opts.eval_text, domain=domain)
        texts.append((name, source, items))
    model = {"kind": kind, **_footprint(path, opts), "by_text": {}}
    base = {"kind": kind, **_footprint(str(opts.baseline), opts), "by_text": {}} if opts.baseline else None
    sessions: tuple[Any, Any] = (None, None)
    if kind == "causal-lm":  # one session per model for every text (loading a large model is slow)
        from lowbit.models.evaluate import open_session

        sessions = (open_session(path, runtime=opts.runtime), open_session(opts.baseline) if opts.baseline else None)
    for name, _, items in texts:
        mine, theirs = _accuracy(path, kind, opts, tokenizer, items, sessions)
        model["by_text"][name] = mine
        if base is not None and theirs is not None:
            base["by_text"][name] = theirs
    headline = texts[0][0]
    for row in (model, base):
        if row is not None:
            row.update(row["by_text"][headline])
    ratio = None
    if base is not None and kind == "causal-lm":
        ratio = model["perplexity"]["ppl"] / base["perplexity"]["ppl"]
    described = [{"name": n, "source": s, ("windows" if kind == "causal-lm" else "texts"): len(i)} for n, s, i in texts]
    return {"model": model, "baseline": base, "ppl_ratio": ratio, "texts": described}


def _metric(entry: dict) -> str:
    if "perplexity" in entry:
        return f"ppl {entry['perplexity']['ppl']:.3f}"
    return f"cos {entry['cosine']:.5f}" if "cosine" in entry else "cos n/a"


def _print(result: dict[str, Any], opts: EvalOptions) -> None:
    rows = [result["model"]] + ([result["baseline"]] if result["baseline"] else [])
    names = [t["name"] for t in result["texts"]]
    causal = rows[0]["kind"] == "causal-lm"
    for t in result["texts"]:
        if causal:
            p = rows[0]["by_text"][t["name"]]["perplexity"]
            print(f"{t['name']}: {p['windows']} windows x {opts.seq_len} tokens of {t['source']}; "
                  f"{p['tokens']} scored tokens")
        else:
            print(f"{t['name']}: {t['texts']} paragraphs of {t['source']}")
    metrics = "".join(f" {n[:14]:>14}" for n in names)
    print(f"{'model':<40} {'size MB':>9} {'bits/w':>7}{metrics} {'prefill ms':>11} {'decode ms':>10}")
    for row in rows:
        lat = row.get("latency") or {}
        pre = f"{lat['prefill_ms']:.1f}" if lat else "-"
        dec = f"{lat['decode_ms']:.2f}" if lat.get("decode_ms") is not None else "-"
        bpw = f"{row['bits_per_weight']:.2f}" if row["bits_per_weight"] is not None else "-"
        cells = "".join(f" {_metric(row['by_text'][n]):>14}" for n in names)
        print(f"{str(row['path'])[-40:]:<40} {row['size_bytes'] / 1e6:>9.1f} {bpw:>7}{cells} {pre:>11} {dec:>10}")
    if result["ppl_ratio"] is not None:
        print(f"ppl ratio to baseline: {result['ppl_ratio']:.4f}")
        for n in names:
            mine, theirs = result["model"]["by_text"][n], result["baseline"]["by_text"][n]
            a = mine["agreement"]
            print(f"  {n}: ppl ratio {mine['perplexity']['ppl'] / theirs['perplexity']['ppl']:.4f}, "
                  f"KL to baseline {a['kl']:.5f} nats/token, top-1 agreement {100 * a['top1']:.2f} %")


def run(args: argparse.Namespace) -> int:
    from lowbit.files.fsutil import atomic_path, check_writable_parent, recover_around

    recover_around(*(p for p in (args.path, args.baseline) if p))  # a compile killed mid-swap is put right first

    opts = EvalOptions(baseline=args.baseline, seq_len=args.seq_len, windows=args.windows,
                       texts=args.texts, eval_text=args.eval_text, latency=not args.no_latency, runtime=args.runtime,
                       repeats=args.repeats,
                       domains=("pydoc", "news") if args.domain == "both" else (args.domain,))
    if args.json:
        check_writable_parent(Path(args.json))
    result = evaluate_saved(args.path, **asdict(opts))
    _print(result, opts)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return 0
