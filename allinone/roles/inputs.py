"""What every role checks first about a caller's text."""

from __future__ import annotations


class InputError(ValueError):
    """The caller's input is unusable; the message says why (exit code 2 / HTTP 4xx)."""


def validate_text(text, max_chars: int) -> str:
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError("text is empty")
    if len(text) > max_chars:
        raise InputError(f"text is {len(text)} characters long; the limit is {max_chars}")
    return text
