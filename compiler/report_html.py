"""The compile report as one self-contained HTML page (``report.html``).

Rendered from the report dict alone (what ``report.json`` holds), so ``lowbit report OUT`` can
regenerate it. Self-contained: inline CSS, every image a base64 ``data:`` URI, no scripts and no
external links, so the file can be mailed, archived as a CI artifact or opened offline. Every
piece of report text goes through :func:`html.escape`; the page skeleton is a
:class:`string.Template`.

Sections: summary cards, evaluation vs the FP32 input (when an eval ran), recipe, versions, pass
timings, per-site formats and bits, SLAC range tables and chart, RPTQ reorder range plot, FGMP
per-layer FP8 chart, the emission target's own record (``report["npu"]``, ``report["ort_cpu"]``)
and every other record a pass left in the report (generic view), so new records show without
changes here.
"""

from __future__ import annotations

import datetime
import html
import json
from string import Template
from typing import Any

from lowbit.compiler import report_plots

__all__ = ["render_html", "KNOWN_KEYS"]

# Report keys with their own section; anything else lands under "Other records".
KNOWN_KEYS = frozenset({"recipe", "passes", "sites", "input", "lowbit_version", "versions", "slac", "slac_tensors",
                        "calibration", "reorder", "precision", "compile_seconds", "evaluation", "source"})  # fmt: skip

_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dde1e8; --head: #f3f5f9; --accent: #2f5db8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: #fafbfc; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
p { margin: 6px 0; }
.sub, .note { color: var(--muted); }
.note { font-size: 12.5px; }
code { font: 12.5px/1.3 ui-monospace, "DejaVu Sans Mono", monospace; background: var(--head); padding: 1px 4px;
       border-radius: 3px; }
