"""``purify-fast``: the command line. Each subcommand lives in ``purify_fast.commands.<name>``
with ``add_parser(subparsers)`` and ``run(args) -> int``; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import warnings
from pathlib import Path

# Subcommand modules, in the order `purify-fast --help` lists them.
COMMANDS = ["demo", "attack", "purify", "evaluate", "train_clean", "distill", "fisher", "stream",
            "env"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="purify-fast",
        description="Purify backdoored or biased pre-trained models with fast kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"purify_fast.commands.{name}").add_parser(sub)
    return parser


# Errors that mean "the input or the environment is wrong", not "purify_fast is broken": shown as
# one line and exit status 2, like argparse's own usage errors. OSError covers missing files, full
# or read-only disks and permissions; the data, checkpoint and option checks raise ValueError
# subclasses naming the file, line or option. Anything else keeps its traceback.
USER_ERRORS = (ValueError, OSError)
TRACEBACK_VAR = "PURIFY_FAST_TRACEBACK"


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _one_line_warnings(previous):
    """A ``warnings.showwarning`` that prints purify_fast's own warnings as one ``warning: ...``
    line, like the CLI's ``note:`` and ``error:`` lines (the file, line and source line Python
    adds point into the package, which tells a command-line user nothing); warnings raised from
    elsewhere (torch, transformers) keep Python's format."""

    def show(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(_PACKAGE_DIR + os.sep):
            print(f"warning: {message}", file=file or sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from purify_fast.commands import Terminated, limit_cpu_threads, raise_terminated

    limit_cpu_threads()
    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread (main() called from a worker): leave SIGTERM alone
        previous = None
    shown = warnings.showwarning
    if os.environ.get(TRACEBACK_VAR, "") in ("", "0"):  # developers keep where it came from
        warnings.showwarning = _one_line_warnings(shown)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except USER_ERRORS as exc:
        if os.environ.get(TRACEBACK_VAR, "") not in ("", "0"):
            raise
        print(f"error: {exc}\n(set {TRACEBACK_VAR}=1 for the traceback)", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
