"""The compile report: ``report.json`` (everything), ``report.md`` (text) and ``report.html``
(one self-contained page with the plots, see :mod:`lowbit.compiler.report_html`).

Holds the recipe, versions, per-pass timings and node counts, per-site formats and bits, the
SLAC range table and, when an evaluation ran, accuracy and size vs the FP32 input. Files are
written atomically.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from lowbit.files.fsutil import atomic_path

__all__ = ["render_markdown", "versions", "write"]

_PACKAGES = ("onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy", "ml_dtypes")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    recipe = report.get("recipe", {})
    lines = [f"# lowbit compile report: {recipe.get('name', '?')}", ""]
    lines += [f"- input: `{report.get('input', '?')}`", f"- target: `{recipe.get('target', '?')}`",
              f"- compile time: {report.get('compile_seconds', '?')} s",
              f"- lowbit {report.get('lowbit_version', '?')}; " + ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items()),
              f"- weights: `{recipe.get('weights')}`", f"- activations: `{recipe.get('activations')}`"]  # fmt: skip
    barriers = report.get("ort_fusion_barriers")
    if barriers:
        lines.append(f"- ONNX Runtime at its default options runs the graph as written: {barriers} weight "
                     "DequantizeLinear nodes carry a same-shape Reshape that keeps ORT from fusing them into "
                     "kernels that compute something else (README: ONNX Runtime's QDQ fusion)")
    npu = report.get("npu")
    if npu and npu.get("onnxruntime_x86"):
        lines.append(f"- {npu['onnxruntime_x86']}")
    attention = report.get("attention")
    if attention and (attention["fused"] or attention["kept"]):
        kept = "; ".join(f"{n} kept: {why}" for why, n in attention["kept"].items())
        lines.append(f"- attention: {attention['fused']} blocks fused into ONNX Attention + RotaryEmbedding (opset 23) "
                     f"({attention['nodes_before']} -> {attention['nodes_after']} nodes)" + (f"; {kept}" if kept else ""))
    sharing = report.get("embedding_codes_shared_with", {})
    for e in report.get("embeddings", []):
        shared = sharing.get(e["table"])
        lines.append(f"- embedding {e['table']}: {e['format']} ({e['bits_per_weight']:.2f} bits per weight), "
                     + (f"reads the codes of {shared}" if shared else "its own codes (no LM head stores the same ones)"))
    merged = report.get("merged_matmuls")
    if merged and merged["groups"]:
        lines.append(f"- {merged['nodes_before']} MatMulLowbit nodes that read one activation merged into "
                     f"{merged['groups']} (each followed by a Split)")
    lines.append("")
    lines += ["## Passes", ""]
    lines += _table(["pass", "seconds", "modified", "nodes before", "nodes after", "verified rel. diff"],
                    [[p["pass"], p["seconds"], p["modified"], p["nodes_before"], p["nodes_after"],
                      p.get("verified_rel_diff", "")] for p in report.get("passes", [])])  # fmt: skip
    sites = report.get("sites", {})
    quantized = [s for s in sites.values() if s.get("quantized")]
    lines += ["", "## Linear sites", "", f"{len(quantized)} quantized of {len(sites)}.", ""]
    lines += _table(["site", "weights", "block", "bits/weight", "activations", "feeder"],
                    [[name, s.get("weights", "float"), s.get("block_size", ""),
                      f"{s['bits_per_weight']:.3f}" if "bits_per_weight" in s else "",
                      s.get("activations", ""), s.get("feeder", s.get("reason", ""))]
                     for name, s in sites.items()])  # fmt: skip
    lines += _rotation_lines(report.get("rotate"))
    ev = report.get("evaluation")
    if ev:
        from lowbit.compiler.report_tables import evaluation_rows

        headers, rows = evaluation_rows(ev)
        lines += ["", "## Evaluation vs the FP32 input", ""] + _table(headers[:-2], [r[:-2] for r in rows])
    if report.get("slac"):
        cal = report.get("calibration", {})
        lines += ["", "## SLAC: activation range vs sequence length", "",
                  f"Calibrated on {cal.get('windows')} windows of {cal.get('seq_len')} tokens "
                  f"({cal.get('source')}); per tensor, absmax at each length / absmax at the deploy length.", ""]  # fmt: skip
        lines += _table(["seq len", "tensors", "median ratio", "min ratio", "max ratio"],
                        [[r["seq_len"], r["tensors"], f"{r['median_ratio']:.3f}", f"{r['min_ratio']:.3f}",
                          f"{r['max_ratio']:.3f}"] for r in report["slac"]])  # fmt: skip
    return "\n".join(lines) + "\n"


def _rotation_lines(rotate: dict[str, Any] | None) -> list[str]:
    """What each rotation did, or why it did not apply."""
    if not rotate:
        return []
    lines = ["", "## Rotations", ""]
    r1 = rotate.get("residual")
    if r1 is not None:
        lines.append(f"- R1 residual stream: rotated by {r1['matrix']} ({r1['writers']} writers, {r1['norms']} norms "
                     f"folded{', LM head untied' if r1['untied_head'] else ''}"
                     f"{', LM head kept tied behind a float hidden x hidden MatMul' if r1.get('tied_head_bridge') else ''})"
                     if r1["rotated"]
                     else f"- R1 residual stream: not applied ({r1['reason']})")  # fmt: skip
    r2 = rotate.get("heads")
    if r2 is not None:
        skipped = f"; {len(r2['skipped'])} skipped, e.g. {next(iter(r2['skipped'].values()))}" if r2["skipped"] else ""
        lines.append(f"- R2 heads: {r2['rotated_groups']} attention output groups rotated by {r2['matrix']}{skipped}")
    online = rotate.get("online")
    if online is not None:
        skipped = f"; skipped: {online['skipped']}" if online["skipped"] else ""
        lines.append(f"- online Hadamard ({', '.join(online['kinds'])}): {len(online['rotated'])} places{skipped}")
    return lines


def write(report: dict[str, Any], directory: Path, stem: str, *, atomic: bool = True) -> tuple[Path, Path, Path]:
    """Write ``{stem}.json``, ``{stem}.md`` and ``{stem}.html`` into ``directory`` (each file
    atomically; ``atomic=False`` inside a staging directory that is swapped in as a whole)."""
    from lowbit.compiler.report_html import render_html

    paths = directory / f"{stem}.json", directory / f"{stem}.md", directory / f"{stem}.html"
    texts = json.dumps(report, indent=1, default=str), render_markdown(report), render_html(report)
    for path, text in zip(paths, texts):
        if not atomic:
            path.write_text(text, encoding="utf-8")
            continue
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return paths
