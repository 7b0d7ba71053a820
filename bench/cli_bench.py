"""``lowbit-bench run``: measure every contender side by side and write ``bench/RESULTS.md``.

All contenders of a model section are built from the same FP32 export with the same calibration
windows and evaluated on the same evaluation windows within one run (see
:mod:`lowbit.bench.runner`). The report file is written atomically.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

__all__ = ["add_arguments", "check_report_path", "run", "DEFAULT_OUTPUT"]

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), metavar="FILE",
                        help=f"report to write (default {DEFAULT_OUTPUT})")
    parser.add_argument("--sections", metavar="LIST",
                        help="comma-separated sections (default: all; smollm2, minilm, formats, ...)")
    parser.add_argument("--contenders", metavar="LIST", help="comma-separated contender names (default: all)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    parser.add_argument("--calib-windows", type=int, default=32, help="calibration windows shared by all contenders (default 32; lowbit recipes use their calibration.windows of them)")
    parser.add_argument("--calib-text", metavar="FILE", help="calibrate on this UTF-8 text instead of the pydoc split")
    parser.add_argument("--eval-text", metavar="FILE", help="evaluate on this UTF-8 text instead of the pydoc split")


def check_report_path(out: Path) -> None:
    """A report file lowbit-bench may write (atomically): a writable parent, and nothing but a
    regular file (or a link, which is replaced, not followed) at the path."""
    from lowbit.errors import LowbitError
    from lowbit.files.fsutil import check_writable_parent

    check_writable_parent(out)
    if os.path.lexists(out) and not out.is_symlink() and not out.is_file():
        raise LowbitError(f"-o {out} exists and is not a regular file (a directory, device or pipe): "
                          "the report is a file, name a new one")  # fmt: skip


def add_speed_report_arguments(parser, default_output: Path, rounds_help: str) -> None:
    """``--windows``, ``--rounds``, ``--threads`` and ``-o`` of the benches that measure accuracy on
    both texts and speed at several thread counts (rotation, deploy)."""
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens per text (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help=f"{rounds_help} (default 3)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op threads for speed (default 1 2)")
    parser.add_argument("-o", "--output", default=str(default_output), metavar="FILE", help=f"report (default {default_output})")


def check_speed_report_arguments(args) -> Path:
    """The report path (checked) after refusing counts below 1, before any work."""
    from lowbit.errors import LowbitError

    out = Path(args.output)
    check_report_path(out)
    if args.windows < 1 or args.rounds < 1 or any(t < 1 for t in args.threads):
        raise LowbitError("--windows, --rounds and --threads must be >= 1")
    return out


def _split(value: str | None) -> list[str] | None:
    """None when the option is absent (= all); ``--sections ,`` gives [] (an error, not "all")."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    from lowbit.bench.contenders import CONTENDERS
    from lowbit.bench.runner import SECTIONS, BenchConfig, run_bench
    from lowbit.files.fsutil import atomic_path
    from lowbit.errors import LowbitError
    from lowbit.models.data import check_text_file

    # Validate everything now, not after twenty minutes of measuring.
    out = Path(args.output)
    check_report_path(out)
    contenders, sections = _split(args.contenders), _split(args.sections)
    for kind, names, known in (("contender", contenders, CONTENDERS), ("section", sections, SECTIONS)):
        if names == []:
            raise LowbitError(f"--{kind}s names no {kind}; known: {', '.join(known)}")
        unknown = [n for n in names or [] if n not in known]
        if unknown:
            raise LowbitError(f"unknown bench {kind}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    cfg = BenchConfig(seq_len=args.seq_len, eval_windows=args.windows, calib_windows=args.calib_windows,
                      contenders=tuple(contenders) if contenders else None,
                      calib_text=args.calib_text, eval_text=args.eval_text)
    for f in (args.calib_text, args.eval_text):
        if f is not None:
            check_text_file(f)  # missing/empty text is an error now, not after the export
    argv = sys.argv[1:] if "run" in sys.argv[1:] else ["run"]  # also right under pytest
    command = "lowbit-bench " + " ".join(shlex.quote(a) for a in argv)
    report = run_bench(cfg, command, sections)
    with atomic_path(out) as tmp:
        tmp.write_text(report)
    print(report)
    return 0
