"""The ``lowbit`` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their command runs, so ``lowbit --help`` stays fast and the
compiler never imports torch unless a command needs it.

Process-wide duties of the command line: bad input (:class:`LowbitError`) becomes one line on
stderr and exit code 2, with control characters from model-controlled text (file and tensor
names) escaped; SIGTERM and SIGHUP unwind like SIGINT (exit 128 + signal number), so every
``finally`` and the scratch directory's removal run; Python's temporary files go into this run's
scratch directory (:mod:`lowbit.files.scratch`). A signal that stops the program's own run (not an
in-process call with its arguments given) while a worker thread is inside a native call it cannot
stop (:mod:`lowbit.core.workers`) exits once the exit handlers have run, without waiting for it.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import signal
import sys
import tempfile
import threading

from lowbit.errors import LowbitError, printable

__all__ = ["main", "build_parser"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("lowbit.models.cli_export", "export a model to ONNX (torch dynamo or optimum)"),
    "compile": ("lowbit.compiler.cli_compile", "compile an ONNX model with a recipe"),
    "eval": ("lowbit.models.cli_eval", "perplexity / cosine, size and latency of an ONNX model"),
    "recipes": ("lowbit.compiler.cli_recipes", "list the named recipes and their keys"),
    "report": ("lowbit.compiler.cli_report", "render the compile report of an output"),
    "generate": ("lowbit.models.cli_generate", "stream a continuation from a compiled causal LM, with tokens/s"),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line too: ``lowbit COMMAND: error: ...``, exit 2 (``--help`` shows usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {printable(message)}\n")


def build_parser(only: str | None = None, *, commands: dict[str, tuple[str, str]] = COMMANDS,
                 prog: str = "lowbit", description: str | None = None) -> argparse.ArgumentParser:  # fmt: skip
    parser = _Parser(prog=prog, description=description or __doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in commands.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            module = importlib.import_module(module_name)
            module.add_arguments(cmd)
            cmd.set_defaults(run=module.run, parser=cmd)
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like SIGINT's KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def _exit_past_busy_workers(code: int) -> None:
    """Exit with ``code`` now if a worker thread is still running (a LAPACK factor of an 8B
    model's down_proj is a minute): the interpreter would join it before its exit handlers. They
    run here first, as on a normal exit (the scratch directory's removal, a swap's cleanup)."""
    main_thread = threading.main_thread()
    if not any(t.is_alive() and not t.daemon and t is not main_thread for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()  # noqa: SLF001 -- CPython's private runner of the registered handlers, which os._exit skips
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _PrintableFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def main(argv: list[str] | None = None, *, commands: dict[str, tuple[str, str]] = COMMANDS,
         prog: str = "lowbit", description: str | None = None) -> int:  # fmt: skip
    """Run one command of ``commands`` (name -> (module, help)) with the process-wide duties of
    the module doc; the ``lowbit-bench`` command (bench/cli.py) runs its own commands through it."""
    owns_process = argv is None  # the program's own run, not an in-process call
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen command's module (cheap --help, no torch for `compile`).
    chosen = next((a for a in argv if a in commands), None)
    parser = build_parser(only=chosen, commands=commands, prog=prog, description=description)
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's parser, not the top one
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, handlers=[handler])
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupted)
    from lowbit.files.scratch import run_dir

    # every library's temporary files (ONNX Runtime's native ones too) die with this run
    os.environ["TMPDIR"] = tempfile.tempdir = str(run_dir())
    try:
        return int(args.run(args) or 0)
    except LowbitError as e:
        print(f"{prog} {args.command}: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"{prog} {args.command}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        if owns_process:
            _exit_past_busy_workers(128 + signum)
        return 128 + signum
    except BrokenPipeError:  # `lowbit recipes | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
