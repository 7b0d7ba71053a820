"""``lowbit generate MODEL "prompt"``: stream a continuation from a compiled causal LM.

MODEL is a causal-LM export directory (``lowbit compile``'s output of one, or ``lowbit export``'s)
or its ``.onnx`` file. Greedy by default; ``--sample`` draws with temperature, top-k and top-p
(seeded). The text streams to stdout; one line of timing goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="causal-LM directory (with config.json and tokenizer) or its .onnx")
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default 50; 0 = all)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: ORT's choice)")


def run(args: argparse.Namespace) -> int:
    from lowbit.errors import LowbitError
    from lowbit.models.generate import SamplingOptions, generate

    if args.threads < 0:
        raise LowbitError(f"--threads {args.threads}: must be >= 0")
    options = SamplingOptions(max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)  # fmt: skip
    for noisy in ("optimum", "transformers"):  # load-time advice would interleave with the text
        logging.getLogger(noisy).setLevel(logging.ERROR)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    show(args.prompt)
    result = generate(args.model, args.prompt, options, threads=args.threads, on_text=show)
    show("\n")
    print(result.summary(), file=sys.stderr)
    return 0
