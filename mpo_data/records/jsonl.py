"""Streaming JSONL with orjson, and atomic writes: a crash never leaves a half line or a half file."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson

from mpo_data.errors import OUTPUT_ERRNOS, InputError, output_error


@dataclass
class Line:
    """One line of a JSONL file: its location (FILE:LINE), the parsed value, or why it did not parse."""

    loc: str
    value: Any = None
    error: str | None = None


MAX_LINE_BYTES = 64 << 20  # one JSONL record; a longer "line" is a file without line ends, or not JSONL at all
BOM = b"\xef\xbb\xbf"
KEY_END = re.compile(rb'"\s*:')  # every key of a JSON object ends so (strings may too: then a slow check decides)


def _raw_lines(handle) -> Iterator[tuple[bytes, bool]]:
    """(line, whole) pairs; a line over MAX_LINE_BYTES comes back as (b"", False), read past in chunks,
    so one huge line never sits in memory."""
    while True:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
            yield raw, True
            continue
        while raw and not raw.endswith(b"\n"):
            raw = handle.readline(1 << 20)
        yield b"", False


MAX_DEPTH = (
    254  # orjson reads 1,024 levels of nesting but writes only this many: a deeper line could not be written back
)


def _shape(value: Any) -> tuple[int, int]:
    """(keys in every object, nesting depth) of a parsed line; iterative, as orjson nests past Python's recursion."""
    keys, depth, stack = 0, 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            keys += len(node)
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, level + 1) for v in node)
        else:
            continue
        depth = max(depth, level)
    return keys, depth


def duplicate_key(raw: bytes, value: Any, keys: int) -> str | None:
    """A key given twice in one JSON object of the line (orjson, like json, keeps the last silently), or None.

    Fast: only a line with more key ends than its `keys` parsed is parsed again, by json, to find the key."""
    if len(KEY_END.findall(raw)) <= keys:
        return None
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        found.extend(k for i, k in enumerate(keys) if k in keys[:i])
        return dict(items)

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError):  # nested deeper than json goes: orjson's reading stands
        return None
    return found[0] if found else None


def _parse(raw: bytes, number: int) -> tuple[Any, str | None]:
    if number == 1 and raw.startswith(BOM):  # a BOM (Windows editors write one) is not part of the record
        raw = raw[len(BOM) :]
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        reason = f"invalid JSON: {e.args[0] if e.args else e}"
        if re.search(rb"\bNaN\b|-?\bInfinity\b", raw):
            reason += " (NaN and Infinity are not JSON: write null or a number)"
        elif number == 1 and raw.strip() in (b"[", b"{"):
            reason += " (a JSON document over many lines? JSONL is one object per line: jq -c '.[]' FILE)"
        return None, reason
    keys, depth = _shape(value)
    if depth > MAX_DEPTH:
        return None, f"nested {depth} levels deep, over the {MAX_DEPTH} that can be written back"
    key = duplicate_key(raw, value, keys)
    if key is not None:
        return None, f"duplicate key '{key}' in one object (JSON would keep only the last)"
    return value, None


def iter_lines(path: str | Path) -> Iterator[Line]:
    """Every non-blank line of a JSONL file, parsed; bad JSON comes back as an error, not an exception.

    A leading BOM and CRLF line ends are read as plain JSONL; invalid UTF-8, NUL bytes, NaN, a key given
    twice and a line over MAX_LINE_BYTES are errors of their line."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as e:
        raise InputError(f"{path}: cannot open: {e.strerror}") from None
    with handle:
        for number, (raw, whole) in enumerate(_raw_lines(handle), 1):
            loc = f"{path}:{number}"
            if not whole:
                yield Line(
                    loc, error=f"line over {MAX_LINE_BYTES:,} bytes (no line ends? JSONL is one record per line)"
                )
                continue
            if not raw.strip():
                continue
            value, error = _parse(raw, number)
            yield Line(loc, value, error)


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(FILE:LINE, value) for each line; the first bad line raises InputError naming it."""
    for line in iter_lines(path):
        if line.error:
            raise InputError(f"{line.loc}: {line.error}")
        yield line.loc, line.value


def dumps(row: Any) -> bytes:
    """One JSONL line (numpy scalars and dataclasses allowed)."""
    return orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: temp file in the same folder, fsync, rename."""
    with AtomicFile(path) as handle:
        handle.write(data)


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    """Write rows to a JSONL file atomically; returns how many were written."""
    count = 0
    with AtomicFile(Path(path)) as handle:
        for row in rows:
            handle.write(dumps(row))
            count += 1
    return count


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only swap it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: swap and restore (a brief race with threads that create files)
    os.umask(mask)
    return mask


class AtomicFile:
    """A binary file that appears under its name only once closed without error.

    Streams of any size go through it (the data is never held in memory); on an exception, or a
    SIGKILL, the temp file is all that is left and readers never see it (it ends in ``.tmp``).
    The file gets the mode ``open()`` would give it (0666 less the umask), not mkstemp's private 0600,
    so a data set on a shared filesystem is readable by whoever the umask lets read it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        make_dir(self.path.parent)

    def __enter__(self):
        try:
            fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        except OSError as e:
            raise output_error(e) from None
        os.fchmod(fd, 0o666 & ~current_umask())
        self._handle = os.fdopen(fd, "wb", buffering=1 << 20)
        return self._handle

    def __exit__(self, exc_type, exc, tb) -> None:
        """Rename the whole file into place; on any error drop the temp file, and a disk that filled or
        went read-only mid-write (here or in the caller's writes) becomes one InputError naming the file."""
        try:
            if exc_type is None:
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()
                os.replace(self._tmp, self.path)
        except OSError as e:
            raise output_error(_named(e, self.path)) from None
        finally:
            if not self._handle.closed:
                try:
                    self._handle.close()  # after a failed write, flushing fails again: the temp file goes anyway
                except OSError:
                    pass
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
        if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:
            raise output_error(_named(exc, self.path)) from None


def _named(e: OSError, path: Path) -> OSError:
    """`e` naming `path` (a write on an open handle names no file)."""
    return e if e.filename else OSError(e.errno, e.strerror, str(path))


def make_dir(folder: str | Path) -> Path:
    """`folder` and its parents, made if missing; a path that cannot be made is one InputError line."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(e) from None
    return folder


def writable_problem(folder: str | Path) -> str | None:
    """Why files cannot be written under `folder` (made if missing), or None: checked before a long run starts."""
    try:
        make_dir(folder)
        with AtomicFile(Path(folder) / ".mpo-data-write-check"):
            pass
        os.unlink(Path(folder) / ".mpo-data-write-check")
    except InputError as e:
        return str(e)
    except OSError as e:
        return str(output_error(e))
    return None
