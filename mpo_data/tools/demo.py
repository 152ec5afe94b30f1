"""Demo prompt sets, built offline: arithmetic questions and a subset of the real easy-VQA data set.

Writes, in the input formats of docs/design.md, under OUT:
  arithmetic.jsonl           correctness, text-only, exact integer answers (fixed seed): sampled for pairs
  arithmetic_heldout.jsonl   the same kind of questions, never sampled: answer accuracy before/after training
  arithmetic_tune.jsonl      the rest of those never-sampled questions: for tuning a recipe, never reported on
  arithmetic_reworded.jsonl  never-sampled facts in wordings the pairs never use (does a gain survive new wording?)
  easy_vqa.jsonl             correctness, one image each (easy-VQA's own questions and answers)
  easy_vqa_describe.jsonl    dropout-ntp, a faithful description built from the ground truth as `chosen`
  images/easy_vqa/*.png      the images, copied from the easy-vqa package (train split: the VLM's, and sampled)
  easy_vqa_heldout.jsonl     easy-VQA *test* questions, one per image, never sampled: the VLM loop's VQA accuracy
  easy_vqa_tune.jsonl        test questions on other test images: for tuning the VLM recipe, never reported on
  easy_vqa_describe_heldout.jsonl / _tune.jsonl   descriptions of those test images (a faithful `chosen` names
                             the truth): the description hallucination rate, held-out / tuning
  images/easy_vqa_test/*.png the test images of those four sets
"""

from __future__ import annotations

import itertools
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mpo_data.records.jsonl import write_jsonl

# SmolLM2-135M-Instruct, "en" template, T=0.3, 20-24 items x 8 samples each, share of samples right with the
# earlier template / with the one that asks for one last "Final answer:" line: one-digit sums and differences
# 15% / 17%; operands up to 5 31% / 42%; these sets (within 10, four wordings) 21% / 30% (20% at T=0.5, and
# 37.5% over all 48 sampled items). One-digit sums alone 33%, "plus"/"minus" in words 19%. Hence numbers
# within 10, + and -, symbols, T=0.3.
OPERATIONS = {"+": lambda a, b: (a, b, a + b), "-": lambda a, b: (a + b, b, a)}  # (left, right, answer)
WORDINGS = (
    "What is {left} {op} {right}?",
    "{left} {op} {right} = ?",
    "Calculate {left} {op} {right}.",
    "How much is {left} {op} {right}?",
)
MAX_NUMBER = 10  # no sum above it, no difference from above it
# Wordings no sampled prompt uses (words, not only symbols; a story): held-out facts only, for arithmetic_reworded.jsonl.
NEW_WORDINGS = {
    "+": (
        "Add {left} and {right}.",
        "What is the sum of {left} and {right}?",
        "{left} plus {right} equals what?",
        "Tom has {left} apples and gets {right} more. How many apples does he have now?",
    ),
    "-": (
        "Subtract {right} from {left}.",
        "What is {left} minus {right}?",
        "Take {right} away from {left}. What is left?",
        "Tom has {left} apples and gives {right} away. How many apples does he have now?",
    ),
}


def _questions(facts: list["Fact"], rng: random.Random, new_wordings: bool = False) -> list[dict]:
    """Every wording of each fact, sums in both orders (1 + 2 and 2 + 1 are one fact)."""
    rows = []
    for op, a, b in facts:
        left, right, answer = OPERATIONS[op](a, b)
        orders = {(left, right), (right, left)} if op == "+" else {(left, right)}
        for (x, y), wording in itertools.product(sorted(orders), NEW_WORDINGS[op] if new_wordings else WORDINGS):
            rows.append(
                {
                    "question": wording.format(left=x, op=op, right=y),
                    "answer": str(answer),
                    "source": "arithmetic",
                    "op": op,
                }
            )
    rng.shuffle(rows)
    return rows


def _interleave(first: list, second: list) -> list:
    """first[0], second[0], first[1], second[1], ..., then the rest of the longer list."""
    merged = [x for pair in zip(first, second) for x in pair]
    return merged + first[len(second) :] + second[len(first) :]


def arithmetic_problems(count: int, seed: int, held_out: int = 0) -> tuple[list[dict], list[dict]]:
    """(prompts for pairs, held-out questions): sums and differences within 10, exact integer answers.

    The two sets share no arithmetic fact (operation and operands, in either order for a sum), so a
    held-out question is never a rewording of one the model was trained on. Numbers stay small so that a
    135M-parameter model answers some right and some wrong: correctness sampling needs both.
    """
    sampled, rest = _split(count, seed)
    if len(sampled) < count or len(rest) < held_out:
        raise ValueError(f"arithmetic facts cannot give {count} + {held_out} disjoint questions")
    return sampled[:count], rest[:held_out]


