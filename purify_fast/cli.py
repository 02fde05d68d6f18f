"""``purify-fast``: the command line. Each subcommand lives in ``purify_fast.commands.<name>``
with ``add_parser(subparsers)`` and ``run(args) -> int``; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from purify_fast.commands import limit_cpu_threads

    limit_cpu_threads()
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
