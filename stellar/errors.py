"""Errors in what a user gave: a setting, a file, a checkpoint (see `stellar.cli`)."""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave cannot be used; the message says what and where."""


class ConfigError(UserError, ValueError):
    """A configuration value that is not allowed; the message names the key (exit code 2)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file that cannot be read or is not a STELLAR run's."""


def reason(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception from a library, short enough for a one-line error."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
