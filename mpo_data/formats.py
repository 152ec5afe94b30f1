"""Typed records for every file mpo-data reads or writes, and the rules that validate them.

Records keep unknown keys in ``extra`` so that whatever a user put in a prompt line travels to the
samples and pairs unchanged (design.md: "Extra keys are kept and carried through").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import orjson

from mpo_data.errors import InputError
from mpo_data.jsonl import atomic_write_bytes, read_jsonl

Image = str | list[str] | None  # as in MMPR: one path, a list (multi-image), or absent (text-only)

PROMPT_KINDS = ("correctness", "dropout-ntp")
# Why a sample ended: its own end (or a stop string), max_new_tokens, or the context (max_model_len) filling up.
FINISH_REASONS = ("stop", "length", "context")


def image_list(image: Image) -> list[str]:
    """The image field as a list, whatever form the line used."""
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def make_item_id(dataset: str, image: Image, question: str, target: Any) -> str:
    """Stable id of a prompt item: same dataset, images, question and answer/chosen, same id."""
    key = orjson.dumps([dataset, image_list(image), question, str(target)])
    return hashlib.sha1(key).hexdigest()[:16]


def _check_image(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return None if value else "'image' is an empty string"
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return None
    return f"'image' must be a path or a non-empty list of paths, got {type(value).__name__}"


def _check_text(raw: dict, key: str, *, types: tuple = (str,)) -> str | None:
    if key not in raw or raw[key] is None:
        return f"missing key '{key}'"
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        return f"'{key}' must be {names}, got {type(value).__name__}"
    if isinstance(value, str) and not value.strip():
        return f"'{key}' is empty"
    return None


def prompt_problems(raw: Any, kind: str) -> list[str]:
    """Schema problems of one prompt line (images are checked separately, against the root)."""
    if not isinstance(raw, dict):
        return [f"expected a JSON object, got {type(raw).__name__}"]
    checks = [_check_image(raw.get("image")), _check_text(raw, "question")]
    if kind == "correctness":
        checks.append(_check_text(raw, "answer", types=(str, int, float)))
    elif kind == "dropout-ntp":
        checks.append(_check_text(raw, "chosen"))
        if raw.get("rejected") is not None:
            checks.append("'rejected' must be null or absent in a dropout-ntp prompt")
    else:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {PROMPT_KINDS}")
    return [c for c in checks if c]


@dataclass
class PromptItem:
    """One prompt line: a correctness item (``answer``) or a DropoutNTP item (``chosen``)."""

    dataset: str
    question: str
    image: Image = None
    answer: str | None = None
    chosen: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # FILE:LINE it came from, for messages

    @classmethod
    def from_raw(cls, raw: dict, dataset: str, source: str = "") -> "PromptItem":
        known = {"image", "question", "answer", "chosen", "rejected"}
        answer = raw.get("answer")
        return cls(
            dataset=dataset,
            question=raw["question"],
            image=raw.get("image"),
            answer=None if answer is None else str(answer),
            chosen=raw.get("chosen"),
            extra={k: v for k, v in raw.items() if k not in known},
            source=source,
        )

    @property
    def images(self) -> list[str]:
        return image_list(self.image)

    @property
    def item_id(self) -> str:
        return make_item_id(self.dataset, self.image, self.question, self.answer if self.chosen is None else self.chosen)

    def to_dict(self) -> dict[str, Any]:
        """The line as the user wrote it (extra keys first, so ours win on a clash)."""
        out: dict[str, Any] = dict(self.extra)
        if self.image is not None:
            out["image"] = self.image
        out["question"] = self.question
        if self.answer is not None:
            out["answer"] = self.answer
        if self.chosen is not None:
            out["chosen"] = self.chosen
        return out


@dataclass
class Sample:
    """One sampled response of the correctness stage; keyed by (item_id, sample_index)."""

    item_id: str
    sample_index: int
    item: dict[str, Any]
    response: str
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    prompt_version: str
    model: str
    sampling: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.item)
        out.update(
            item_id=self.item_id,
            sample_index=self.sample_index,
            response=self.response,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            prompt_version=self.prompt_version,
            model=self.model,
            sampling=self.sampling,
        )
        return out


@dataclass
class Pair:
    """An MMPR preference pair line; InternVL's trainer reads it unchanged."""

    question: str
    chosen: str
    rejected: str
    image: Image = None
    answer_gt: str | None = None
    chosen_meta: dict[str, Any] | None = None
    rejected_meta: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None  # model, stage, parameters

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.image is not None:
            out["image"] = self.image
        out.update(question=self.question, chosen=self.chosen, rejected=self.rejected)
        for key in ("answer_gt", "chosen_meta", "rejected_meta", "provenance"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Pair":
        return cls(
            question=raw["question"],
            chosen=raw["chosen"],
            rejected=raw["rejected"],
            image=raw.get("image"),
            answer_gt=raw.get("answer_gt"),
            chosen_meta=raw.get("chosen_meta"),
            rejected_meta=raw.get("rejected_meta"),
            provenance=raw.get("provenance"),
        )


def pair_problems(raw: Any) -> list[str]:
    """Schema problems of one MMPR pair line."""
    if not isinstance(raw, dict):
        return [f"expected a JSON object, got {type(raw).__name__}"]
    checks = [_check_image(raw.get("image"))] + [_check_text(raw, k) for k in ("question", "chosen", "rejected")]
    return [c for c in checks if c]


@dataclass
class MetaEntry:
    """One dataset of a meta.json mixture (InternVL's format).

    ``repeat_time`` scales how many rows of the annotation file training uses, as InternVL's loader reads
    it: below 1 a random ``int(length * r)`` rows, above 1 ``int(r)`` whole copies (1.5 -> one copy).
    """

    root: str
    annotation: str
    repeat_time: float = 1.0
    length: int = 0
    data_augment: bool = False
    max_dynamic_patch: int = 12

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "annotation": self.annotation,
            "data_augment": self.data_augment,
            "max_dynamic_patch": self.max_dynamic_patch,
            "repeat_time": self.repeat_time,
            "length": self.length,
        }


