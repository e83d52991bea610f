"""Errors in what a user gave: a setting, a file, a checkpoint, a data set (see `stellar.cli`).

The commands end these (and the file errors) with one line; any other exception is a bug
of the package or of a library it calls, and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave cannot be used; the message says what and where."""


# The second base keeps `except ValueError` / `except RuntimeError` callers of the Python API
# working as before these types existed.
class ConfigError(UserError, ValueError):
    """A setting that is not allowed (a configuration key, a command-line option or an
    environment variable); the message names it (exit code 2)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file that cannot be read or is not a STELLAR run's."""


class DataError(UserError, RuntimeError):
    """A data set that cannot be used (no readable image, classes that do not match)."""


def reason(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception from a library, short enough for a one-line error."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
