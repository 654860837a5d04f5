"""Helpers for testing click commands."""

from __future__ import annotations

from click.testing import Result


def error_message(result: Result) -> str:
    """The message a user sees: click's usage error, or the exception that ended the command."""
    assert result.exit_code != 0
    if isinstance(result.exception, SystemExit):
        return result.output
    return f"{type(result.exception).__name__}: {result.exception}"
