"""``lowbit-bench architectures``: every architecture family x exporter x recipe on tiny random
models (``bench/ARCHITECTURES.md``).

Each family of :mod:`lowbit.models.tiny_hf` (hidden 32, 2 layers, seeded random weights) is
exported by ``lowbit export`` -- torch dynamo, and optimum with a KV cache for the causal LMs --
and compiled with each recipe under ``--verify`` (every function-preserving pass checked
numerically). A row says: whether it compiled (or the one-line refusal); linear sites quantized /
found beside the torch model's linear layers; norm nodes in the compiled graph beside the torch
model's norm modules; input groups whose smoothing scales were folded; whether R1 and R2 applied;
the largest change a verified pass made; and whether ONNX Runtime loads the output at its default
options and how close its output is to the FP32 export (cosine, on random weights: not an accuracy
figure). The reasons folding or rotation did not apply are listed under the table.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

__all__ = ["add_arguments", "run"]

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "ARCHITECTURES.md"
DEFAULT_RECIPES = "w8a8-rptq,w4a8-dint4,npu-w8a8"
SMALL = ("calibration.seq_len=32", "calibration.windows=2", "calibration.slac_lengths=[16]", "calibration.slac_windows=1")
_NORM_OPS = {"RMSNormalization", "LayerNormalization", "SimplifiedLayerNormalization"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated recipes (default {DEFAULT_RECIPES})")
    parser.add_argument("--families", default=None, help="comma-separated families (default: every one in lowbit.models.tiny_hf)")
    parser.add_argument("--work", default=None, help="directory for the tiny models, exports and outputs (default a temporary one)")
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), help=f"markdown file to write (default {DEFAULT_OUTPUT})")


def _torch_counts(hf_dir: Path) -> tuple[int, int]:
    """(linear layers, norm modules) of the part of the torch model the export holds."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from lowbit.models.registry import load_torch_model, resolve_model

    src = resolve_model(str(hf_dir))
    model = load_torch_model(src)
    if src.task.encoder_only:
        model = model.get_encoder()
    modules = list(model.modules())
    linears = sum(isinstance(m, (torch.nn.Linear, Conv1D)) for m in modules)
    norms = sum("norm" in type(m).__name__.lower() and any(True for _ in m.parameters(recurse=False)) for m in modules)
    return linears, norms


def _sample(family: str) -> np.ndarray:
    from lowbit.models.tiny_hf import VOCAB

    rng = np.random.default_rng(1)
    if family == "vit":
        return rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    return rng.integers(1, VOCAB, (2, 20))


def _first_output(path: Path, x: np.ndarray) -> np.ndarray:
    from lowbit.models.evaluate import open_session
    from lowbit.ort.feeds import build_feeds

    session = open_session(path)  # ONNX Runtime at its default options
    return session.run([session.get_outputs()[0].name], build_feeds(session, x))[0]


