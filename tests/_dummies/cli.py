"""Helpers for testing click commands."""

from __future__ import annotations

import click
from click.testing import CliRunner, Result


def error_message(result: Result) -> str:
    """The message a user sees: click's usage error, or the exception that ended the command."""
    assert result.exit_code != 0
    if isinstance(result.exception, SystemExit):
        return result.output
    return f"{type(result.exception).__name__}: {result.exception}"


def assert_help_documents_every_option(command: click.Command) -> None:
    """``--help`` succeeds, names every option and flag, and every option has help text."""
    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0
    for option in (p for p in command.params if isinstance(p, click.Option)):
        for name in (*option.opts, *option.secondary_opts):
            assert name in result.output, name
        assert option.help, option.name
