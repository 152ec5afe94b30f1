"""The one error type for bad user input: the CLI prints its message and exits 1, never a traceback."""


class InputError(Exception):
    """Bad data or configuration; the message names the file (and line) at fault."""