nav { margin: 12px 0 4px; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0 4px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; min-width: 150px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; }
table { border-collapse: collapse; background: #fff; font-size: 13px; margin: 6px 0; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; position: sticky; top: 0; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { max-height: 420px; overflow: auto; border: 1px solid var(--line); display: inline-block; max-width: 100%; }
.scroll table { margin: 0; }
img { max-width: 100%; background: #fff; border: 1px solid var(--line); border-radius: 6px; margin: 8px 0; }
details { margin: 8px 0; }
summary { cursor: pointer; color: var(--accent); }
pre { background: #fff; border: 1px solid var(--line); padding: 8px; overflow: auto; max-height: 360px;
      font: 12px/1.35 ui-monospace, "DejaVu Sans Mono", monospace; }
.tag { display: inline-block; padding: 0 6px; border-radius: 4px; background: #e8eefb; color: #234a94; font-size: 12px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""

_PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lowbit compile report: $title</title>
<style>$css</style>
</head>
<body>
<main>
$body
<footer>Rendered by lowbit $version on $rendered from report.json. Self-contained page: no scripts, no external resources.</footer>
</main>
</body>
</html>
""")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.{digits}f}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset(), scroll: bool = False) -> str:
    def cell(tag: str, i: int, value: Any) -> str:
        cls = ' class="n"' if i in numeric else ""
        return f"<{tag}{cls}>{_e(_fmt(value))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "\n".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    table = f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"
    return f'<div class="scroll">{table}</div>' if scroll else table


def _img(png_base64: str | None, alt: str) -> str:
    if not png_base64:
        return ""
    return f'<img src="data:image/png;base64,{png_base64}" alt="{_e(alt)}">'


def _card(key: str, value: Any) -> str:
    return f'<div class="card"><div class="k">{_e(key)}</div><div class="v">{_e(value)}</div></div>'


def _quantized_bits(sites: dict[str, dict]) -> tuple[float | None, int]:
    """Weight-count-weighted bits per weight over quantized sites, and their weight count."""
    bits = weights = 0
    for s in sites.values():
        if s.get("quantized") and "bits_per_weight" in s and s.get("shape"):
            n = 1
            for d in s["shape"]:
                n *= int(d)
            bits += s["bits_per_weight"] * n
            weights += n
    return (bits / weights if weights else None), weights


def _header(report: dict) -> str:
    recipe = report.get("recipe", {})
    sites = report.get("sites", {})
    quantized = sum(1 for s in sites.values() if s.get("quantized"))
    avg_bits, _ = _quantized_bits(sites)
    cards = [_card("target", recipe.get("target", "?")), _card("sites quantized", f"{quantized} / {len(sites)}")]
    if avg_bits is not None:
        cards.append(_card("bits / weight (quantized)", f"{avg_bits:.2f}"))
    cards.append(_card("compile time", f"{_fmt(report.get('compile_seconds'), 1)} s"))
    ev = report.get("evaluation") or {}
    if ev.get("ppl_ratio") is not None:
        cards.append(_card("perplexity vs FP32", f"{ev['ppl_ratio']:.3f} x"))
    elif (ev.get("model") or {}).get("cosine") is not None:
        cards.append(_card("cosine to FP32", f"{ev['model']['cosine']:.4f}"))
    if ev.get("baseline"):
        cards.append(_card("size vs FP32", f"{ev['model']['size_bytes'] / ev['baseline']['size_bytes']:.3f} x"))
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in _sections_present(report))
    return (f"<header><h1>lowbit compile report: {_e(recipe.get('name', '?'))}</h1>"
            f'<p class="sub">{_e(recipe.get("description", ""))}</p>'
            f'<p>input <code>{_e(report.get("input", "?"))}</code> &middot; target <span class="tag">'
            f'{_e(recipe.get("target", "?"))}</span></p>'
            f'<div class="cards">{"".join(cards)}</div><nav>{nav}</nav></header>')  # fmt: skip


def _sections_present(report: dict) -> list[tuple[str, str]]:
    out = []
    if report.get("evaluation"):
        out.append(("evaluation", "Evaluation"))
    out += [("recipe", "Recipe"), ("versions", "Versions"), ("passes", "Passes"), ("sites", "Sites")]
    if report.get("slac"):
        out.append(("slac", "SLAC"))
    if report.get("reorder"):
        out.append(("reorder", "Reorder"))
    if report.get("precision"):
        out.append(("fgmp", "FGMP"))
    if _target_key(report):
        out.append(("target", "Target"))
    if any(k not in KNOWN_KEYS and k != _target_key(report) for k in report):
        out.append(("other", "Other records"))
    return out


def _evaluation(ev: dict) -> str:
    from lowbit.compiler.report_tables import evaluation_rows

    headers, rows = evaluation_rows(ev)
    parts = ['<section id="evaluation"><h2>Evaluation vs the FP32 input</h2>',
             _table(headers, rows, numeric=set(range(2, len(headers))))]
    if ev.get("ppl_ratio") is not None:
        parts.append(f"<p>Perplexity ratio compiled / FP32: <b>{ev['ppl_ratio']:.4f}</b></p>")
    if ev.get("baseline") and ev.get("model"):
        parts.append(f"<p>Size ratio compiled / FP32: <b>{ev['model']['size_bytes'] / ev['baseline']['size_bytes']:.3f}</b></p>")
    ppl = (ev.get("model") or {}).get("perplexity") or {}
    what = [f"{ppl.get('windows')} windows, {ppl.get('tokens')} scored tokens per text" if ppl else "mean-pooled embeddings"]
    what += [f"{t['name']}: {t['source']}" for t in ev.get("texts", [])]
    what += [f"{k}={v}" for k, v in (ev.get("options") or {}).items()]
    parts.append(f'<p class="note">Measured as <code>lowbit eval</code> does ({_e("; ".join(what))}). '
                 "Latency: median, ONNX Runtime CPU, machine load not controlled.</p></section>")  # fmt: skip
    return "\n".join(parts)


def _recipe(recipe: dict) -> str:
    rows = []
    for section, value in recipe.items():
        if isinstance(value, dict):
            rows.append([section, ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())])
        elif section not in ("name", "description"):
            rows.append([section, json.dumps(value)])
    return (f'<section id="recipe"><h2>Recipe <code>{_e(recipe.get("name", "?"))}</code></h2>'
            f"{_table(['section', 'keys'], rows)}</section>")  # fmt: skip


def _versions(report: dict) -> str:
    rows = [["lowbit", report.get("lowbit_version", "?")]] + [[k, v] for k, v in report.get("versions", {}).items()]
    return f'<section id="versions"><h2>Versions</h2>{_table(["package", "version"], rows)}</section>'


def _passes(passes: list[dict]) -> str:
    rows = [[i, p["pass"], p["seconds"], p["modified"], p["nodes_before"], p["nodes_after"],
             p.get("verified_rel_diff", "")] for i, p in enumerate(passes)]  # fmt: skip
    total = sum(p["seconds"] for p in passes)
    return (f'<section id="passes"><h2>Passes</h2><p>{len(passes)} passes, {total:.2f} s in passes.</p>'
            + _table(["#", "pass", "seconds", "modified", "nodes before", "nodes after", "verified rel. diff"],
                     rows, numeric={0, 2, 4, 5, 6})  # fmt: skip
            + "</section>")


def _sites(sites: dict[str, dict], per_site_fp8: dict[str, float]) -> str:
    quantized = {n: s for n, s in sites.items() if s.get("quantized")}
    by_group: dict[tuple, dict[str, dict]] = {}
    for n, s in quantized.items():
        key = (s.get("weights", "float"), s.get("block_size", 0), s.get("activations", "none"))
        by_group.setdefault(key, {})[n] = s
    summary = [[w, b or "per-channel", a, len(members), _quantized_bits(members)[0]]
               for (w, b, a), members in sorted(by_group.items(), key=lambda kv: -len(kv[1]))]  # fmt: skip
    avg, weights = _quantized_bits(sites)
    headers = ["site", "weights", "block", "bits/weight", "activations", "feeder / reason"]
    if per_site_fp8:
        headers.append("FP8 block fraction")
    rows = []
    for name, s in sites.items():
        block = s.get("block_size", "")
        row = [name, s.get("weights", "float") if s.get("quantized") else "float (kept)",
               "per-channel" if block == 0 and s.get("quantized") else block,
               s.get("bits_per_weight"), s.get("activations", ""), s.get("feeder", s.get("reason", ""))]  # fmt: skip
        if per_site_fp8:
            row.append(per_site_fp8.get(name))
        rows.append(row)
    avg_text = f" Quantized weights: {weights:,}, {avg:.3f} bits per weight on average." if avg is not None else ""
    return (f'<section id="sites"><h2>Linear sites: formats and bits</h2>'
            f"<p>{len(quantized)} of {len(sites)} linear sites quantized.{_e(avg_text)}</p>"
            + _table(["weights", "block", "activations", "sites", "bits/weight (mean)"], summary, numeric={3, 4})
            + "<h3>Per site</h3>" + _table(headers, rows, numeric={3, 6}, scroll=True)
            + '<p class="note">bits/weight includes the scales (and zero points) stored per block or channel.</p>'
            + "</section>")  # fmt: skip


def _slac(report: dict) -> str:
    cal = report.get("calibration", {})
    rows = [[r["seq_len"], r["tensors"], r["median_ratio"], r["min_ratio"], r["max_ratio"]] for r in report["slac"]]
    parts = ['<section id="slac"><h2>SLAC: activation range vs sequence length</h2>',
             f"<p>Calibrated on {_e(cal.get('windows'))} windows of {_e(cal.get('seq_len'))} tokens "
             f"({_e(cal.get('source'))}), {_e(cal.get('taps'))} tensors observed. Per tensor: absmax at each "
             "window length / absmax at the deploy length; a ratio below 1 is the range a calibration at "
             "that length would clip.</p>",
             _table(["window length", "tensors", "median ratio", "min ratio", "max ratio"], rows, numeric={0, 1, 2, 3, 4}),
             _img(report_plots.slac_png(report["slac"]), "SLAC range ratio vs window length")]  # fmt: skip
    tensors = report.get("slac_tensors") or []
    if tensors:
        lengths = sorted({int(n) for t in tensors for n in t["absmax"]})
        rows = [[t["tensor"]] + [t["absmax"].get(str(n)) for n in lengths] for t in tensors]
        parts += ["<h3>Per tensor: absmax at each window length</h3>",
                  _table(["tensor"] + [f"{n} tokens" for n in lengths], rows,
                         numeric=set(range(1, len(lengths) + 1)), scroll=True)]  # fmt: skip
    parts.append("</section>")
    return "\n".join(parts)


def _reorder(rep: dict) -> str:
    groups = rep.get("groups", {})
    rows = [[k, g.get("feeder", ""), g.get("clusters", ""), g.get("reordered", False), g.get("reason", "")]
            for k, g in groups.items()]  # fmt: skip
    plot = rep.get("plot") or {}
    return (f'<section id="reorder"><h2>RPTQ reorder</h2><p>{_e(rep.get("clusters"))} K-means clusters per input; '
            f"{_e(rep.get('clustered_groups', 0))} inputs clustered, {_e(rep.get('permuted_groups', 0))} permuted, "
            f"{_e(rep.get('gathers', 0))} Gathers inserted.</p>"
            + (f"<h3>Per-channel ranges before and after reordering: <code>{_e(plot.get('site'))}</code> input</h3>"
               + _img(plot.get("png_base64"), "per-channel ranges before and after reordering") if plot else "")
            + "<h3>Input groups</h3>"
            + _table(["group (first site)", "feeder", "clusters", "reordered", "note"], rows, numeric={2}, scroll=True)
            + "</section>")  # fmt: skip


def _fgmp(rep: dict) -> str:
    skip = {"per_site_fp8_fraction", "activations"}
    rows = [[k, v] for k, v in rep.items() if k not in skip and not isinstance(v, (dict, list))]
    act = rep.get("activations")
    parts = ['<section id="fgmp"><h2>FGMP: mixed NVFP4 / FP8 weight blocks</h2>', _table(["key", "value"], rows),
             _img(report_plots.fgmp_per_layer_png(rep.get("per_site_fp8_fraction") or {}), "FP8 block fraction per layer")]  # fmt: skip
    if act:
        parts.append(f"<h3>Runtime activation precision</h3><pre>{_e(json.dumps(act, indent=1, default=str))}</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def _target_key(report: dict) -> str | None:
    """The report entry the emission target wrote about itself (``npu``, ``ort_cpu``), if any."""
    key = str(report.get("recipe", {}).get("target", "")).replace("-", "_")
    return key if isinstance(report.get(key), dict) else None


def _target(report: dict, key: str) -> str:
    record = report[key]
    scalars = [[k, v] for k, v in record.items() if not isinstance(v, (dict, list))]
    nested = {k: v for k, v in record.items() if isinstance(v, (dict, list))}
    parts = [f'<section id="target"><h2>Target <code>{_e(report["recipe"]["target"])}</code></h2>',
             _table(["key", "value"], scalars) if scalars else ""]  # fmt: skip
    for k, v in nested.items():
        parts.append(f"<details><summary>{_e(k)}</summary><pre>{_e(json.dumps(_strip_images(v), indent=1, default=str))}</pre></details>")
    parts.append("</section>")
    return "\n".join(parts)


def _strip_images(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<png omitted>" if k.endswith("png_base64") else _strip_images(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_images(v) for v in value]
    return value


def _other(report: dict) -> str:
    extra = {k: v for k, v in report.items() if k not in KNOWN_KEYS and k != _target_key(report)}
    if not extra:
        return ""
    parts = ['<section id="other"><h2>Other records</h2>',
             '<p class="note">What other passes and the target recorded, as stored in report.json.</p>']
    for key, value in extra.items():
        text = json.dumps(_strip_images(value), indent=1, default=str)
        if len(text) > 200:
            parts.append(f"<details><summary>{_e(key)}</summary><pre>{_e(text)}</pre></details>")
        else:
            parts.append(f"<h3>{_e(key)}</h3><pre>{_e(text)}</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(report: dict[str, Any]) -> str:
    """The whole page for one compile report (see the module docstring)."""
    precision = report.get("precision") or {}
    body = [_header(report)]
    if report.get("evaluation"):
        body.append(_evaluation(report["evaluation"]))
    body += [_recipe(report.get("recipe", {})), _versions(report), _passes(report.get("passes", [])),
             _sites(report.get("sites", {}), precision.get("per_site_fp8_fraction") or {})]  # fmt: skip
    if report.get("slac"):
        body.append(_slac(report))
    if report.get("reorder"):
        body.append(_reorder(report["reorder"]))
    if precision:
        body.append(_fgmp(precision))
    if _target_key(report):
        body.append(_target(report, _target_key(report)))
    body.append(_other(report))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return _PAGE.substitute(title=_e(report.get("recipe", {}).get("name", "?")), css=_CSS, body="\n".join(body),
                            version=_e(report.get("lowbit_version", "?")), rendered=now)  # fmt: skip
