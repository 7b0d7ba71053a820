"""FGMP on SmolLM2-135M: perplexity of Fisher-guided vs random vs per-layer FP8 block assignment at
equal bits, with all-FP8 and all-NVFP4 ends, and the two plots (saved under ``bench/``).

``run() -> str`` returns Markdown. What it does, so the numbers can be trusted:

- one compile context (recipe ``fgmp-nvfp4-fp8``: NVFP4 weights with Fisher-weighted clipping,
  FP8 E4M3 per-channel for FP8 blocks, FP8 E4M3 per-tensor static activations) runs the real
  pipeline up to and including the activation QDQ and the FGMP assignment analysis (the empirical
  Fisher of the torch model on the 8 x 512 calibration windows, block impacts, candidates);
- every configuration then reuses the same candidates and impacts and differs only in its FP8
  mask: each site's float initializer is replaced by the mixed fake-quantized weight
  (``precision.mixed_weight``), which the two-branch DQ emission reproduces bit for bit
  (``tests/passes/test_fgmp.py``) -- a tied initializer (SmolLM2's lm_head / embedding table) is
  first split so that only the site's copy changes, as in the emission; one configuration is also compiled end to end through
  ``lowbit.compile`` to show both paths give the same perplexity;
- perplexity on the same 8 evaluation windows x 512 tokens for all, with ORT at
  ``ORT_ENABLE_BASIC`` (QDQ executed in float: exactly the quantized model's arithmetic; ORT's
  QDQ fusions do not accept FP8 activations);
- bits: NVFP4 block 4.5, FP8 block 8.0 bits/weight over the quantized linear weights (see
  ``passes/precision.py``); per-layer assignment takes whole sites and may land slightly below.

Weight grid caveat (FACTS.md): SmolLM2's FP32 weights come from a Q4_1 GGUF (block-32 asymmetric
4-bit grid); NVFP4 blocks of 16 do not align with that grid, but absolute numbers are specific to
this checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lowbit.passes.precision import PRECISION_ASSIGNMENT

__all__ = ["run", "measure", "measure_gap", "measure_variants", "plot", "to_markdown"]

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
FRACTIONS = (0.1, 0.2, 0.3)
STRATEGIES = ("fgmp", "random", "per_layer")


def _session_options():
    """ORT_ENABLE_BASIC (ORT's QDQ fusions reject FP8 activations) without weight prepacking.

    Prepacking: ORT repacks a MatMul's *constant* B for its SGEMM kernel, which sums in another
    order than the unpacked kernel a compiled model uses (its weights come out of DQ nodes at run
    time). Measured on SmolLM2 FGMP 30%: identical weights, first-layer outputs ~4e-6 apart, which
    flip FP8 activation roundings downstream and moved perplexity by 0.3% (17.017 vs 17.071);
    without prepacking the shortcut's logits equal the compiled model's bit for bit."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def _prepare(export_dir: Path, calib: np.ndarray, overrides: list[str]):
    """A context whose model has activation QDQ and float weights, plus the FGMP assignment."""
    from lowbit.compiler.api import load_onnx
    from lowbit.core.context import CalibrationData, CompileContext
    from lowbit.compiler.pipeline import build_pipeline
    from lowbit.core.recipe import load_recipe
    from lowbit.emit.mixed import EmitMixedWeightsPass
    from lowbit.models.fisher import shipped_fisher_provider

    recipe = load_recipe("fgmp-nvfp4-fp8", overrides)
    ctx = CompileContext(load_onnx(export_dir / "model.onnx"), recipe, CalibrationData(list(calib)),
                         fisher_provider=shipped_fisher_provider(str(export_dir), np.stack(calib)))
    for step in build_pipeline(ctx):
        if isinstance(step, EmitMixedWeightsPass):
            break
        if step(ctx.model).modified:
            ctx.analyses.graph_edited()
    return ctx, _untie(ctx)


def _untie(ctx) -> dict[str, ir.Value]:
    """{site name: the initializer that site alone reads}. A site whose initializer has other
    users (SmolLM2's lm_head weight is also the embedding Gather's table) gets its own copy, so
    replacing the site's weight quantizes nothing else -- exactly like the emission, which
    rewires only the site's consumer."""
    weights = {}
    for site in ctx.sites:
        weights[site.name] = site.weight
        if len(site.weight.uses()) < 2:
            continue
        t = site.weight.const_value
        copy = ir.Value(name=f"{site.weight.name}.site_copy", shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype),
                        const_value=t)  # fmt: skip
        ctx.model.graph.register_initializer(copy)
        consumer = site.weight_path[0] if site.weight_path else site.node
        consumer.replace_input_with(0 if site.weight_path else 1, copy)
        weights[site.name] = copy
    return weights


