"""The `allinone` command line: a thin dispatcher. Each command lives in the module of its group
(models, use, evaluate, bench); every command also takes a flag for each setting (flags.py)."""

from __future__ import annotations

import argparse
import sys

from ..machine import settle_malloc
from . import bench, evaluate, memory, models, scale, use
from .common import CliError
from .flags import add_settings_flags, settings_from_args

GROUPS = (models, use, evaluate, bench, memory, scale)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="allinone",
        description="One small Qwen model on a plain CPU: a strict "
        "sentiment analyst and an empathetic chat assistant, by prompt alone.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        add_settings_flags(p)
        return p

    for group in GROUPS:
        group.register(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    settle_malloc()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        return args.func(args, settings)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
