"""Reading prompt sets (JSONL, Parquet, a saved HF dataset) with validation, quarantine and counts.

Every stage reads its prompts through `PromptReader`, and `mpo-data validate` runs the same checks, so a
file that validates clean is exactly a file the stages accept.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

from mpo_data.errors import ON_ERROR, InputError
from mpo_data.records import images
from mpo_data.records.formats import (
    PromptItem,
    image_list,
    internvl_reading,
    meta_problems,
    pair_problems,
    prompt_problems,
)
from mpo_data.records.jsonl import AtomicFile, Line, atomic_write_bytes, dumps, iter_lines


@dataclass
class Problem:
    """Why one line is bad: `category` for counts, `message` for people."""

    loc: str
    category: str
    message: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.message}"


def iter_records(path: str | Path) -> Iterator[Line]:
    """Rows of a prompt or pair source, whatever its format, as `Line`s with FILE:LINE locations."""
    path = Path(path)
    if path.is_dir():
        yield from _iter_hf_dataset(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.exists():
        yield from iter_lines(path)
    else:
        raise InputError(f"{path}: no such file")


def _iter_parquet(path: Path) -> Iterator[Line]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise InputError(f"{path}: not a readable Parquet file: {e}") from None
    row = 0
    for batch in table.iter_batches(batch_size=4096):
        for value in batch.to_pylist():
            row += 1
            yield Line(f"{path}:{row}", value)


def _iter_hf_dataset(path: Path) -> Iterator[Line]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, ... for a bad folder
        raise InputError(f"{path}: not a dataset saved with save_to_disk: {e}") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise InputError(f"{path}: a DatasetDict needs a 'train' split, found {list(data)}")
        data = data["train"]
    undecoded = _undecoded(data.features)
    if undecoded != data.features:
        data = data.cast(undecoded)  # Image cells as {bytes, path}, the same as in Parquet
    for row, value in enumerate(data, 1):
        yield Line(f"{path}:{row}", value)


def _undecoded(features):
    """`features` with every Image feature (also inside lists) left undecoded."""
    import datasets

    def undecode(feature):
        if isinstance(feature, datasets.Image):
            return datasets.Image(decode=False)
        if isinstance(feature, datasets.List):
            return datasets.List(undecode(feature.feature))
        return feature

    return datasets.Features({name: undecode(f) for name, f in features.items()})


def default_images_dir(source: Path) -> Path:
    """Where a prompt source's embedded images go when the caller names no folder (content-addressed, reusable)."""
    key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "mpo-data-images" / key


def is_embedded(image: Any) -> bool:
    """Whether a prompt line's image cell holds `datasets` Image structs ({bytes, path}) rather than paths."""
    cells = image if isinstance(image, list) else [image]
    return bool(cells) and all(isinstance(c, dict) and set(c) <= {"bytes", "path"} for c in cells)


def extract_images(image: Any, folder: Path) -> str | list[str]:
    """Embedded image cells written once to `folder` under their content hash; their file names, as a
    prompt line names images. A cell without bytes keeps its path (an image `datasets` did not embed)."""
    names = []
    for cell in image if isinstance(image, list) else [image]:
        if not cell.get("bytes"):
            names.append(cell.get("path"))
            continue
        suffix = Path(cell.get("path") or "").suffix or ".img"
        name = hashlib.sha1(cell["bytes"]).hexdigest()[:20] + suffix
        if not (folder / name).exists():
            atomic_write_bytes(folder / name, cell["bytes"])
        names.append(name)
    return names if isinstance(image, list) else names[0]


def image_error(root: str | Path, rel: str, verify: bool = True) -> images.ImageError | None:
    """Why the image `rel` under `root` cannot be used, or None."""
    try:
        images.check(root, rel, verify=verify)
    except images.ImageError as e:
        return e
    return None


def record_problems(
    line: Line,
    kind: str,
    image_root: str | Path | None,
    verify_images: bool = True,
    check_image: Callable[..., images.ImageError | None] = image_error,
) -> list[Problem]:
    """Every problem of one row: JSON, schema, then each image (only if the schema is sound).

    verify_images=False checks image headers only (path, format, size), not the compressed data.
    `check_image` may remember files it has seen (PromptReader's does).
    """
    if line.error:
        return [Problem(line.loc, "invalid JSON", line.error)]
    schema = pair_problems(line.value) if kind == "pairs" else prompt_problems(line.value, kind)
    if schema:
        return [Problem(line.loc, "schema", m) for m in schema]
    problems = []
    if image_root is not None:
        for rel in image_list(line.value.get("image")):
            error = check_image(image_root, rel, verify_images)
            if error is not None:
                problems.append(Problem(line.loc, error.category, str(error)))
    return problems