def _evaluate_masks(ctx, weights: dict[str, ir.Value], masks: dict[str, np.ndarray], windows: np.ndarray,
                    work: Path) -> float:
    """Perplexity with each site's weight = FP8 where ``masks`` says, NVFP4 elsewhere."""
    import dataclasses

    from lowbit.models.evaluate import perplexity
    from lowbit.passes.precision import mixed_weight

    assignment = ctx.analyses.get(PRECISION_ASSIGNMENT)
    originals = {}
    for name, choice in assignment.sites.items():
        w = mixed_weight(dataclasses.replace(choice, fp8=masks[name]))
        init = weights[name]
        originals[name] = init.const_value
        init.const_value = ir.tensor(w, name=init.name)
    try:
        path = work / "model.onnx"
        ir.save(ctx.model, path, external_data="model.onnx.data")
    finally:
        for name, value in originals.items():
            weights[name].const_value = value
    return perplexity(path, windows, session_options=_session_options(), progress=False).ppl


def measure(fractions=FRACTIONS, strategies=STRATEGIES, n_windows: int = 8, seq_len: int = 512) -> dict:
    """All measurements as a dict (see module doc)."""
    from lowbit.models.data import calibration_windows, evaluation_windows
    from lowbit.models.export import export_model
    from lowbit.models.registry import load_tokenizer
    from lowbit.passes.precision import choose_blocks, n_fp8_blocks

    export_dir = export_model("smollm2-135m")
    tok = load_tokenizer(export_dir)
    calib = calibration_windows(tok, seq_len, n_windows)
    evalw = evaluation_windows(tok, seq_len, n_windows)
    t0 = time.perf_counter()
    ctx, weights = _prepare(export_dir, calib, [])
    prep_s = time.perf_counter() - t0
    a = ctx.analyses.get(PRECISION_ASSIGNMENT)
    names = list(a.sites)
    impacts = [a.sites[n].impact for n in names]
    rows, per_site = [], {}
    with tempfile.TemporaryDirectory(prefix="fgmp-bench-") as tmp:
        def point(label: str, strategy: str, fraction: float) -> dict:
            k = n_fp8_blocks(a.total_blocks, fraction)
            masks, _ = choose_blocks(strategy, impacts, k, seed=0)
            by_name = dict(zip(names, masks))
            fp8 = sum(int(m.sum()) for m in masks)
            work = Path(tmp) / label
            work.mkdir()
            ppl = _evaluate_masks(ctx, weights, by_name, evalw, work)
            if strategy == "fgmp" and fraction == max(fractions):
                per_site.update({n: float(m.mean()) for n, m in by_name.items()})
            frac = fp8 / a.total_blocks
            row = {"label": label, "strategy": strategy, "requested": fraction, "fp8_fraction": frac,
                   "avg_bits": 4.5 + 3.5 * frac, "ppl": ppl}  # fmt: skip
            log.info("%s", row)
            return row

        rows.append(point("all-fp8", "fgmp", 1.0))
        rows.append(point("all-nvfp4", "fgmp", 0.0))
        for f in fractions:
            for s in strategies:
                rows.append(point(f"{s}-{f:g}", s, f))
    return {"rows": rows, "per_site": per_site, "sensitivity": a.sensitivity_source,
            "total_blocks": a.total_blocks, "prepare_seconds": prep_s, "windows": f"{n_windows} x {seq_len}"}  # fmt: skip


