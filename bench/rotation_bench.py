"""``lowbit-bench rotation``: rotations (R1, R2, online Hadamard) on SmolLM2-135M, every
combination with and without them, measured on the **evaluation** split of pydoc and on news --
for reporting only: which rotations a shipped recipe uses was chosen on the tuning texts
(``bench/TUNING.md``) -- with compile time; then the decode and prefill speed of the rotated
``ort-cpu`` model beside the unrotated one (the online Hadamard must be cheap). Writes
``bench/ROTATION.md``.

Accuracy: :func:`lowbit.bench.recipe_sweep.measure` (8 x 512-token windows per text, QDQ run at
ORT_ENABLE_BASIC, i.e. the graph as written; KL and top-1 against FP32). Speed: the optimum
KV-cache export compiled for ``ort-cpu``, median prefill of 128 tokens and median one-token
decode step after it, with the lowbit library registered, the rotated and unrotated models
alternating over ``--rounds`` rounds (the best median of each is kept: a shared machine only
ever adds time).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

__all__ = ["COMBOS", "DEFAULT_OUTPUT", "add_arguments", "run"]

log = logging.getLogger(__name__)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "ROTATION.md"

R1 = ["rotate.residual=true"]
R12 = [*R1, "rotate.heads=true"]
ONLINE = 'rotate.online=["gated_linear"]'
UNROTATED = ["rotate.residual=false", "rotate.heads=false", "rotate.online=[]"]
KV4 = ["kv.format=int4", "kv.granularity=per_channel", "kv.range=percentile", "kv.dynamic_k=true", "kv.dynamic_v=true"]

# (what, recipe, overrides): each shipped recipe, and with its rotations taken away or changed
COMBOS: list[tuple[str, str, list[str]]] = [
    ("W4A8, no rotation", "w4a8-dint4", UNROTATED),
    ("W4A8 + R1 only", "w4a8-dint4", [*UNROTATED, *R1]),
    ("W4A8 + R1 + R2 + online down_proj (shipped)", "w4a8-dint4", []),
    ("W4A8 rotated, RPTQ reorder off", "w4a8-dint4", ["reorder.clusters=0"]),
    ("W4A8 rotated, RTN instead of OPTQ", "w4a8-dint4", ["rounding.method=rtn"]),
    ("W4A8 KV4, no rotation", "w4a8-rot-kv4", UNROTATED),
    ("W4A8 KV4 rotated, Q/K not rotated", "w4a8-rot-kv4", [ONLINE]),
    ("W4A8 KV4 rotated, Q/K rotated online (shipped)", "w4a8-rot-kv4", []),
    ("NPU W8A8 (static per-tensor), no rotation", "npu-w8a8", []),
    ("NPU W8A8 + R1 + R2 (weights only)", "npu-w8a8", R12),
    ("W4A4, no rotation", "w4a4-rptq", []),
    ("W4A4 + R1 + R2 + online down_proj (shipped)", "w4a4-rot", []),
    ("W4A4 KV4 rotated, Q/K rotated online", "w4a4-rot", ['rotate.online=["gated_linear", "attention_qk"]', *KV4]),
]
SPEED_RECIPE = "w4a8-dint4"


def accuracy_rows(combos, windows: int) -> list[dict]:
    from lowbit.bench.recipe_sweep import measure

    rows = []
    for what, recipe, overrides in combos:
        log.info("accuracy: %s", what)
        r = measure(recipe, overrides, split="evaluation", windows=windows)
        rows.append({"what": what, "recipe": recipe, "overrides": overrides, **r})
    return rows


def speed_rows(threads: tuple[int, ...], rounds: int, repeats: int) -> list[dict]:
    """Median prefill / decode ms of the unrotated and rotated ort-cpu model, per thread count."""
    import lowbit
    from lowbit import runtime_ext
    from lowbit.models.evaluate import latency
    from lowbit.models.export import export_model

    export = export_model("smollm2-135m", with_past=True)
    # R1 + R2 alone isolates the online Hadamard's cost (an untied LM head also changes the graph)
    variants = {"unrotated": UNROTATED, "weights_only": ["rotate.online=[]"], "rotated": []}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-rotation-") as tmp:
        paths = {}
        for name, overrides in variants.items():
            log.info("speed: compiling %s", name)
            paths[name] = lowbit.compile(export, SPEED_RECIPE, target="ort-cpu", overrides=overrides).save(Path(tmp) / name)
        for n in threads:
            best: dict[str, tuple[float, float]] = {}
            for _ in range(rounds):
                for name, path in paths.items():
                    opts = runtime_ext.session_options()
                    opts.intra_op_num_threads, opts.inter_op_num_threads = n, 1
                    lat = latency(path, prefill_tokens=128, repeats=repeats, session_options=opts)
                    old = best.get(name, (float("inf"), float("inf")))
                    best[name] = (min(old[0], lat.prefill_ms), min(old[1], lat.decode_ms))
            rows.append({"threads": n, **{k: {"prefill_ms": v[0], "decode_ms": v[1]} for k, v in best.items()}})
    return rows


def render(acc: list[dict], speed: list[dict], windows: int, command: str) -> str:
    from lowbit.bench.runner import machine_line

    lines = ["# Rotations on SmolLM2-135M", "", f"Command: `{command}`", "", f"Machine: {machine_line()}", "",
             f"Evaluation split of pydoc and the news text, {windows} x 512 tokens each (reporting only: the "
             "shipped recipes' rotations were chosen on the tuning texts, bench/TUNING.md). QDQ at "
             "ORT_ENABLE_BASIC. KL: mean KL divergence of the next-token distribution to FP32; top-1: "
             "agreement with FP32's most likely token.", "",
             "| combination | recipe + overrides | pydoc x FP32 | KL | top-1 % | news x FP32 | KL | top-1 % | compile s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in acc:
        p, n = r["texts"]["pydoc"], r["texts"]["news"]
        sets = " ".join(f"`{o}`" for o in r["overrides"]) or "(as shipped)"
        lines.append(f"| {r['what']} | `{r['recipe']}` {sets} | {p['ratio']:.4f} | {p['kl']:.4f} | {100 * p['top1']:.1f} | "
                     f"{n['ratio']:.4f} | {n['kl']:.4f} | {100 * n['top1']:.1f} | {r['seconds']:.0f} |")  # fmt: skip
    if speed:
        lines += ["", f"Speed of `{SPEED_RECIPE}` compiled for `ort-cpu` (optimum KV-cache export, lowbit library "
                  "registered): median ms, best of the rounds. *R1 + R2* rotates the weights only (no Hadamard "
                  "op), so *rotated / R1 + R2* is the online Hadamard's cost; *rotated / unrotated* also holds "
                  "what R1 changes in the graph: the LM head gets its own weight. Unrotated, the int8 head tied to "
                  "the embedding is dequantized, transposed and multiplied at every step (about a third of a "
                  "decode step in ORT's profile); stored untied, ONNX Runtime fuses it into an 8-bit MatMulNBits.", "",
                  "| threads | prefill 128: unrotated / R1 + R2 / rotated | decode: unrotated / R1 + R2 / rotated | "
                  "decode rotated / unrotated | decode rotated / R1 + R2 |",
                  "|---:|---|---|---:|---:|"]  # fmt: skip
        for s in speed:
            u, w, r = s["unrotated"], s["weights_only"], s["rotated"]
            lines.append(f"| {s['threads']} | {u['prefill_ms']:.1f} / {w['prefill_ms']:.1f} / {r['prefill_ms']:.1f} | "
                         f"{u['decode_ms']:.2f} / {w['decode_ms']:.2f} / {r['decode_ms']:.2f} | "
                         f"{r['decode_ms'] / u['decode_ms']:.3f} x | {r['decode_ms'] / w['decode_ms']:.3f} x |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lowbit.bench.cli_bench import add_speed_report_arguments

    add_speed_report_arguments(parser, DEFAULT_OUTPUT, "speed rounds, rotated and unrotated alternating")
    parser.add_argument("--skip-speed", action="store_true", help="accuracy table only")


def run(args: argparse.Namespace) -> int:
    from lowbit.bench.cli_bench import check_speed_report_arguments
    from lowbit.core.recipe import load_recipe
    from lowbit.files.fsutil import atomic_path

    out = check_speed_report_arguments(args)
    for _, recipe, overrides in COMBOS:  # every combination loads before minutes of compiling
        load_recipe(recipe, overrides)
    command = "lowbit-bench rotation" + (f" --windows {args.windows}" if args.windows != 8 else "") + (
        " --skip-speed" if args.skip_speed else f" --rounds {args.rounds} --threads {' '.join(map(str, args.threads))}")
    acc = accuracy_rows(COMBOS, args.windows)
    speed = [] if args.skip_speed else speed_rows(tuple(args.threads), args.rounds, repeats=10)
    text = render(acc, speed, args.windows, command)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    print(text)
    return 0