REST_SUFFIX = "_rest"  # `mpo-data meta`: the entry carrying the fractional part of a share above one copy


def internvl_reading(name: str, repeat_time: float) -> str | None:
    """What InternVL does with a fractional repeat above 1 (it truncates), or None if it means what it says."""
    if repeat_time <= 1 or repeat_time == int(repeat_time):
        return None
    copies = int(repeat_time)
    return (f"entry '{name}': repeat_time {repeat_time} above 1 is read by InternVL's loader (and ours) as "
            f"int(r) = {copies} whole cop{'y' if copies == 1 else 'ies'} of the rows, not {repeat_time}x; for "
            f"{repeat_time}x write {copies} here plus an entry with repeat below 1 over the same annotation "
            f"(as `mpo-data meta` does: NAME{REST_SUFFIX})")


_META_TYPES: dict[str, tuple[type, ...]] = {
    "root": (str,),
    "annotation": (str,),
    "repeat_time": (int, float),
    "length": (int,),
    "data_augment": (bool,),
    "max_dynamic_patch": (int,),
}
_META_REQUIRED = ("root", "annotation", "repeat_time", "length")  # MMPR's own meta.json omits the rest


def meta_problems(meta: Any) -> list[str]:
    """Problems of a whole meta.json, each naming the entry and field."""
    if not isinstance(meta, dict) or not meta:
        return ["meta.json must be a non-empty JSON object of dataset entries"]
    problems = []
    for name, entry in meta.items():
        if not isinstance(entry, dict):
            problems.append(f"entry '{name}': expected an object, got {type(entry).__name__}")
            continue
        problems += [f"entry '{name}': missing field '{k}'" for k in _META_REQUIRED if k not in entry]
        for key, value in entry.items():
            types = _META_TYPES.get(key)
            if types is None:
                problems.append(f"entry '{name}': unknown field '{key}'")
            elif (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                problems.append(f"entry '{name}': '{key}' must be {types[0].__name__}, got {type(value).__name__}")
        if isinstance(entry.get("repeat_time"), (int, float)) and not entry["repeat_time"] > 0:
            problems.append(f"entry '{name}': 'repeat_time' must be > 0")
        if isinstance(entry.get("length"), int) and entry["length"] < 0:
            problems.append(f"entry '{name}': 'length' must be >= 0")
    return problems


def read_meta(path: str | Path) -> dict[str, MetaEntry]:
    """Read and validate a meta.json; any problem raises InputError naming the file."""
    path = Path(path)
    try:
        meta = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: no such meta file") from None
    except orjson.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON: {e}") from None
    problems = meta_problems(meta)
    if problems:
        raise InputError("\n".join(f"{path}: {p}" for p in problems))
    return {name: MetaEntry(**entry) for name, entry in meta.items()}


def write_meta(path: str | Path, meta: dict[str, MetaEntry]) -> None:
    """Write a meta.json atomically, in InternVL's layout."""
    body = {name: entry.to_dict() for name, entry in meta.items()}
    atomic_write_bytes(Path(path), orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")


def iter_pairs(path: str | Path) -> Iterator[Pair]:
    """Stream an MMPR pair file; a bad line raises InputError with its FILE:LINE."""
    for loc, raw in read_jsonl(path):
        problems = pair_problems(raw)
        if problems:
            raise InputError(f"{loc}: {problems[0]}")
        yield Pair.from_dict(raw)
