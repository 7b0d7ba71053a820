"""The ``lowbit`` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their command runs, so ``lowbit --help`` stays fast and the
compiler never imports torch unless a command needs it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lowbit.errors import LowbitError

__all__ = ["main", "build_parser"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("lowbit.models.cli_export", "export a model to ONNX (torch dynamo or optimum)"),
    "compile": ("lowbit.compiler.cli_compile", "compile an ONNX model with a recipe"),
    "eval": ("lowbit.models.cli_eval", "perplexity / cosine, size and latency of an ONNX model"),
    "bench": ("lowbit.bench.cli_bench", "measure lowbit and its peers side by side"),
    "recipes": ("lowbit.compiler.cli_recipes", "list the named recipes and their keys"),
    "report": ("lowbit.compiler.cli_report", "render the compile report of an output"),
    "demo": ("lowbit.bench.demo", "export -> compile -> evaluate SmolLM2-135M, print a table"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            module = importlib.import_module(module_name)
            module.add_arguments(cmd)
            cmd.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen command's module (cheap --help, no torch for `compile`).
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=chosen)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args) or 0)
    except LowbitError as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lowbit recipes | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
