"""The one error type for bad user input: the CLI prints its message and exits 1, never a traceback."""

from typing import Literal, get_args

# What a command does with a bad input line: stop naming FILE:LINE, or quarantine it with its reason and go on.
OnError = Literal["fail", "skip"]
ON_ERROR: tuple[str, ...] = get_args(OnError)


class InputError(Exception):
    """Bad data or configuration; the message names the file (and line) at fault."""
