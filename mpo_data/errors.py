"""The one error type for bad user input: the CLI prints its message and exits 1, never a traceback."""

import errno
import os
from typing import Literal, get_args

# What a command does with a bad input line: stop naming FILE:LINE, or quarantine it with its reason and go on.
OnError = Literal["fail", "skip"]
ON_ERROR: tuple[str, ...] = get_args(OnError)


class InputError(Exception):
    """Bad data or configuration; the message names the file (and line) at fault."""


class ClusterError(InputError):
    """The cluster lost part of a run (a node, an engine actor); what was written is kept and a rerun resumes.

    Not bad input, but printed the same way: a clear message, no traceback."""


# OSErrors that mean "this output cannot be written here": one line for the user, never a traceback.
OUTPUT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EISDIR,
}


def output_error(e: OSError, what: str = "cannot write") -> InputError:
    """The one-line InputError for an output path that cannot be made or written (under a file, read-only, full)."""
    path = e.filename or "output"
    reason = e.strerror or str(e)
    if e.errno == errno.ENOTDIR:  # name the file that stands where a folder should be
        parent = os.path.dirname(os.path.abspath(path))
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if os.path.isfile(parent):
            reason += f": {parent} is a file"
    elif e.errno == errno.EEXIST and os.path.isfile(path):
        reason = "a file stands where a folder is wanted"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += ": free space (or quota) and rerun the same command; finished parts are kept"
    return InputError(f"{path}: {what}: {reason}")
