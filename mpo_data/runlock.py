"""One run per output folder: a second run on a folder in use is refused at once, naming the holder.

The lock is `flock` on `<folder>/.mpo-data.lock`. The kernel drops it when the holding process dies, however
it dies (SIGKILL, OOM, a node reboot), so a killed run leaves no stale lock: the file stays, the lock does
not, and a rerun takes it. The file holds the holder's host, pid, command and start time for the message.

Filesystems: on local disks and NFSv4 (Linux emulates flock with byte-range locks over the NFS lock
protocol) the lock holds across hosts. On NFSv3 without lockd, or Lustre/BeeGFS mounted without their
`flock` option, the call fails: the run then warns that the folder is unguarded and goes on (refusing
would make such clusters unusable). A holder on a node that vanished keeps an NFS lock until the server's
lease expires (90 s by default), so a rerun right after a node crash may be refused that long.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mpo_data.errors import InputError, output_error
from mpo_data.records.jsonl import make_dir

LOCK_NAME = ".mpo-data.lock"
_held: dict[str, int] = {}  # folders this process holds -> nesting depth (a pipeline's stages nest)


def _holder(handle) -> str:
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except ValueError:
        info = {}
    if not info:
        return "a run whose details are not written yet"
    return f"host {info.get('host')}, pid {info.get('pid')}, since {info.get('started')}: {info.get('command')}"


@contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold `folder` for this run; InputError naming the folder and the holder if another run has it."""
    key = os.path.realpath(folder)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    make_dir(key)
    try:
        handle = open(os.path.join(key, LOCK_NAME), "a+")
    except OSError as e:
        raise output_error(e) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                print(
                    f"warning: {folder}: cannot lock ({e.strerror}); nothing stops a second run here", file=sys.stderr
                )
            else:
                raise InputError(
                    f"{folder}: in use by another run ({_holder(handle)}). One run per folder: wait for it to "
                    "finish or use another output folder."
                ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        handle.write(
            json.dumps(
                {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "command": " ".join(sys.argv)}
            )
        )
        handle.flush()
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        handle.close()  # releases the flock


def holds(field: str):
    """Decorator: the call holds the folder named by its first argument's `field` (e.g. a config's out_dir)."""

    def wrap(run):
        @functools.wraps(run)
        def locked(config, *args, **kwargs):
            with run_lock(getattr(config, field)):
                return run(config, *args, **kwargs)

        return locked

    return wrap