class Quarantine:
    """Where skipped lines go, each with its reasons, and the counts for the run summary.

    Lines added after `close` (a stage's engine refused an item the reader had passed) are added to the
    file this run wrote; a new run starts a new file.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.counts: Counter[str] = Counter()
        self._writer: AtomicFile | None = None
        self._file: Any = None
        self._closed_once = False

    def add(self, problems: list[Problem], value: Any) -> None:
        for problem in problems:
            self.counts[problem.category] += 1
        if self.path is None:
            return
        if self._file is None:
            self._writer = AtomicFile(self.path)
            self._file = self._writer.__enter__()
            if self._closed_once and self.path.exists():
                self._file.write(self.path.read_bytes())
        record = {"loc": problems[0].loc, "reasons": [p.message for p in problems], "line": value}
        self._file.write(dumps(record))

    def close(self) -> None:
        if self._file is not None:
            self._writer.__exit__(None, None, None)
            self._file = None
        self._closed_once = True

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class PromptReader:
    """Valid `PromptItem`s of one prompt source; bad lines fail the run or go to quarantine.

    With on_error="fail" the first bad line raises InputError naming FILE:LINE and why. With "skip" it
    is written with its reasons to the quarantine file and counted; nothing is dropped silently.
    verify_images=False checks only image headers here, for readers whose images are decoded elsewhere
    (the stages' engine workers), so that a million prompts do not wait for a serial decode on the driver.
    """

    def __init__(
        self,
        path: str | Path,
        kind: str,
        dataset: str,
        image_root: str | Path | None = None,
        on_error: str = "fail",
        quarantine: str | Path | None = None,
        images_dir: str | Path | None = None,
        verify_images: bool = True,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.path, self.kind, self.dataset = Path(path), kind, dataset
        self.image_root = image_root if image_root is not None else self.path.parent
        self.images_dir = Path(images_dir) if images_dir else default_images_dir(self.path)
        self.extracted = False  # whether embedded images were written to images_dir (then the image root)
        self.on_error = on_error
        self.quarantine = Quarantine(Path(quarantine) if quarantine else None)
        self.read = 0
        self.verify_images = verify_images
        # a million prompts often share a few thousand images: each file is checked once per reader
        self.check_image = lru_cache(maxsize=1 << 16)(image_error)

    def checked(self) -> Iterator[tuple[Line, list[Problem]]]:
        """Every row with its problems; embedded images (a `datasets` Image column) are written out to
        `images_dir` once and read from there, so the stages see paths as with any other source."""
        for line in iter_records(self.path):
            self.read += 1
            if line.error is None and isinstance(line.value, dict) and is_embedded(line.value.get("image")):
                line = Line(line.loc, {**line.value, "image": extract_images(line.value["image"], self.images_dir)})
                self.image_root, self.extracted = self.images_dir, True
            yield line, record_problems(line, self.kind, self.image_root, self.verify_images, self.check_image)

    def __iter__(self) -> Iterator[PromptItem]:
        try:
            for line, problems in self.checked():
                if not problems:
                    yield PromptItem.from_raw(line.value, self.dataset, line.loc)
                elif self.on_error == "fail":
                    raise InputError("\n".join(map(str, problems)) + "\n(use --on-error skip to quarantine bad lines)")
                else:
                    self.quarantine.add(problems, line.value if line.error is None else None)
        finally:
            self.quarantine.close()


def validate_file(
    path: str | Path,
    kind: str,
    image_root: str | Path | None = None,
    verify_images: bool = True,
    images_dir: str | Path | None = None,
) -> tuple[int, list[str]]:
    """(rows checked, problem lines `FILE:LINE: reason`) for `mpo-data validate` and a pipeline's check before
    it starts; verify_images and images_dir as for PromptReader (a stage's reader: False, OUT/images/<dataset>)."""
    path = Path(path)
    if kind == "meta":
        try:
            meta = orjson.loads(path.read_bytes())
        except OSError as e:
            raise InputError(f"{path}: cannot open: {e.strerror}") from None
        except orjson.JSONDecodeError as e:
            return 0, [f"{path}:1: invalid JSON: {e}"]
        problems = [f"{path}: {p}" for p in meta_problems(meta)]
        if not problems:
            for name, entry in meta.items():
                if not Path(entry["annotation"]).is_file():
                    problems.append(f"{path}: entry '{name}': annotation '{entry['annotation']}' not found")
                note = internvl_reading(name, entry["repeat_time"])
                if note:  # valid, but not what the writer probably meant
                    print(f"warning: {path}: {note}", file=sys.stderr)
        return len(meta) if isinstance(meta, dict) else 0, problems
    if kind != "pairs":  # prompt sets: read as the stages read them (embedded images included)
        reader = PromptReader(path, kind, path.stem, image_root, images_dir=images_dir, verify_images=verify_images)
        problems = [str(p) for _, found in reader.checked() for p in found]
        return reader.read, problems
    root = image_root if image_root is not None else path.parent
    rows, problems = 0, []
    for line in iter_records(path):
        rows += 1
        problems += [str(p) for p in record_problems(line, kind, root)]
    return rows, problems
