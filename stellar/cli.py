"""What every command shares: one line for a user error, help that lists the defaults,
and the --device choice.

A user error (a bad setting, a missing or unreadable file, a corrupt or foreign
checkpoint, an unusable data set: `stellar.errors.UserError` and the file errors) ends a
command with `PROG: error: ...` on stderr and exit code 2 (a bad setting) or 1, no
traceback; STELLAR_TRACEBACK=1 shows the traceback instead. Any other exception is a bug
(of this package or of a library it calls) and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable

import torch

from .errors import ConfigError, UserError

TRACEBACK_VAR = "STELLAR_TRACEBACK"
FILE_ERRORS = (
    FileNotFoundError,
    FileExistsError,  # an --output-dir that is a file
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"


def run_command(prog: str, body: Callable[[], int]) -> int:
    """body()'s exit code, or the one line and exit code of a user error."""
    try:
        return body()
    except (UserError, *FILE_ERRORS) as err:
        if os.environ.get(TRACEBACK_VAR):
            raise
        message = str(err.args[0]) if err.args else type(err).__name__
        if isinstance(err, OSError) and err.filename is not None:
            message = f"{err.filename}: {err.strerror or message}"
        print(f"{prog}: error: {_from_worker(message, err)}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


def _from_worker(message: str, err: BaseException) -> str:
    """The error's own message where a DataLoader worker raised it: the loader raises it
    again with the worker's traceback as its message, whose last line is the original."""
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return re.sub(rf"^([\w.]+\.)?{type(err).__name__}: ", "", last)


def check_kernels_environment() -> None:
    """ConfigError for a STELLAR_KERNELS_BACKEND that names no backend: every operator
    would raise ValueError on its first call, which is the user's setting, not a bug."""
    from stellar_kernels._backend import environment_backend

    try:
        environment_backend()
    except ValueError as err:
        raise ConfigError(str(err)) from err


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's lines and appends each option's default (when it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def is_device_name(name: str) -> bool:
    return name in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", name) is not None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` is cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if not is_device_name(name):
        raise ConfigError(f"device {name!r} is not one of: {DEVICE_HELP}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available here (use auto or cpu)")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) here")
    return device
