"""Tables shared by the Markdown and the HTML compile report (owns no I/O)."""

from __future__ import annotations

from typing import Any

__all__ = ["evaluation_rows"]


def evaluation_rows(ev: dict) -> tuple[list[str], list[list[Any]]]:
    """The evaluation table of a report: one row per model and evaluation text, with the ratio to
    FP32, KL divergence and top-1 agreement where measured; the last two columns are latency."""
    causal = (ev.get("model") or {}).get("kind") == "causal-lm"
    metric = "perplexity" if causal else "cosine to FP32"
    headers = ["model", "text", "size MB", "bits/weight", metric]
    if causal:
        headers += ["x FP32", "KL to FP32", "top-1 %"]
    headers += ["prefill ms", "decode ms"]
    rows = []
    for label, row in (("FP32 input", ev.get("baseline")), ("compiled", ev.get("model"))):
        if not row:
            continue
        lat = row.get("latency") or {}
        # reports written before per-text results hold the headline entry only
        by_text = row.get("by_text") or {"": row}
        for text, entry in by_text.items():
            cells: list[Any] = [label, text, f"{row['size_bytes'] / 1e6:.1f}", row.get("bits_per_weight")]
            if causal:
                ppl = (entry.get("perplexity") or {}).get("ppl")
                base = ((ev.get("baseline") or {}).get("by_text") or {}).get(text, {}).get("perplexity") or {}
                agree = entry.get("agreement") or {}
                cells += [ppl, f"{ppl / base['ppl']:.4f}" if ppl and base.get("ppl") and label == "compiled" else "",
                          agree.get("kl", ""), f"{100 * agree['top1']:.2f}" if "top1" in agree else ""]
            else:
                cells.append(entry.get("cosine", 1.0 if label == "FP32 input" else None))
            rows.append(cells + [lat.get("prefill_ms"), lat.get("decode_ms")])
    return headers, rows
