"""What every command shares: its error type and exit codes, loading the assistant, progress, warnings."""

from __future__ import annotations

import sys

from ..settings import Settings

EXIT_USAGE = 2  # bad input (empty text, unreadable file): the caller's to fix
EXIT_FAILURE = 1  # the model or the machine failed


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def load_assistant(settings: Settings, **options):
    from ..engine.base import EngineError
    from ..model.store import ModelError
    from ..roles.adapter import AdapterError
    from ..roles.definition import RoleError
    from ..roles.head import HeadError
    from ..service import Assistant

    try:
        return Assistant.load(settings, **options)
    except RoleError as err:  # a role file of the user's: theirs to fix
        raise CliError(str(err)) from None
    except (ModelError, EngineError, HeadError, AdapterError) as err:
        raise CliError(str(err), EXIT_FAILURE) from None


def progress_bar(**kwargs):
    """A tqdm bar on stderr whose `write` (a line above the bar) goes to stderr too: tqdm's own
    write is a classmethod that prints to stdout, which would break a command's --json output."""
    from tqdm import tqdm

    class StderrBar(tqdm):
        @classmethod
        def write(cls, s, file=None, end="\n", nolock=False):
            super().write(s, file=file or sys.stderr, end=end, nolock=nolock)

    return StderrBar(file=sys.stderr, dynamic_ncols=True, **{"unit": "text", **kwargs})


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def texts_from(args) -> list[str]:
    if args.texts:
        return list(args.texts)
    data = sys.stdin.buffer.read()
    try:
        return [line for line in data.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CliError(f"stdin line {line}: not valid UTF-8") from None
