"""``lowbit report OUT``: print the compile report stored next to a compiled model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit.errors import LowbitError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="a compiled .onnx file or output directory")


def run(args: argparse.Namespace) -> int:
    from lowbit.compiler.report import render_markdown

    out = Path(args.output)
    path = out / "report.json" if out.is_dir() else out.with_name(f"{out.stem}.report.json")
    if not path.is_file():
        raise LowbitError(f"{args.output}: no compile report found ({path.name} missing)")
    print(render_markdown(json.loads(path.read_text())), end="")
    return 0
