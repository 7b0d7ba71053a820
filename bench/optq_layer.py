"""OPTQ's parts on one decoder layer of a real shape, as a block-wise compile runs them: the
inverse-Hessian factor, the rounding steps and the block-scale refit of each input group (q/k/v,
o_proj, gate/up, down_proj), one problem at a time on the pass's threads.

``lowbit-bench optq-layer [--shape llama-3-8b] [--format dint4 --block 32]`` prints a Markdown
table of seconds per part. Weights are random and X^T X comes from random correlated rows: the
time does not depend on the values (the algorithm is K steps over N columns whatever they hold).
"""

from __future__ import annotations

__all__ = ["run", "main"]

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from lowbit.encode import optq
from lowbit.encode.scale_refit import refit_block_scales
from lowbit.models.synthetic_llm import SHAPES


def _problems(shape_name: str) -> dict[str, tuple[int, int]]:
    s = SHAPES[shape_name]
    kv = s.kv_heads * s.head_dim
    return {"q/k/v": (s.hidden, s.hidden + 2 * kv), "o_proj": (s.hidden, s.hidden),
            "gate/up": (s.hidden, 2 * s.ffn), "down_proj": (s.ffn, s.hidden)}  # fmt: skip


def _time_problem(k: int, n: int, fmt: str, block: int | None, rng: np.random.Generator) -> dict[str, float]:
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    rows = rng.standard_normal((1024, k)).astype(np.float32)
    rows[:, : k // 2] += 0.5 * rows[:, k // 2 :]
    h = rows.T.astype(np.float64) @ rows
    del rows
    out: dict[str, float] = {}
    with threadpool_limits(1, user_api="blas"):  # as the pass sets it
        start = time.perf_counter()
        (q, scale, err), = optq._optq_solve([w], [h], fmt, block, damp=0.01, scale_method="mse", act_order=False,
                                            consume=True)  # fmt: skip
        out["factor + steps"] = time.perf_counter() - start
        h32 = h.astype(np.float32)
        del h
        with ThreadPoolExecutor(optq._THREADS) as pool:
            start = time.perf_counter()
            refit_block_scales(w, q, scale, h32, 0.01, block, err, pool=pool)
            out["refit"] = time.perf_counter() - start
    return out


def run(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(0)
    block = args.block or None
    rows = []
    for name, (k, n) in tqdm(_problems(args.shape).items(), desc="OPTQ layer", unit="group", disable=None):
        rows.append((name, k, n, _time_problem(k, n, args.format, block, rng)))
    print(f"OPTQ on one {args.shape} layer ({args.format}, block {block}, MSE scales), seconds\n")
    print("| input group | K | N | factor + steps | refit | total |\n|---|---:|---:|---:|---:|---:|")
    for name, k, n, t in rows:
        print(f"| {name} | {k} | {n} | {t['factor + steps']:.1f} | {t['refit']:.1f} | {sum(t.values()):.1f} |")
    total = sum(sum(t.values()) for *_, t in rows)
    print(f"| layer | | | | | **{total:.1f}** |")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--format", default="dint4")
    p.add_argument("--block", type=int, default=32, help="weight block size (0: per output channel)")


def main(argv: list[str] | None = None) -> int:
    from lowbit.bench.cli import main as bench_main

    return bench_main(["optq-layer", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
