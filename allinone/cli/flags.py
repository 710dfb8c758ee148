"""Command-line flags for every setting, generated from `Settings`: the command line, the
environment (ALLINONE_*) and the server share one definition."""

from __future__ import annotations

import argparse
import typing

from pydantic import ValidationError

from ..settings import Settings
from .common import CliError


def _flag_type(annotation):
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    base = args[0]
    if base in (int, float):
        return base, None
    return str, None


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (also read from ALLINONE_<NAME> environment variables)")
    for name, info in Settings.model_fields.items():
        kind, choices = _flag_type(info.annotation)
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"setting_{name}",
            type=kind,
            choices=choices,
            default=None,
            metavar=None if choices else name.upper(),
            help=info.description,
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k[len("setting_") :]: v for k, v in vars(args).items() if k.startswith("setting_") and v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as err:
        raise CliError(
            "invalid setting: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        ) from None