def measure_variants(n_windows: int = 8, seq_len: int = 512, work_root: Path | None = None) -> list[dict]:
    """End-to-end ``lowbit.compile`` rows on the same windows: the recipe as shipped (FGMP 30%,
    checks the bench's fake-quant shortcut), NVFP4 clipping by plain absmax (all-NVFP4 and FGMP
    30%: what the Fisher-weighted clip search buys) and runtime FGMP activations (FgmpActQuant,
    30% FP8 token-blocks, function fallback) and static FGMP activations (30% of the channels FP8
    E4M3, the rest E2M1, chosen from calibration, standard ops) instead of FP8 per-tensor static
    activations."""
    from lowbit.compiler.api import compile as lowbit_compile
    from lowbit.models.data import calibration_windows, evaluation_windows
    from lowbit.models.evaluate import perplexity
    from lowbit.models.export import export_model
    from lowbit.models.registry import load_tokenizer

    export_dir = export_model("smollm2-135m")
    tok = load_tokenizer(export_dir)
    calib = list(calibration_windows(tok, seq_len, n_windows))
    evalw = evaluation_windows(tok, seq_len, n_windows)
    variants = [
        ("fgmp-0.3 (lowbit.compile)", []),
        ("all-nvfp4, absmax clip", ["precision.clip=absmax", "precision.fp8_fraction=0.0"]),
        ("fgmp-0.3, absmax clip", ["precision.clip=absmax"]),
        ("fgmp-0.3, runtime FGMP activations 30%", ["activations.format=none", "precision.activations=runtime"]),
        ("fgmp-0.3, static FGMP activations 30% (standard ops)", ["activations.format=none", "precision.activations=static"]),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fgmp-variants-", dir=work_root) as tmp:
        for i, (label, overrides) in enumerate(variants):
            t0 = time.perf_counter()
            compiled = lowbit_compile(export_dir, "fgmp-nvfp4-fp8", calibration=calib, overrides=overrides)
            path = compiled.save(Path(tmp) / f"v{i}.onnx")
            seconds = time.perf_counter() - t0
            ppl = perplexity(path, evalw, session_options=_session_options(), progress=False).ppl
            rep = compiled.report["precision"]
            row = {"label": label, "overrides": overrides, "fp8_fraction": rep["fp8_fraction"],
                   "avg_bits": rep["avg_bits"], "ppl": ppl, "compile_seconds": seconds,
                   "activations": rep.get("activations")}  # fmt: skip
            log.info("%s", row)
            rows.append(row)
    return rows


def _gap_masks(kind: str, names: list[str], impacts: list[np.ndarray], total: int) -> dict[str, np.ndarray]:
    """FP8 masks: ``all-fp8`` | ``all-nvfp4`` | ``fgmp`` (30%) | ``lm_head-fp8`` / ``lm_head-nvfp4``
    (the tied lm_head, 21% of the blocks, forced to one precision; the rest of the 30% by impact)."""
    from lowbit.passes.precision import n_fp8_blocks, top_k_masks

    if kind in ("all-fp8", "all-nvfp4"):
        return {n: np.full(i.shape, kind == "all-fp8") for n, i in zip(names, impacts)}
    k = n_fp8_blocks(total, 0.3)
    if kind == "fgmp":
        masks, _ = top_k_masks(impacts, k)
        return dict(zip(names, masks))
    forced = kind == "lm_head-fp8"
    rest = [i for n, i in zip(names, impacts) if n != "lm_head"]
    lm = impacts[names.index("lm_head")]
    masks, _ = top_k_masks(rest, k - (lm.size if forced else 0))
    masks.insert(names.index("lm_head"), np.full(lm.shape, forced))
    return dict(zip(names, masks))


GAP_EXPERIMENTS = (  # (what, recipe overrides, mask kinds)
    ("float activations: the weights' share of the gap", ["activations.format=none"], ("all-fp8", "fgmp", "all-nvfp4")),
    ("FP8 activations: lm_head precision", [], ("fgmp", "lm_head-fp8", "lm_head-nvfp4")),
    ("FP8 activations: diag(X^T X) proxy instead of the Fisher", ["precision.sensitivity=proxy"], ("fgmp",)),
    ("static FGMP activations 30%: the activations' share", ["activations.format=none", "precision.activations=static"], ("all-fp8", "fgmp")),
    ("runtime FGMP activations 30%: the activations' share", ["activations.format=none", "precision.activations=runtime"], ("all-fp8",)),
)  # fmt: skip


def measure_gap(experiments=GAP_EXPERIMENTS, n_windows: int = 8, seq_len: int = 512) -> list[dict]:
    """Where FGMP-30%'s distance to all-FP8 comes from, on the same windows: weights vs activations
    (float activations; all-FP8 weights under FGMP activations), the lm_head's share of FP8 blocks,
    and the sensitivity source. One prepared context per experiment; masks as in :func:`measure`."""
    from lowbit.models.data import calibration_windows, evaluation_windows
    from lowbit.models.export import export_model
    from lowbit.models.registry import load_tokenizer

    export_dir = export_model("smollm2-135m")
    tok = load_tokenizer(export_dir)
    calib = calibration_windows(tok, seq_len, n_windows)
    evalw = evaluation_windows(tok, seq_len, n_windows)
    rows = []
    for what, overrides, kinds in experiments:
        ctx, weights = _prepare(export_dir, calib, overrides)
        a = ctx.analyses.get(PRECISION_ASSIGNMENT)
        names = list(a.sites)
        impacts = [a.sites[n].impact for n in names]
        with tempfile.TemporaryDirectory(prefix="fgmp-gap-") as tmp:
            for kind in kinds:
                masks = _gap_masks(kind, names, impacts, a.total_blocks)
                work = Path(tmp) / kind
                work.mkdir()
                ppl = _evaluate_masks(ctx, weights, masks, evalw, work)
                fp8 = sum(int(m.sum()) for m in masks.values()) / a.total_blocks
                row = {"experiment": what, "overrides": overrides, "weights": kind, "fp8_fraction": fp8,
                       "lm_head_fp8": float(masks["lm_head"].mean()), "ppl": ppl, "sensitivity": a.sensitivity}  # fmt: skip
                log.info("%s", row)
                rows.append(row)
        del ctx, weights
    return rows


def plot(result: dict, out_dir: Path = BENCH_DIR) -> tuple[Path, Path]:
    """(per-layer FP8 fraction bar chart, Pareto ppl-vs-bits plot) as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_site = result["per_site"]
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    layers = sorted({int(n.split(".")[2]) for n in per_site if n.startswith("model.layers.")})
    fig, ax = plt.subplots(figsize=(14, 4.5))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        vals = [per_site.get(next((n for n in per_site if n.startswith(f"model.layers.{l}.") and n.endswith(kind)), ""), 0.0)
                for l in layers]  # fmt: skip
        ax.bar(np.array(layers) + (i - len(kinds) / 2) * width, vals, width, label=kind)
    if "lm_head" in per_site:
        ax.axhline(per_site["lm_head"], color="black", ls="--", lw=1, label=f"lm_head ({per_site['lm_head']:.2f})")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fraction of FP8 blocks")
    ax.set_title("FGMP on SmolLM2-135M: FP8 blocks per layer and projection (30% FP8 overall)")
    ax.legend(ncol=4, fontsize=8)
    bars = out_dir / "fgmp_fp8_per_layer.png"
    fig.tight_layout()
    fig.savefig(bars, dpi=110)
    plt.close(fig)

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ends = {r["label"]: r for r in rows if r["label"] in ("all-fp8", "all-nvfp4")}
    for s, marker in zip(STRATEGIES, "osd"):
        pts = sorted([r for r in rows if r["strategy"] == s and r["label"].startswith(s)], key=lambda r: r["avg_bits"])
        pts = [ends["all-nvfp4"]] + pts + [ends["all-fp8"]]
        ax.plot([r["avg_bits"] for r in pts], [r["ppl"] for r in pts], marker=marker, label=s)
    ax.axhline(1.01 * ends["all-fp8"]["ppl"], color="gray", ls=":", label="1.01 x all-FP8")
    ax.set_xlabel("average bits per weight (NVFP4 4.5, FP8 8.0)")
    ax.set_ylabel("perplexity (8 x 512 eval tokens)")
    ax.set_title("SmolLM2-135M: perplexity vs bits")
    ax.legend()
    pareto = out_dir / "fgmp_pareto.png"
    fig.tight_layout()
    fig.savefig(pareto, dpi=110)
    plt.close(fig)
    return bars, pareto


def to_markdown(result: dict, pngs: tuple[Path, Path]) -> str:
    rows = result["rows"]
    fp8 = next(r for r in rows if r["label"] == "all-fp8")["ppl"]
    lines = [
        "## FGMP (mixed NVFP4 / FP8 weight blocks) on SmolLM2-135M",
        "",
        f"Eval {result['windows']} tokens, FP8 E4M3 per-tensor static activations everywhere, "
        f"{result['total_blocks']} weight blocks of 16. Sensitivity: {result['sensitivity']}. "
        "ORT CPU at ORT_ENABLE_BASIC.",
        "",
        "| configuration | FP8 blocks | avg bits | perplexity | x all-FP8 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['fp8_fraction']:.4f} | {r['avg_bits']:.3f} | {r['ppl']:.3f} | {r['ppl'] / fp8:.4f} |")
    if result.get("variants"):
        lines += ["", "End-to-end `lowbit compile --recipe fgmp-nvfp4-fp8` variants (same windows):", "",
                  "| variant | FP8 blocks | avg bits | perplexity | x all-FP8 |", "|---|---|---|---|---|"]
        for r in result["variants"]:
            lines.append(f"| {r['label']} | {r['fp8_fraction']:.4f} | {r['avg_bits']:.3f} | {r['ppl']:.3f} | {r['ppl'] / fp8:.4f} |")
    if result.get("gap"):
        lines += ["", "Where the gap to all-FP8 comes from (`measure_gap()`, same windows; weights at 30% FP8 "
                  "blocks unless the row says otherwise):", "",
                  "| experiment | weights | FP8 blocks | lm_head FP8 | sensitivity | perplexity | x all-FP8 |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["gap"]:
            lines.append(f"| {r['experiment']} | {r['weights']} | {r['fp8_fraction']:.4f} | {r['lm_head_fp8']:.3f} | "
                         f"{r['sensitivity']} | {r['ppl']:.3f} | {r['ppl'] / fp8:.4f} |")  # fmt: skip
    lines += ["", f"![FP8 blocks per layer]({pngs[0].name})  ![Pareto]({pngs[1].name})", ""]
    return "\n".join(lines)


def run() -> str:
    result = measure()
    result["variants"] = measure_variants()
    result["gap"] = measure_gap()
    return to_markdown(result, plot(result))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(run())
