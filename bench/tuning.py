"""``lowbit-bench tuning``: run the recipe sweeps (:data:`lowbit.bench.recipe_sweep.SWEEPS`) on the
tuning split of SmolLM2-135M and write ``bench/TUNING.md``: for each recipe and key, the candidates'
tuning perplexity, the shipped value and the best one. Only this table may justify a recipe
setting; the evaluation split and the news domain are for reporting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["DEFAULT_OUTPUT", "add_arguments", "run"]

DEFAULT_OUTPUT = "bench/TUNING.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lowbit.bench.recipe_sweep import SWEEPS

    parser.add_argument("--recipes", nargs="+", default=list(SWEEPS), choices=list(SWEEPS), metavar="RECIPE",
                        help=f"recipes to sweep (default all: {', '.join(SWEEPS)})")
    parser.add_argument("--keys", nargs="+", metavar="KEY",
                        help="only these swept keys (e.g. activations); the other rows of an existing output are kept")
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help=f"Markdown table (default {DEFAULT_OUTPUT})")


def _is_shipped(shipped, key: str, value: str) -> bool:
    """Whether a candidate is the shipped recipe (every key it sets has the shipped value)."""
    from lowbit.bench.recipe_sweep import candidate_overrides
    from lowbit.core.recipe import load_recipe

    return repr(load_recipe(shipped.name, candidate_overrides(key, value))) == repr(shipped)


def _kept_rows(previous: str, recipe: str, key: str) -> list[str]:
    """The rows of ``key`` under ``## recipe`` in the ``previous`` text of the output (a sweep not rerun)."""
    section = previous.split(f"## {recipe}\n", 1)
    body = section[1].split("\n## ", 1)[0] if len(section) > 1 else ""
    rows = []
    for line in body.splitlines():
        if line.startswith(f"| {key} |"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 6 and cells[1].startswith("best on tuning:"):  # written when only pydoc's
                cells = [key, cells[1].replace("best on tuning:", "best on pydoc tuning:")] + [""] * 11  # tuning ppl was measured
            elif len(cells) == 6:
                cells = cells[:4] + ["-"] * 7 + cells[4:]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def _other_sections(previous: str, recipes: list[str]) -> list[str]:
    """The ``## recipe`` sections of the previous output for recipes this run did not sweep."""
    kept = []
    for section in previous.split("\n## ")[1:]:
        name = section.split("\n", 1)[0].strip()
        if name not in recipes:
            kept += [f"## {section.rstrip()}", ""]
    return kept


def run(args: argparse.Namespace) -> int:
    from lowbit.bench.recipe_sweep import SWEEPS, TUNING_TEXTS, candidate_overrides, measure
    from lowbit.bench.runner import machine_line
    from lowbit.core.recipe import load_recipe
    from lowbit.errors import LowbitError
    from lowbit.files.fsutil import check_writable_parent

    if args.keys:
        known = {key for name in args.recipes for key, _ in SWEEPS[name]}
        unknown = [k for k in args.keys if k not in known]
        if unknown:
            raise LowbitError(f"--keys {', '.join(unknown)}: not swept for {', '.join(args.recipes)} "
                              f"(swept: {', '.join(sorted(known))})")
    check_writable_parent(Path(args.output))
    previous = Path(args.output).read_text() if Path(args.output).is_file() else ""
    lines = ["# Recipe settings chosen on the tuning split", "",
             f"Command: `lowbit-bench tuning --recipes {' '.join(args.recipes)}"
             + (f" --keys {' '.join(args.keys)}" if args.keys else "") + "`", "", f"Machine: {machine_line()}", "",
             "SmolLM2-135M. Each candidate changes one key (or one group of keys that only work together) of the "
             "shipped recipe file. Perplexity, KL and top-1 agreement to FP32 on 8 x 512 windows of each "
             "**tuning** text: **pydoc** (pydoc_data.topics, the last quarter of the even sorted keys) and "
             "**wiki** (two encyclopedic articles in gensim's test data; a kind of text neither calibrated on "
             "nor reported, so a setting that only fits the calibration text's kind shows). QDQ in float "
             "(ORT_ENABLE_BASIC); calibration on the first `calibration.windows` windows of the calibration "
             "split. The best value has the lowest mean x FP32 over the tuning texts. The evaluation split and "
             "the news domain played no part."
             + (" Rows of other keys are kept from the previous run of this file ('-': not measured then)." if args.keys else ""), ""]
    heads = " | ".join(f"{t} ppl | x FP32 | KL | top-1 %" for t in TUNING_TEXTS)
    measured: dict[str, dict] = {}
    for name in args.recipes:
        shipped = load_recipe(name, [])
        lines += [f"## {name}", "", f"| key | value | {heads} | mean x FP32 | compile s | shipped |",
                  "|---|---|" + "---:|" * (4 * len(TUNING_TEXTS) + 2) + "---|"]
        for key, values in SWEEPS[name]:
            if args.keys and key not in args.keys:
                lines += _kept_rows(previous, name, key)
                continue
            results = {}
            for value in values:
                overrides = candidate_overrides(key, value)
                same = repr(load_recipe(name, overrides))  # a candidate equal to one measured is not rerun
                if same not in measured:
                    measured[same] = measure(name, overrides)
                r = results[value] = measured[same]
                print(f"{name} {key}={value}: mean {r['ratio']:.4f} x FP32 ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
                cells = [f"{t['ppl']:.3f} | {t['ratio']:.4f} | {t['kl']:.4f} | {100 * t['top1']:.1f}" for t in r["texts"].values()]
                mark = "yes" if _is_shipped(shipped, key, value) else ""
                lines.append(f"| {key} | {value} | {' | '.join(cells)} | {r['ratio']:.4f} | {r['seconds']:.1f} | {mark} |")
            best = min(results, key=lambda v: results[v]["ratio"])
            lines.append(f"| {key} | best on tuning: **{best}** |" + " |" * (4 * len(TUNING_TEXTS) + 3))
            # after every key: a long sweep that stops keeps what it measured (and the other recipes)
            _write(args.output, [*lines, "", *_other_sections(previous, args.recipes)])
        lines.append("")
    lines += _other_sections(previous, args.recipes)
    _write(args.output, lines)
    print(f"wrote {args.output}")
    return 0


def _write(output: str, lines: list[str]) -> None:
    from lowbit.files.fsutil import atomic_path

    with atomic_path(output) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
