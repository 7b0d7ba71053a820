"""``lowbit report OUT [--screenshot PNG]``: print the compile report stored next to a compiled
model, regenerating its ``report.md`` and ``report.html`` from ``report.json`` (so a page written by
an older lowbit picks up the current layout); ``--screenshot`` renders the page in headless Chromium."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit.errors import LowbitError

__all__ = ["add_arguments", "run", "report_json_path"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="a compiled .onnx file or output directory")
    parser.add_argument("--screenshot", metavar="PNG",
                        help="also render report.html in headless Chromium and save it as this PNG")  # fmt: skip


def report_json_path(output: Path) -> Path:
    """Where a compiled output keeps its report.json."""
    return output / "report.json" if output.is_dir() else output.with_name(f"{output.stem}.report.json")


def run(args: argparse.Namespace) -> int:
    from lowbit.compiler import report

    path = report_json_path(Path(args.output))
    if not path.is_file():
        raise LowbitError(f"{args.output}: no compile report found ({path.name} missing)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LowbitError(f"{path}: not a compile report ({e.msg})") from e
    if args.screenshot:
        from lowbit.compiler.fsutil import check_writable_parent

        check_writable_parent(Path(args.screenshot))
    _, _, html_path = report.write(data, path.parent, path.name.removesuffix(".json"))
    print(report.render_markdown(data), end="")
    print(f"report page: {html_path}")
    if args.screenshot:
        from lowbit.compiler.screenshot import screenshot

        print(f"report screenshot: {screenshot(html_path, Path(args.screenshot))}")
    return 0
