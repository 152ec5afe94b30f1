"""Typed records for every file mpo-data reads or writes, and the rules that validate them.

Records keep unknown keys in ``extra`` so that whatever a user put in a prompt line travels to the
samples and pairs unchanged (docs/design.md, input formats).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

from mpo_data.errors import InputError
from mpo_data.records.jsonl import atomic_write_bytes, read_jsonl

Image = str | list[str] | None  # as in MMPR: one path, a list (multi-image), or absent (text-only)

# Why a sample ended: its own end (or a stop string), max_new_tokens, or the context (max_model_len) filling up.
FINISH_REASONS = ("stop", "length", "context")


def image_list(image: Image) -> list[str]:
    """The image field as a list, whatever form the line used."""
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a question (InternVL's convention)


def placeholder_problem(question: str, n_images: int, *, exact: bool) -> str | None:
    """Why the `<image>` count of a question does not fit its images, or None.

    Text-only: none. One image: one or none (InternVL prepends it). Several: one per image, as InternVL's
    trainer asserts (`exact`, for pair lines); a prompt line may also have none (we add them, in order).
    """
    count = question.count(IMAGE_PLACEHOLDER)
    allowed = {0, 1} if n_images == 1 else {n_images} if exact or n_images == 0 else {0, n_images}
    if count in allowed:
        return None
    wanted = " or ".join(str(n) for n in sorted(allowed))
    return f"'question' has {count} {IMAGE_PLACEHOLDER} placeholder(s) for {n_images} image(s); expected {wanted}"


def with_placeholders(question: str, n_images: int) -> str:
    """The question with a placeholder per image, as InternVL's pipelines write it: kept where the question
    has them, else in front (`<image>\n` for one image, `Image-k: <image>` lines for several)."""
    if not n_images or IMAGE_PLACEHOLDER in question:
        return question
    if n_images == 1:
        return IMAGE_PLACEHOLDER + "\n" + question
    return "".join(f"Image-{k}: {IMAGE_PLACEHOLDER}\n" for k in range(1, n_images + 1)) + question


def strip_placeholders(text: str) -> str:
    """The text without `<image>` placeholders (and the newline each one opens), for a prompt without images."""
    return text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()


def content_parts(text: str, n_images: int) -> list[dict[str, Any]]:
    """Chat content parts: an image part at each `<image>` of `text`, or, with none there, the images
    first (the usual VLM layout). No literal placeholder text is left for a tokenizer to misread."""
    if IMAGE_PLACEHOLDER not in text:
        return [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    parts: list[dict[str, Any]] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def make_item_id(dataset: str, image: Image, question: str, target: Any) -> str:
    """Stable id of a prompt item: same dataset, images, question and answer/chosen, same id."""
    key = orjson.dumps([dataset, image_list(image), question, str(target)])
    return hashlib.sha1(key).hexdigest()[:16]


def _check_image(value: Any) -> str | None:
    if isinstance(value, str):
        return None if value else "'image' is an empty string"
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return None
    return f"'image' must be a path or a non-empty list of paths, got {type(value).__name__}"


@dataclass(frozen=True)
class Key:
    """One key of a record: its types, whether it must be there, whether an empty string is allowed."""

    types: tuple[type, ...] = ()
    required: bool = True
    non_empty: bool = False
    check: Callable[[Any], str | None] | None = None  # the whole rule instead of types, for shapes like `image`


@dataclass(frozen=True)
class Schema:
    """The keys of one record kind: written by one dataclass (its test holds them together), checked by
    every reader of that record through `problems`, so validators cannot drift apart."""

    keys: dict[str, Key]

    def problems(self, raw: Any) -> list[str]:
        """Each problem of `raw` as a message (no location: callers prefix FILE:LINE); [] when it is valid."""
        if not isinstance(raw, dict):
            return [f"expected a JSON object, got {type(raw).__name__}"]
        found = []
        for name, key in self.keys.items():
            value = raw.get(name)
            if value is None:
                found += [f"missing key '{name}'"] if key.required else []
            elif key.check:
                found += [key.check(value)] if key.check(value) else []
            elif (isinstance(value, bool) and bool not in key.types) or not isinstance(value, key.types):
                found.append(
                    f"'{name}' must be {' or '.join(t.__name__ for t in key.types)}, got {type(value).__name__}"
                )
            elif key.non_empty and not (value.strip() if isinstance(value, str) else value):
                found.append(f"'{name}' is empty")
        return found

    def extend(self, **keys: Key) -> "Schema":
        return Schema({**self.keys, **keys})


TEXT = Key((str,), non_empty=True)
IMAGE = Key(required=False, check=_check_image)
ANSWER = Key((str, int, float), non_empty=True)
OPTIONAL_ANSWER = Key((str, int, float), required=False, non_empty=True)
OPTIONAL_TEXT = Key((str,), required=False)

PROMPT_SCHEMAS = {  # what a prompt set's lines hold, per stage
    "correctness": Schema({"image": IMAGE, "question": TEXT, "answer": ANSWER}),
    # correctness with `labels: majority`: `pairs` labels items by their samples' vote, `answer` may be absent
    "correctness-majority": Schema({"image": IMAGE, "question": TEXT, "answer": OPTIONAL_ANSWER}),
    "dropout-ntp": Schema({"image": IMAGE, "question": TEXT, "chosen": TEXT}),
}
PROMPT_KINDS = tuple(PROMPT_SCHEMAS)  # each stage config's `prompt_kind` is one of them
# what the stages write: the prompt line plus the keys of `Sample` / DropoutNTPStage.outcome (`pairs` requires
# `answer` where the dataset's labels are the ground truth)
SAMPLE_SCHEMA = PROMPT_SCHEMAS["correctness-majority"].extend(
    item_id=Key((str,)),
    sample_index=Key((int,)),
    prompt=OPTIONAL_TEXT,
    response=Key((str,)),
    finish_reason=Key((str,)),
    prompt_tokens=Key((int,), required=False),
    output_tokens=Key((int,), required=False),
    prompt_version=OPTIONAL_TEXT,
    model=OPTIONAL_TEXT,
    sampling=Key((dict,), required=False),
    max_num=Key((int,), required=False),
)
DROPOUT_SAMPLE_SCHEMA = PROMPT_SCHEMAS["dropout-ntp"].extend(
    item_id=Key((str,)),
    sample_index=Key((int,), required=False),
    rejected=TEXT,
    finish_reason=OPTIONAL_TEXT,
    output_tokens=Key((int,), required=False),
    provenance=Key((dict,)),
    max_num=Key((int,), required=False),
)
# an MMPR pair line (`Pair`), what InternVL's trainer and `mpo-data train` read
PAIR_SCHEMA = Schema(
    {
        "image": IMAGE,
        "question": TEXT,
        "chosen": TEXT,
        "rejected": TEXT,
        "question_orig": OPTIONAL_TEXT,
        "answer_gt": OPTIONAL_TEXT,
        "chosen_meta": Key((dict,), required=False),
        "rejected_meta": Key((dict,), required=False),
        "provenance": Key((dict,), required=False),
    }
)
# the judge contract's input line
JUDGE_INPUT_SCHEMA = Schema(
    {"response": Key((str,)), "answer": ANSWER, "question": OPTIONAL_TEXT, "prompt_version": OPTIONAL_TEXT}
)
# a TRL preference row (our export, or any set DPOTrainer takes): strings or conversations
TRL_ROW_SCHEMA = Schema(
    {
        "prompt": Key((str, list), non_empty=True),
        "chosen": Key((str, list), non_empty=True),
        "rejected": Key((str, list), non_empty=True),
        "images": Key((list,), required=False),
    }
)


def prompt_problems(raw: Any, kind: str) -> list[str]:
    """Schema problems of one prompt line (images are checked separately, against the root)."""
    if kind not in PROMPT_SCHEMAS:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {PROMPT_KINDS}")
    found = PROMPT_SCHEMAS[kind].problems(raw)
    if kind == "dropout-ntp" and isinstance(raw, dict) and raw.get("rejected") is not None:
        found.append("'rejected' must be null or absent in a dropout-ntp prompt")
    return found + placeholder_problems(raw, exact=False)


def placeholder_problems(raw: Any, *, exact: bool) -> list[str]:
    """The `<image>` count rule of a line with `image` and `question` (once both are sound)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("question"), str):
        return []  # reported by the schema
    if raw.get("image") is not None and _check_image(raw["image"]):
        return []
    problem = placeholder_problem(raw["question"], len(image_list(raw.get("image"))), exact=exact)
    return [problem] if problem else []


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

    @cached_property  # planning asks for it more than once per item; the fields are not changed after reading
    def item_id(self) -> str:
        return make_item_id(
            self.dataset, self.image, self.question, self.answer if self.chosen is None else self.chosen
        )

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
    prompt: str  # the exact user text the model answered (template + image placeholders)
    response: str
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    prompt_version: str
    model: str
    sampling: dict[str, Any]
    max_num: int | None = None  # the tile count it was sampled at (--max-num); None: the processor's own, not written

    @classmethod
    def added_keys(cls) -> set[str]:
        """The keys a sample line adds to its prompt line (what strips it back to the prompt)."""
        return {f.name for f in fields(cls)} - {"item"}

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.item)
        out.update(
            item_id=self.item_id,
            sample_index=self.sample_index,
            prompt=self.prompt,
            response=self.response,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            prompt_version=self.prompt_version,
            model=self.model,
            sampling=self.sampling,
        )
        if self.max_num is not None:
            out["max_num"] = self.max_num
        return out