def tuning_and_reworded(count: int, seed: int, held_out: int) -> tuple[list[dict], list[dict]]:
    """(tuning questions, reworded questions), neither sampled for pairs nor in the held-out set of
    `arithmetic_problems(count, seed, held_out)`: tuning gets the never-sampled questions left after the
    held-out ones (the same wordings; they may share a fact with a held-out question in another wording or
    order), reworded gets every never-sampled fact in `NEW_WORDINGS` (no sampled prompt has those)."""
    _, rest = _split(count, seed)
    _, other_facts, _ = _facts(count, seed)
    return rest[held_out:], _questions(other_facts, random.Random(seed), new_wordings=True)


Fact = tuple[str, int, int]  # (operation, a, b)


def _facts(count: int, seed: int) -> tuple[list[Fact], list[Fact], random.Random]:
    """(facts sampled for pairs, the other facts, the generator that shuffled them): the fewest facts that
    give `count` questions are sampled."""
    pairs = [(a, b) for a in range(1, MAX_NUMBER) for b in range(1, MAX_NUMBER) if a + b <= MAX_NUMBER]
    sums, differences = [("+", a, b) for a, b in pairs if a <= b], [("-", a, b) for a, b in pairs]
    rng = random.Random(seed)
    rng.shuffle(sums)
    rng.shuffle(differences)
    facts = _interleave(sums, differences)  # both operations in the sampled set, whatever the seed
    for split in range(len(facts) + 1):  # the fewest facts that give `count` questions
        if len(_questions(facts[:split], random.Random(0))) >= count:
            break
    return facts[:split], facts[split:], rng


