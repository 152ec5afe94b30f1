"""`mpo-data pairs`: sample shards -> MMPR preference pairs, as InternVL's correctness postprocess does.

Memory stays bounded whatever the input size: correctness samples are judged as they stream in and
spilled into hash buckets by item_id (one bucket of ~`bucket_bytes` is in memory at a time), and the
global dedup keeps only an 8-byte digest per written pair. Judging runs on all cores (`mpo_data.preference.judge`).

Labels: an item's label is its ground truth `answer`, or, for a dataset sampled with `labels: majority`
(its run.json says so), the majority final answer of its samples, answers voting together where the judge
finds them equal; an item whose majority holds under --majority-threshold of its samples is dropped.

Outputs in --save-dir, all written atomically:
  <ds>_pairs_vqa_correctness_rules.jsonl   correct (chosen) x incorrect but well-formed (rejected)
  <ds>_pairs_vqa_format_rules.jsonl        correct (chosen) x malformed (rejected)
  <ds>_prefix_pair_sr<ratio>_{wo,with}_image.jsonl   DropoutNTP lines
  pos_items/<ds>.jsonl   every correct sample, judged (majority labels: with majority_answer, majority_share)
  neg_items/<ds>.jsonl   items never answered right
  pairs_summary.json     per dataset: counts of every filter, correctness rate, judge errors
  quarantine/<stage>_<ds>.jsonl   with --on-error skip: bad sample lines, each with its reason
"""

from __future__ import annotations

import hashlib
import math
import random
import shutil
import sys
import tempfile
import zlib
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
from tqdm import tqdm

from mpo_data.errors import InputError, OnError
from mpo_data.preference import hallucination
from mpo_data.preference.judge import (
    Judge,
    JudgeConfig,
    JudgeItem,
    Verdict,
    checked_version,
    extract_answer,
    modes_for_dataset,
)
from mpo_data.records.formats import (
    DROPOUT_SAMPLE_SCHEMA,
    FINISH_REASONS,
    SAMPLE_SCHEMA,
    Pair,
    Sample,
    Schema,
    image_list,
    placeholder_problems,
    with_placeholders,
)
from mpo_data.records.inputs import Problem, Quarantine
from mpo_data.records.jsonl import AtomicFile, atomic_write_bytes, dumps, iter_lines
from mpo_data.records.shards import DROPPED, ShardStore, sample_group, shard_folder
from mpo_data.runlock import holds
from mpo_data.sampling.dropout_ntp import cut_prefix
from mpo_data.sampling.prompts import DEFAULT_PROMPT_VERSION, user_prompt
from mpo_data.sampling.stage_config import STAGE_CONFIGS

STAGES = tuple(STAGE_CONFIGS)  # a sample folder is OUT/samples/<stage>/<dataset>/
# Keys a judged correctness sample adds to its prompt item (what neg_items/ strips to get the prompt back).
SAMPLE_KEYS = Sample.added_keys() | set(Verdict.KEYS)