def _row(family: str, exporter: str, recipe: str, export: Path, out: Path, counts: tuple[int, int],
         fp32: np.ndarray) -> tuple[dict, list[str]]:  # fmt: skip
    """One compile under --verify and its checks (``fp32``: the export's output on
    :func:`_sample`); the reasons something did not apply."""
    from lowbit.compiler.api import compile as lowbit_compile

    row = {"family": family, "exporter": exporter, "recipe": recipe, "torch_linears": counts[0], "torch_norms": counts[1]}
    try:
        result = lowbit_compile(export, recipe, verify=True, overrides=SMALL)
    except LowbitError as e:
        return {**row, "compiled": f"refused: {e}"}, []
    except Exception as e:  # noqa: BLE001 - a crash is what this table exists to show
        return {**row, "compiled": f"crash: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}, []
    report = result.report
    result.save(out)
    sites = report["sites"].values()
    smooth = report.get("smooth", {}).get("groups", {})
    rotate = report.get("rotate", {})
    verified = [p["verified_rel_diff"] for p in report["passes"] if "verified_rel_diff" in p]
    why = [f"smoothing {name}: {g['reason']}" for name, g in smooth.items() if g.get("reason")]
    residual = rotate.get("residual")
    if residual and not residual.get("rotated"):
        why.append(f"R1: {residual['reason']}")
    why += [f"R2 {name}: {reason}" for name, reason in rotate.get("heads", {}).get("skipped", {}).items()]
    ours = _first_output(out, _sample(family))
    cosine = float((ours * fp32).sum() / (np.linalg.norm(ours) * np.linalg.norm(fp32)))
    norms = sum(n.op_type in _NORM_OPS or n.op_type == "ReorderNorm" for n in result.model.graph)
    row.update(compiled="yes", sites=f"{sum(bool(s.get('quantized')) for s in sites)} / {len(sites)}", norms=norms,
               smoothed=f"{sum(not g.get('reason') for g in smooth.values())} / {len(smooth)}" if smooth else "-",
               r1="-" if not residual else ("yes" if residual.get("rotated") else "no"),
               r2="-" if "heads" not in rotate else str(rotate["heads"]["rotated_groups"]),
               verify=f"{max(verified):.1e}" if verified else "-", ort_default="yes", cosine=f"{cosine:.4f}")  # fmt: skip
    return row, why


def _table(rows: list[dict]) -> str:
    head = ("| family | exporter | recipe | compiles | sites quantized / found | torch linears | norm nodes | torch norms "
            "| smoothing folded | R1 | R2 groups | --verify max rel | ORT default loads | cosine to FP32 |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        if r["compiled"] != "yes":
            lines.append(f"| {r['family']} | {r['exporter']} | {r['recipe']} | {r['compiled']} |" + " |" * 10)
            continue
        lines.append(f"| {r['family']} | {r['exporter']} | {r['recipe']} | yes | {r['sites']} | {r['torch_linears']} | "
                     f"{r['norms']} | {r['torch_norms']} | {r['smoothed']} | {r['r1']} | {r['r2']} | {r['verify']} | "
                     f"{r['ort_default']} | {r['cosine']} |")  # fmt: skip
    return "\n".join(lines)


def _reasons(rows_why: list[tuple[dict, list[str]]]) -> str:
    """Distinct reasons per family and exporter (layer indices folded away)."""
    import re

    out = []
    for row, why in rows_why:
        if not why:
            continue
        counted = Counter(re.sub(r"\.\d+\.", ".N.", w) for w in why)
        items = "; ".join(f"{w} (x{n})" if n > 1 else w for w, n in sorted(counted.items()))
        out.append(f"- {row['family']}, {row['exporter']}, {row['recipe']}: {items}")
    return "\n".join(out) or "- none"


def run(args: argparse.Namespace) -> int:
    import tempfile

    from lowbit.bench.cli_bench import check_report_path
    from lowbit.bench.runner import machine_line
    from lowbit.core.recipe import load_recipe
    from lowbit.files.fsutil import atomic_path
    from lowbit.models.export import export_model
    from lowbit.models.tiny_hf import ARCHITECTURES, CAUSAL, make_hf_dir

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    families = [f.strip() for f in args.families.split(",")] if args.families else list(ARCHITECTURES)
    unknown = [f for f in families if f not in ARCHITECTURES]
    if unknown or not recipes:
        raise LowbitError(f"--families: unknown {', '.join(unknown)} (known: {', '.join(ARCHITECTURES)})" if unknown
                          else "--recipes needs at least one recipe")  # fmt: skip
    for recipe in recipes:
        load_recipe(recipe)
    output = Path(args.output)
    check_report_path(output)
    started = machine_line()
    rows_why = []
    with tempfile.TemporaryDirectory(prefix="lowbit-architectures-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        (work / "out").mkdir(parents=True, exist_ok=True)
        os.environ["LOWBIT_CACHE"] = str(work / "cache")  # this run's exports, not the user's cache
        for family in families:
            hf_dir = work / family
            if os.path.lexists(hf_dir) and not (hf_dir / "config.json").is_file():
                raise LowbitError(f"--work {work}: {hf_dir} exists and is not a tiny model this bench wrote: "
                                  "name another --work directory")  # fmt: skip
            if not hf_dir.exists():  # reused when there (read only)
                make_hf_dir(hf_dir, family)
            counts = _torch_counts(hf_dir)
            for exporter, with_past in (("torch dynamo", False), ("optimum, KV cache", True)):
                if with_past and family not in CAUSAL:
                    continue
                export = export_model(str(hf_dir), with_past=with_past)
                fp32 = _first_output(export, _sample(family))  # once per export, not per recipe
                for recipe in recipes:
                    out = work / "out" / f"{family}-{'past' if with_past else 'dynamo'}-{recipe}"
                    row, why = _row(family, exporter, recipe, export, out, counts, fp32)
                    print(f"{family} / {exporter} / {recipe}: {row['compiled']}", flush=True)
                    rows_why.append((row, why))
    text = "\n".join([
        "# Architectures x exporters x recipes (tiny random models)", "",
        f"Command: `lowbit-bench architectures --recipes {','.join(recipes)}` -- {started}", "",
        __doc__.split("\n\n", 1)[1].strip(), "",
        _table([r for r, _ in rows_why]), "",
        "## Where folding or rotation did not apply, and why", "",
        _reasons(rows_why), "",
    ])  # fmt: skip
    with atomic_path(output) as tmp_out:
        tmp_out.write_text(text)
    print(f"wrote {output}")
    return 0
