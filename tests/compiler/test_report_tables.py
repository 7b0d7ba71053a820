"""The compile report's evaluation table: one row per model and text, ratio/KL/top-1 for the compiled model."""

from __future__ import annotations

from lowbit.compiler.report import render_markdown
from lowbit.compiler.report_tables import evaluation_rows


def _ev() -> dict:
    def lm(ppl_pydoc, ppl_news, agreement=None):
        texts = {"pydoc": {"perplexity": {"ppl": ppl_pydoc}}, "news": {"perplexity": {"ppl": ppl_news}}}
        for name, a in (agreement or {}).items():
            texts[name]["agreement"] = a
        return {"kind": "causal-lm", "path": "p", "size_bytes": 1e8, "bits_per_weight": 4.5, "by_text": texts}

    model = lm(16.0, 40.0, {"pydoc": {"kl": 0.1, "top1": 0.8}, "news": {"kl": 0.3, "top1": 0.6}})
    return {"model": model, "baseline": lm(15.0, 32.0), "ppl_ratio": 16 / 15,
            "texts": [{"name": "pydoc", "source": "a"}, {"name": "news", "source": "b"}]}


def test_rows_per_text_with_ratio_kl_and_top1():
    headers, rows = evaluation_rows(_ev())
    assert headers[:8] == ["model", "text", "size MB", "bits/weight", "perplexity", "x FP32", "KL to FP32", "top-1 %"]
    compiled_news = next(r for r in rows if r[:2] == ["compiled", "news"])
    assert compiled_news[4:8] == [40.0, "1.2500", 0.3, "60.00"]
    assert len(rows) == 4 and all(len(r) == len(headers) for r in rows)
    md = render_markdown({"evaluation": _ev(), "sites": {}, "recipe": {}})
    assert "| compiled | pydoc | 100.0 | 4.5 | 16.0 | 1.0667 | 0.1 | 80.00 |" in md


def test_a_report_written_before_per_text_results_still_renders():
    old = {"model": {"kind": "encoder", "size_bytes": 1e6, "cosine": 0.99}, "baseline": None}
    headers, rows = evaluation_rows(old)
    assert rows == [["compiled", "", "1.0", None, 0.99, None, None]] and len(headers) == 7