@dataclass
class PairsConfig:
    """Where samples come from, where pairs go, and how many pairs one item may give."""

    data_dir: Path = field(
        metadata={
            "help": "Samples: a stage's --out-dir (as InternVL's guide passes it), its samples/ folder, one stage "
            "folder or one dataset folder."
        }
    )
    save_dir: Path = field(metadata={"help": "Folder for pair files, pos_items/, neg_items/ and pairs_summary.json."})
    num_pairs_per_key: int = field(default=15, metadata={"help": "At most this many pairs per item and rule."})
    max_lines: int = field(
        default=1_200_000,
        metadata={
            "help": "Lines read per dataset at most. InternVL's script defaults to 1,000,000; its guide passes "
            "1,200,000, which is ours."
        },
    )
    answer_fix: bool = field(default=False, metadata={"help": "Rewrite the chosen's final answer to the label."})
    majority_threshold: float = field(
        default=0.5,
        metadata={
            "help": "Datasets sampled with `labels: majority`: the least share of an item's samples (all of them, "
            "malformed ones included) whose final answers must agree for the majority to become its label; "
            "items under it, or with two answers tied at the top, are counted and dropped. 0.5 keeps items "
            "where at least half of the samples agree."
        },
    )
    accuracy_range: tuple[float, float] | None = field(
        default=None,
        metadata={
            "help": "Correctness datasets: make pairs only from items whose sampled accuracy (the share of their "
            "judged samples that are correct) lies within [LO, HI], e.g. 0.2 0.8 as InternVL3.5's MMPR-Tiny; "
            "items outside are counted (items_outside_accuracy_range) and their correct samples still go to "
            "pos_items/. None: every item.",
            "metavar": ("LO", "HI"),
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of pair sampling; same seed, same output."})
    on_error: OnError = field(
        default="fail",
        metadata={
            "help": "Bad sample lines: fail naming FILE:LINE, or skip them to SAVE_DIR/quarantine/ with counts."
        },
    )
    bucket_bytes: int = field(
        default=32 << 20, metadata={"help": "Input bytes per item_id hash bucket held in memory."}
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "Matching modes, workers, timeout."})


LABELS = ("answer", "majority")  # CorrectnessConfig.labels, as run.json records it


def dataset_labels(parts: list[Path]) -> str:
    """Where a correctness dataset's labels come from: its run.json's `labels` (the stage records it), else answer."""
    run = shard_folder(parts[0]) / "run.json"
    if not run.exists():
        return "answer"
    try:
        labels = orjson.loads(run.read_bytes()).get("labels", "answer")
    except (orjson.JSONDecodeError, AttributeError) as e:
        raise InputError(f"{run}: not a JSON object of run settings ({e})") from None
    if labels not in LABELS:
        raise InputError(f"{run}: 'labels' must be one of {LABELS}, got {labels!r}")
    return labels


def find_datasets(data_dir: Path) -> dict[tuple[str, str], list[Path]]:
    """(stage, dataset) -> its part files, found anywhere below `data_dir`.

    Temp files of a crashed write and the stages' `dropped/` parts (samples already rejected) are not input.
    """
    if not data_dir.exists():
        raise InputError(f"{data_dir}: no such folder")
    found: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for part in sorted(data_dir.rglob("part-*.jsonl")):
        folder = shard_folder(part)
        if folder.name == DROPPED and folder.parent.parent.name in STAGES:
            continue
        stage, dataset = folder.parent.name, folder.name
        if stage not in STAGES:
            raise InputError(f"{part}: expected <stage>/<dataset>/part-*.jsonl with stage in {STAGES}, got {stage!r}")
        found[(stage, dataset)].append(part)
    if not found:
        raise InputError(f"{data_dir}: no part-*.jsonl files below it")
    return dict(found)


def iter_checked(
    parts: list[Path], max_lines: int, counts: Counter, check: Callable[[str, Any], Any], quarantine: Quarantine | None
) -> Iterator[tuple[Any, Any]]:
    """(value, check's result) of the first `max_lines` lines over the part files.

    A line that is not JSON or fails `check` raises InputError naming FILE:LINE, or with a quarantine is
    written there with its reason and counted.
    """
    for part in parts:
        for line in iter_lines(part):
            if counts["lines"] >= max_lines:
                counts["lines_over_max_lines"] += 1
                continue
            counts["lines"] += 1
            try:
                if line.error:
                    raise InputError(f"{line.loc}: {line.error}")
                checked = check(line.loc, line.value)
            except InputError as e:
                if quarantine is None:
                    raise
                message = str(e).removeprefix(f"{line.loc}: ")
                quarantine.add([Problem(line.loc, "invalid JSON" if line.error else "schema", message)], line.value)
                continue
            yield line.value, checked


def _require(loc: str, raw: Any, schema: Schema) -> None:
    """InputError naming FILE:LINE at the first problem of `raw` under `schema`, its `<image>` count included."""
    problems = schema.problems(raw) or placeholder_problems(raw, exact=False)
    if problems:
        raise InputError(f"{loc}: {problems[0]}")


def check_sample(loc: str, raw: Any, labelled: bool = True) -> str:
    """Validate a correctness sample line (with its `answer` where it is `labelled`); returns its prompt_version."""
    _require(loc, raw, SAMPLE_SCHEMA)
    if labelled and raw.get("answer") is None:
        raise InputError(
            f"{loc}: missing key 'answer' (a prompt set without answers is sampled with labels: majority)"
        )
    version = checked_version(loc, raw)
    if raw["finish_reason"] not in FINISH_REASONS:
        raise InputError(f"{loc}: 'finish_reason' must be one of {FINISH_REASONS}, got {raw['finish_reason']!r}")
    return version


_WORDS_WINDOW = 256
_TAIL_CHARS = 2000


def is_degenerate(text: str) -> bool:
    """A response that ends in a loop: few distinct word 4-grams in its tail, or a tail that compresses
    ten-fold (a short string repeated, with or without spaces; real prose compresses about 2-3x)."""
    words = text.split()[-_WORDS_WINDOW:]
    if len(words) >= 64:
        grams = {tuple(words[i : i + 4]) for i in range(len(words) - 3)}
        if len(grams) < 0.3 * (len(words) - 3):
            return True
    tail = text[-_TAIL_CHARS:].encode()
    return len(tail) >= 400 and len(zlib.compress(tail)) < 0.1 * len(tail)


def in_range(accuracy: float, bounds: tuple[float, float] | None) -> bool:
    """Whether an item's sampled accuracy passes --accuracy-range (inclusive at both ends; None: always)."""
    return bounds is None or bounds[0] <= accuracy <= bounds[1]


def fix_answer(response: str, span: list[int] | None, answer: str) -> str:
    """The response with its extracted final answer replaced by the ground truth (InternVL's --answer-fix)."""
    if not span:
        return response
    return response[: span[0]] + answer + response[span[1] :]


class Outputs:
    """Output files opened on first write (no empty files), all committed together or not at all."""

    def __init__(self, stack: ExitStack):
        self._stack = stack
        self._files: dict[Path, Any] = {}

    def write(self, path: Path, row: dict) -> None:
        handle = self._files.get(path)
        if handle is None:
            handle = self._files[path] = self._stack.enter_context(AtomicFile(path))
        handle.write(dumps(row))


class Dedup:
    """Pairs seen anywhere in this run, as 8-byte digests of (image, question, chosen, rejected)."""

    def __init__(self):
        self._seen: set[bytes] = set()

    def first(self, pair: Pair) -> bool:
        digest = hashlib.blake2b(orjson.dumps([pair.image, pair.question, pair.chosen, pair.rejected]), digest_size=8)
        key = digest.digest()
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


# ------------------------------------------------------------------------------------------ correctness


def _sample_meta(sample: dict) -> dict[str, Any]:
    return {
        "item_id": sample["item_id"],
        "sample_index": sample["sample_index"],
        "answer_pred": sample["answer_pred"],
        "format_ok": sample["format_ok"],
        "finish_reason": sample["finish_reason"],
        "output_tokens": sample.get("output_tokens"),
        **({"max_num": sample["max_num"]} if sample.get("max_num") is not None else {}),
    }


def sampled_prompt(sample: dict) -> str:
    """The user text a sample answered; rebuilt from its template for shards written before samples kept it."""
    version = sample.get("prompt_version") or DEFAULT_PROMPT_VERSION
    return sample.get("prompt") or user_prompt(sample["question"], len(image_list(sample.get("image"))), version)


@dataclass(frozen=True)
class Label:
    """An item's label and where it came from."""

    answer: str
    source: str  # "ground_truth" (the row's answer) or "majority" (its samples' vote)
    share: float | None = None  # majority: the share of the item's samples that gave it

    def provenance(self) -> dict[str, Any]:
        return {"label_source": self.source} | ({"majority_share": self.share} if self.share is not None else {})


def _make_pair(
    pos: dict, chosen: str, neg: dict, rule: str, modes: tuple[str, ...], answer_fix: bool, label: Label
) -> Pair:
    return Pair(
        image=pos.get("image"),
        question=sampled_prompt(pos),
        question_orig=pos["question"],
        chosen=chosen,
        rejected=neg["response"],
        answer_gt=label.answer,
        chosen_meta=_sample_meta(pos),
        rejected_meta=_sample_meta(neg),
        provenance={
            "model": pos.get("model"),
            "stage": "correctness",
            "rule": rule,
            "prompt_version": pos.get("prompt_version") or DEFAULT_PROMPT_VERSION,
            "sampling": pos.get("sampling"),
            "judge_modes": list(modes),
            "answer_fix": answer_fix,
            **label.provenance(),
        },
    )


class CorrectnessPairs:
    """One correctness dataset: judge -> buckets by item_id -> label and pairs per item."""

    def __init__(
        self,
        config: PairsConfig,
        dataset: str,
        parts: list[Path],
        judge: Judge,
        dedup: Dedup,
        out: Outputs,
        quarantine: Quarantine | None,
    ):
        self.config, self.dataset, self.parts = config, dataset, parts
        self.judge, self.dedup, self.out, self.quarantine = judge, dedup, out, quarantine
        self.modes = tuple(config.judge.modes) if config.judge.modes else modes_for_dataset(dataset)
        self.majority = dataset_labels(parts) == "majority"
        self.counts: Counter = Counter()
        save = config.save_dir
        self.paths = {rule: save / f"{dataset}_pairs_vqa_{rule}_rules.jsonl" for rule in ("correctness", "format")}
        self.paths.update(pos=save / "pos_items" / f"{dataset}.jsonl", neg=save / "neg_items" / f"{dataset}.jsonl")

    def _check(self, loc: str, raw: Any) -> str:
        return check_sample(loc, raw, labelled=not self.majority)

    def _count(self, verdict: Verdict) -> None:
        self.counts.update(
            samples=1,
            correct=verdict.is_correct,
            format_failures=not verdict.format_ok,
            judge_errors=verdict.judge_error is not None,
        )

    def _judged(self) -> Iterator[dict]:
        """Sample lines, judged against their ground truth; majority-labelled ones are judged per item later."""
        lines = iter_checked(self.parts, self.config.max_lines, self.counts, self._check, self.quarantine)
        if self.majority:
            yield from (raw for raw, _ in lines)
            return
        rows = (
            JudgeItem(raw, raw["response"], str(raw["answer"]), raw["question"], version, self.modes)
            for raw, version in lines
        )
        for raw, verdict in self.judge.judge_many(rows):
            raw.update(verdict.contract())
            self._count(verdict)
            yield raw

    def _spill(self, folder: Path) -> list[Path]:
        """Pass 1: judge every sample (against its ground truth) and append it to its item_id's bucket file."""
        size = sum(p.stat().st_size for p in self.parts)
        buckets = [folder / f"bucket-{i:04d}.jsonl" for i in range(max(1, math.ceil(size / self.config.bucket_bytes)))]
        with ExitStack() as stack:
            handles = [stack.enter_context(b.open("wb")) for b in buckets]
            for raw in tqdm(self._judged(), desc=f"judge {self.dataset}", unit=" lines", mininterval=5, disable=None):
                handles[zlib.crc32(raw["item_id"].encode()) % len(handles)].write(dumps(raw))
        return buckets

    def _votes(self, groups: dict[str, list[dict]]) -> dict[str, dict[str, list[Verdict]]]:
        """item_id -> candidate answer -> each sample's verdict against it (in sample order).

        The candidates of an item are the distinct final answers of its samples; judging every sample against
        every candidate lets answers the judge finds equal (0.5, 1/2) vote together.
        """

        def version(sample: dict) -> str:
            return sample.get("prompt_version") or DEFAULT_PROMPT_VERSION

        candidates = {}
        for item_id, samples in groups.items():
            answers = (extract_answer(s["response"], version(s)) for s in samples)
            candidates[item_id] = [a for a, _ in Counter(e.answer for e in answers if e.format_ok).most_common()]
        rows = (
            JudgeItem((item_id, answer), s["response"], answer, s["question"], version(s), self.modes)
            for item_id, samples in groups.items()
            for answer in candidates[item_id]
            for s in samples
        )
        votes: dict[str, dict[str, list[Verdict]]] = defaultdict(lambda: defaultdict(list))
        for (item_id, answer), verdict in self.judge.judge_many(rows):
            votes[item_id][answer].append(verdict)
        return votes

    def _majority(self, samples: list[dict], votes: dict[str, list[Verdict]]) -> Label | None:
        """The item's label by vote, its samples judged against it; None (counted) when the vote is too weak."""
        voters = {
            answer: frozenset(k for k, v in enumerate(verdicts) if v.is_correct) for answer, verdicts in votes.items()
        }
        ranked = sorted(voters, key=lambda a: -len(voters[a]))  # stable: ties keep the most frequent answer first
        best = ranked[0] if ranked else None
        for k, sample in enumerate(samples):
            verdict = votes[best][k] if best is not None else Verdict(None, False, False)
            sample.update(verdict.contract())
            self._count(verdict)
        share = round(len(voters[best]) / len(samples), 6) if best is not None else 0.0
        if share < self.config.majority_threshold or share == 0:
            self.counts["items_below_majority_threshold"] += 1
            return None
        # a runner-up with as many votes from other samples is another answer, not a spelling of this one
        if any(len(voters[a]) == len(voters[best]) and voters[a] != voters[best] for a in ranked[1:]):
            self.counts["items_majority_tied"] += 1
            return None
        self.counts["items_majority_labelled"] += 1
        return Label(best, "majority", share)

    def _usable_chosen(self, sample: dict) -> bool:
        """Chosen responses are complete (not cut at max tokens or by a full context) and not looping."""
        if sample["finish_reason"] in ("length", "context"):
            self.counts["filtered_chosen_truncated"] += 1
            return False
        if is_degenerate(sample["response"]):
            self.counts["filtered_chosen_repetitive"] += 1
            return False
        return True

    def _pairs_for_rule(
        self, item_id: str, chosen: list[tuple[dict, str]], rejected: list[dict], rule: str, label: Label
    ) -> None:
        candidates = []
        for pos, text in chosen:
            for neg in rejected:
                if text == neg["response"]:
                    self.counts["filtered_same_text"] += 1
                else:
                    candidates.append((pos, text, neg))
        rng = random.Random(f"{self.config.seed}:{item_id}:{rule}")
        picked = rng.sample(candidates, min(self.config.num_pairs_per_key, len(candidates)))
        path = self.paths[rule]
        for pos, text, neg in picked:
            pair = _make_pair(pos, text, neg, rule, self.modes, self.config.answer_fix, label)
            if not self.dedup.first(pair):
                self.counts["filtered_duplicate"] += 1
                continue
            self.out.write(path, pair.to_dict())
            self.counts[f"pairs_{rule}"] += 1

    def _item(self, item_id: str, samples: list[dict], label: Label) -> None:
        judged = [s for s in samples if "judge_error" not in s]
        positives = [s for s in judged if s["is_correct"]]
        self.counts["items"] += 1
        for pos in positives:
            extra = (
                {"majority_answer": label.answer, "majority_share": label.share} if label.source == "majority" else {}
            )
            self.out.write(self.paths["pos"], pos | extra)
        if not positives:
            self.counts["items_never_correct"] += 1
            prompt = {k: v for k, v in samples[0].items() if k not in SAMPLE_KEYS}
            self.out.write(self.paths["neg"], prompt)
            return
        if not in_range(len(positives) / len(judged), self.config.accuracy_range):
            self.counts["items_outside_accuracy_range"] += 1
            return
        chosen = [
            (
                s,
                fix_answer(s["response"], s.get("answer_span"), label.answer)
                if self.config.answer_fix
                else s["response"],
            )
            for s in positives
            if self._usable_chosen(s)
        ]
        wrong = [s for s in judged if s["format_ok"] and not s["is_correct"]]
        self._pairs_for_rule(item_id, chosen, wrong, "correctness", label)
        self._pairs_for_rule(item_id, chosen, [s for s in samples if not s["format_ok"]], "format", label)

    def _bucket(self, groups: dict[str, list[dict]]) -> None:
        """Pass 2: label each item of one bucket and pair its samples."""
        for samples in groups.values():
            samples.sort(key=lambda s: s["sample_index"])
        votes = self._votes(groups) if self.majority else {}
        for item_id in sorted(groups):
            samples = groups.pop(item_id)
            if not self.majority:
                self._item(item_id, samples, Label(str(samples[0]["answer"]), "ground_truth"))
            elif label := self._majority(samples, votes.pop(item_id, {})):
                self._item(item_id, samples, label)

    def run(self) -> Counter:
        with tempfile.TemporaryDirectory(dir=self.config.save_dir, prefix=".pairs-buckets-") as tmp:
            for bucket in self._spill(Path(tmp)):
                groups: dict[str, list[dict]] = defaultdict(list)
                for line in iter_lines(bucket):
                    groups[sample_group(line.value["item_id"], line.value.get("max_num"))].append(line.value)
                bucket.unlink()
                self._bucket(groups)
        samples = self.counts["samples"]
        self.counts["correctness_rate"] = round(self.counts["correct"] / samples, 6) if samples else 0.0
        return self.counts


# ------------------------------------------------------------------------------------------ dropout-ntp


def check_dropout(loc: str, raw: Any) -> float:
    """Validate a DropoutNTP sample line; returns its start ratio."""
    _require(loc, raw, DROPOUT_SAMPLE_SCHEMA)
    ratio = raw["provenance"].get("start_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise InputError(f"{loc}: 'provenance.start_ratio' must be a number")
    return ratio


def dropout_pairs(
    config: PairsConfig, dataset: str, parts: list[Path], dedup: Dedup, out: Outputs, quarantine: Quarantine | None
) -> Counter:
    """DropoutNTP lines -> `<ds>_prefix_pair_sr<ratio>_{wo,with}_image.jsonl`; chosen is the original answer.
    Every continuation is also scored for shape/colour hallucinations (mpo_data.preference.hallucination)."""
    counts: Counter = Counter()
    scored: Counter = Counter()
    with_image: set[bool] = set()
    for raw, ratio in iter_checked(parts, config.max_lines, counts, check_dropout, quarantine):
        provenance = raw["provenance"]
        with_image.add(bool(provenance.get("load_image")))
        scored[
            hallucination.score_continuation(raw["chosen"], raw["rejected"], cut_prefix(raw["chosen"], ratio)[0])
        ] += 1
        if raw["chosen"] == raw["rejected"]:
            counts["filtered_same_text"] += 1
            continue
        if is_degenerate(raw["chosen"]):
            counts["filtered_chosen_repetitive"] += 1
            continue
        n_images = len(image_list(raw.get("image")))
        pair = Pair(
            image=raw.get("image"),
            # InternVL asserts one placeholder per image on multi-image lines (and adds the single one itself)
            question=with_placeholders(raw["question"], n_images) if n_images > 1 else raw["question"],
            chosen=raw["chosen"],
            rejected=raw["rejected"],
            rejected_meta={k: raw.get(k) for k in ("item_id", "sample_index", "finish_reason", "output_tokens")},
            provenance=provenance,
        )
        if not dedup.first(pair):
            counts["filtered_duplicate"] += 1
            continue
        suffix = "with_image" if provenance.get("load_image") else "wo_image"
        out.write(config.save_dir / f"{dataset}_prefix_pair_sr{ratio:g}_{suffix}.jsonl", pair.to_dict())
        counts["pairs_dropout_ntp"] += 1
    if scored.total() > scored["unscored"]:
        counts["hallucination"] = {"load_image": sorted(with_image), **hallucination.rate(scored)}
    return counts


def remove_leftovers(save_dir: Path) -> None:
    """Temp files and buckets a killed run left; safe to remove as this run holds the folder."""
    for path in list(save_dir.rglob(".*")):
        if path.is_dir() and path.name.startswith(".pairs-buckets-"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


@holds("save_dir")
def build_pairs(config: PairsConfig) -> dict[str, dict[str, Any]]:
    """Every dataset below data_dir -> pair files; returns (and writes) the per-dataset summary."""
    if not 0 < config.majority_threshold <= 1:
        raise InputError(f"--majority-threshold must be within (0, 1], got {config.majority_threshold}")
    if config.accuracy_range is not None and not 0 <= config.accuracy_range[0] <= config.accuracy_range[1] <= 1:
        raise InputError(f"--accuracy-range must be LO HI with 0 <= LO <= HI <= 1, got {list(config.accuracy_range)}")
    datasets = find_datasets(config.data_dir)
    config.save_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(config.save_dir)
    summary: dict[str, dict[str, Any]] = {}
    dedup = Dedup()
    with ExitStack() as stack:
        out = Outputs(stack)
        judge = stack.enter_context(Judge(config.judge)) if any(s == "correctness" for s, _ in datasets) else None
        for (stage, dataset), parts in sorted(datasets.items()):
            skip = config.on_error == "skip"
            quarantine = Quarantine(config.save_dir / "quarantine" / f"{stage}_{dataset}.jsonl") if skip else None
            if stage == "correctness":
                counts = CorrectnessPairs(config, dataset, parts, judge, dedup, out, quarantine).run()
            else:
                counts = dropout_pairs(config, dataset, parts, dedup, out, quarantine)
            if quarantine is not None:
                quarantine.close()
                counts.update({f"quarantined_{reason}": n for reason, n in quarantine.counts.items()})
            missing = ShardStore(shard_folder(parts[0])).missing_parts()
            if missing:  # said, and counted: pairs from what is left, a stage rerun generates the rest again
                print(
                    f"warning: {shard_folder(parts[0])}: {missing} part(s) its last run wrote are gone; pairs are built "
                    f"from the rest (rerun the {stage} stage to generate their samples again)",
                    file=sys.stderr,
                )
                counts["parts_missing"] = missing
            summary[f"{stage}/{dataset}"] = dict(sorted(counts.items()))
    atomic_write_bytes(
        config.save_dir / "pairs_summary.json", orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n"
    )
    return summary