def _split(count: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(questions of the sampled facts, questions of the others), each shuffled by the seeded generator."""
    sampled, rest, rng = _facts(count, seed)
    return _questions(sampled, rng), _questions(rest, rng)


def _easy_vqa_facts(split: str = "train") -> tuple[dict[int, list[tuple[str, str]]], dict[int, str]]:
    """Questions per image id and image paths, from the easy-vqa package's `split` ("train" or "test")."""
    import easy_vqa

    questions, paths = {
        "train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
        "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths),
    }[split]
    texts, answers, image_ids = questions()
    per_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for text, answer, image_id in zip(texts, answers, image_ids):
        per_image[image_id].append((text, answer))
    return per_image, paths()


SHAPES = ("circle", "rectangle", "triangle")


def _shape_and_colour(qas: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    shape = colour = None
    for question, answer in qas:
        if answer in SHAPES and question.startswith("what"):
            shape = answer
        elif question.startswith("what color"):
            colour = answer
        for candidate in SHAPES:
            if question.startswith(f"what color is the {candidate}"):
                shape = candidate
    return shape, colour


def describe(shape: str, colour: str) -> str:
    """A faithful one-paragraph description of an easy-VQA image from its ground truth."""
    others = [s for s in SHAPES if s != shape]
    article = "an" if shape[0] in "aeiou" else "a"
    return (
        f"The image shows a single {colour} {shape} drawn on a plain, light background. "
        f"It is the only shape in the picture: there is no {others[0]} and no {others[1]}. "
        f"The {shape} is filled with one flat {colour} colour, with no text, pattern or shading, "
        f"so the whole picture is simply {article} {shape} in {colour}."
    )


def easy_vqa_test_sets(out: Path, seed: int, heldout: int, tune: int, describe_share: float) -> dict[str, int]:
    """The VLM loop's evaluation sets, from easy-VQA's *test* split (the VLM trains and the demo samples on the
    train split, so none of these images was ever seen): the held-out and tuning question sets use disjoint
    images, one random question each; the first `describe_share` of each set's images also get a description
    item. Returns the row counts."""
    from mpo_data.tools.vlm_easyvqa import DESCRIBE_QUESTION, easy_vqa_split

    rows = easy_vqa_split("test")
    rng = random.Random(seed)
    rng.shuffle(rows)
    if heldout + tune > len(rows):
        raise ValueError(f"easy-VQA's test split has {len(rows)} usable images, not {heldout} + {tune}")
    image_dir = out / "images" / "easy_vqa_test"
    image_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, picked in (("heldout", rows[:heldout]), ("tune", rows[heldout : heldout + tune])):
        questions, descriptions = [], []
        for k, r in enumerate(picked):
            target = image_dir / f"{r['id']}.png"
            if not target.exists():
                shutil.copyfile(r["path"], target)
            image = f"images/easy_vqa_test/{r['id']}.png"  # relative to the set (the evaluations read it so)
            question, answer = rng.choice(r["qas"])
            questions.append({"image": image, "question": question, "answer": answer, "source": "easy_vqa_test"})
            if k < round(describe_share * len(picked)):
                descriptions.append(
                    {
                        "image": image,
                        "question": DESCRIBE_QUESTION,
                        "chosen": describe(r["shape"], r["colour"]),
                        "source": "easy_vqa_test",
                    }
                )
        write_jsonl(out / f"easy_vqa_{name}.jsonl", questions)
        write_jsonl(out / f"easy_vqa_describe_{name}.jsonl", descriptions)
        counts |= {f"easy_vqa_{name}": len(questions), f"easy_vqa_describe_{name}": len(descriptions)}
    return counts


@dataclass(frozen=True)
class DemoConfig:
    """What `mpo-data demo-data` writes (the defaults: what `make data` samples and `make train` evaluates on)."""

    out: str = field(default="data/demo", metadata={"help": "Output folder."})
    num_arithmetic: int = field(
        default=48, metadata={"help": "Arithmetic questions sampled for pairs (correctness, text)."}
    )
    num_heldout: int = field(
        default=256, metadata={"help": "Held-out arithmetic questions, never sampled (answer accuracy)."}
    )
    num_vqa: int = field(
        default=256,
        metadata={
            "help": "easy-VQA questions (correctness, image), one per train image: many distinct images, so the "
            "VLM's pairs teach seeing rather than a few images' answers."
        },
    )
    num_describe: int = field(default=64, metadata={"help": "easy-VQA descriptions (dropout-ntp), other images."})
    seed: int = field(default=0, metadata={"help": "Fixed seed: the same sets every time."})


def build(config: DemoConfig = DemoConfig()) -> dict:
    """Write the demo prompt sets under `config.out`; returns the row counts."""
    out, seed = Path(config.out), config.seed
    arithmetic, heldout = arithmetic_problems(config.num_arithmetic, seed, config.num_heldout)
    write_jsonl(out / "arithmetic.jsonl", arithmetic)
    write_jsonl(out / "arithmetic_heldout.jsonl", heldout)
    tune, reworded = tuning_and_reworded(config.num_arithmetic, seed, config.num_heldout)
    write_jsonl(out / "arithmetic_tune.jsonl", tune)
    write_jsonl(out / "arithmetic_reworded.jsonl", reworded)

    per_image, paths = _easy_vqa_facts()
    rng = random.Random(seed)
    ids = sorted(per_image)
    rng.shuffle(ids)
    image_dir = out / "images" / "easy_vqa"
    image_dir.mkdir(parents=True, exist_ok=True)

    def image_rel(image_id: int) -> str:
        target = image_dir / f"{image_id}.png"
        if not target.exists():
            shutil.copyfile(paths[image_id], target)
        return f"easy_vqa/{image_id}.png"

    vqa_rows = []
    for image_id in ids[: config.num_vqa]:
        question, answer = rng.choice(per_image[image_id])
        vqa_rows.append({"image": image_rel(image_id), "question": question, "answer": answer, "source": "easy_vqa"})
    write_jsonl(out / "easy_vqa.jsonl", vqa_rows)

    describe_rows = []
    for image_id in ids[config.num_vqa :]:
        if len(describe_rows) == config.num_describe:
            break
        shape, colour = _shape_and_colour(per_image[image_id])
        if shape and colour:
            describe_rows.append(
                {
                    "image": image_rel(image_id),
                    "question": "Describe the image in one paragraph.",
                    "chosen": describe(shape, colour),
                    "rejected": None,
                    "source": "easy_vqa",
                }
            )
    write_jsonl(out / "easy_vqa_describe.jsonl", describe_rows)
    test_counts = easy_vqa_test_sets(out, seed, heldout=320, tune=160, describe_share=0.375)
    return {
        "arithmetic": len(arithmetic),
        "arithmetic_heldout": len(heldout),
        "arithmetic_tune": len(tune),
        "arithmetic_reworded": len(reworded),
        "easy_vqa": len(vqa_rows),
        "easy_vqa_describe": len(describe_rows),
        **test_counts,
    }
