"""Demo prompt sets, built offline: arithmetic word problems and a subset of the real easy-VQA data set.

Writes, in the input formats of design.md, under OUT:
  arithmetic.jsonl           correctness, text-only, exact integer answers (fixed seed)
  easy_vqa.jsonl             correctness, one image each (easy-VQA's own questions and answers)
  easy_vqa_describe.jsonl    dropout-ntp, a faithful description built from the ground truth as `chosen`
  images/easy_vqa/*.png      the images, copied from the easy-vqa package
"""

from __future__ import annotations

import random
import shutil
from collections import defaultdict
from pathlib import Path

from mpo_data.jsonl import write_jsonl

NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jia"]
THINGS = ["apple", "book", "marble", "pencil", "sticker", "card", "shell", "coin"]


def arithmetic_problems(count: int, seed: int) -> list[dict]:
    """Word problems over + - x / with an exact integer answer each.

    Numbers stay small so that a 135M-parameter model gets some right and some wrong: correctness
    sampling needs both to make pairs.
    """
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(2, 9), rng.randint(2, 6)
        op = index % 4
        if op == 0:
            question, answer = f"{name} has {a} {thing}s and buys {b} more. How many {thing}s does {name} have now?", a + b
        elif op == 1:
            a += b
            question, answer = f"{name} had {a} {thing}s and gave {b} of them away. How many {thing}s are left?", a - b
        elif op == 2:
            question, answer = f"A box holds {b} {thing}s. How many {thing}s are in {a} boxes?", a * b
        else:
            question, answer = f"{name} shares {a * b} {thing}s equally among {b} friends. How many {thing}s does each friend get?", a
        rows.append({"question": question, "answer": str(answer), "source": "arithmetic", "op": "+-*/"[op]})
    return rows


def _easy_vqa_facts() -> tuple[dict[int, list[tuple[str, str]]], dict[int, str]]:
    """Questions per image id and image paths, from the easy-vqa package's training split."""
    import easy_vqa

    texts, answers, image_ids = easy_vqa.get_train_questions()
    per_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for text, answer, image_id in zip(texts, answers, image_ids):
        per_image[image_id].append((text, answer))
    return per_image, easy_vqa.get_train_image_paths()


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


def build(out: str | Path, num_arithmetic: int = 32, num_vqa: int = 24, num_describe: int = 24, seed: int = 0) -> dict:
    """Write the three demo prompt sets under `out`; returns the row counts."""
    out = Path(out)
    write_jsonl(out / "arithmetic.jsonl", arithmetic_problems(num_arithmetic, seed))

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
    for image_id in ids[:num_vqa]:
        question, answer = rng.choice(per_image[image_id])
        vqa_rows.append({"image": image_rel(image_id), "question": question, "answer": answer, "source": "easy_vqa"})
    write_jsonl(out / "easy_vqa.jsonl", vqa_rows)

    describe_rows = []
    for image_id in ids[num_vqa:]:
        if len(describe_rows) == num_describe:
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
    return {"arithmetic": num_arithmetic, "easy_vqa": len(vqa_rows), "easy_vqa_describe": len(describe_rows)}