@dataclass
class Pair:
    """An MMPR preference pair line; InternVL's trainer reads it unchanged."""

    question: str  # the user text the answers were written for (correctness: template + placeholders)
    chosen: str
    rejected: str
    image: Image = None
    question_orig: str | None = None  # correctness: the prompt set's own question, as InternVL keeps it
    answer_gt: str | None = None
    chosen_meta: dict[str, Any] | None = None
    rejected_meta: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None  # model, stage, parameters

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.image is not None:
            out["image"] = self.image
        out.update(question=self.question, chosen=self.chosen, rejected=self.rejected)
        for key in ("question_orig", "answer_gt", "chosen_meta", "rejected_meta", "provenance"):
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
            question_orig=raw.get("question_orig"),
            answer_gt=raw.get("answer_gt"),
            chosen_meta=raw.get("chosen_meta"),
            rejected_meta=raw.get("rejected_meta"),
            provenance=raw.get("provenance"),
        )


def pair_problems(raw: Any) -> list[str]:
    """Schema problems of one MMPR pair line."""
    return PAIR_SCHEMA.problems(raw) + placeholder_problems(raw, exact=True)


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
    return (
        f"entry '{name}': repeat_time {repeat_time} above 1 is read by InternVL's loader (and ours) as "
        f"int(r) = {copies} whole cop{'y' if copies == 1 else 'ies'} of the rows, not {repeat_time}x; for "
        f"{repeat_time}x write {copies} here plus an entry with repeat below 1 over the same annotation "
        f"(as `mpo-data meta` does: NAME{REST_SUFFIX})"
    )


META_ENTRY_SCHEMA = Schema(
    {  # `MetaEntry`; MMPR's own meta.json omits the optional keys
        "root": Key((str,)),
        "annotation": Key((str,)),
        "repeat_time": Key((int, float)),
        "length": Key((int,)),
        "data_augment": Key((bool,), required=False),
        "max_dynamic_patch": Key((int,), required=False),
    }
)


def meta_problems(meta: Any) -> list[str]:
    """Problems of a whole meta.json, each naming the entry and field."""
    if not isinstance(meta, dict) or not meta:
        return ["meta.json must be a non-empty JSON object of dataset entries"]
    problems = []
    for name, entry in meta.items():
        found = META_ENTRY_SCHEMA.problems(entry)
        if isinstance(entry, dict):
            found += [f"unknown field '{k}'" for k in entry if k not in META_ENTRY_SCHEMA.keys]
            number = {k: entry.get(k) for k in ("repeat_time", "length") if not any(k in p for p in found)}
            if number.get("repeat_time") is not None and not number["repeat_time"] > 0:
                found.append("'repeat_time' must be > 0")
            if number.get("length") is not None and number["length"] < 0:
                found.append("'length' must be >= 0")
        problems += [f"entry '{name}': {p}" for p in found]
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
