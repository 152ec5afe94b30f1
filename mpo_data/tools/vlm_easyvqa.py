"""A tiny SmolVLM that sees: the tiny Idefics3 trained on easy-VQA's train split, built offline.

The random tiny VLM answers noise, so sampling with an image never gets a verdict mix. This one is
trained (seeded, a plain transformers/torch loop) on easy-VQA's *train* images: every question in the
`en` prompt version's format (one reasoning line that names the shape and colour it sees, then the
"Final answer:" line the judge reads), plus the demo's faithful description of each image. The test
split is left for evaluation. Calibration: a few hundred steps give a model that is right on some
questions and wrong on others, so correctness sampling at the demo temperature gets both verdicts.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field

from mpo_data.preference.hallucination import COLOURS
from mpo_data.records.formats import content_parts
from mpo_data.sampling.prompts import prompt_version, user_prompt
from mpo_data.tools.demo import SHAPES, _easy_vqa_facts, describe

DESCRIBE_QUESTION = "Describe the image in one paragraph."  # the demo's easy_vqa_describe question
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class VlmRecipe:
    """How the easy-VQA VLM is trained (defaults: what `mpo-data models` builds)."""

    steps: int = field(default=700, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Examples a step."})
    lr: float = field(default=2e-3, metadata={"help": "Peak learning rate of the text model."})
    vision_lr: float = field(default=1e-2, metadata={"help": "Peak learning rate of the vision tower and connector."})
    warmup: int = field(default=30, metadata={"help": "Linear warm-up steps, then cosine decay to 10%."})
    describe_first: int = field(
        default=250,
        metadata={"help": "Steps of short descriptions only ('a red circle': the image's words alone) first."},
    )
    describe_share: float = field(default=0.25, metadata={"help": "Share of description examples after that phase."})
    images: int = field(
        default=4000, metadata={"help": "easy-VQA train images used (those with known shape and colour)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the weights, the data order and the sampling."})
    threads: int = field(default=2, metadata={"help": "torch threads."})
    prompt_version: str = field(
        default="en", metadata={"help": "Prompt version whose answer format the answers follow."}
    )


def image_truth(qas: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """(shape, colour) of an easy-VQA image from its questions: open answers, and yes/no questions
    ("is there not a red shape?" -> no says the shape is red)."""
    shape = colour = None
    for question, answer in qas:
        words = _WORD.findall(question.lower())
        named_shapes = [w for w in words if w in SHAPES]
        named_colours = [w for w in words if w in COLOURS]
        if answer in SHAPES:
            shape = answer
        elif answer in COLOURS:
            colour = answer
        elif answer in ("yes", "no"):
            present = (answer == "yes") != ("not" in words or "no" in words)
            if present and named_shapes:
                shape = named_shapes[0]
            if present and named_colours:
                colour = named_colours[0]
            continue
        if named_shapes:  # "what color is the circle?"
            shape = named_shapes[0]
        if named_colours:  # "what is the red shape?"
            colour = named_colours[0]
    return shape, colour


def seen(shape: str, colour: str) -> str:
    """The sentence on what the image shows: the reasoning line of an answer."""
    return f"The image shows a {colour} {shape}."


def reasoning(shape: str, colour: str, answer: str, version: str = "en") -> str:
    """The answer text: the sentence on what the image shows, then the version's final-answer line."""
    return f"{seen(shape, colour)}\n{prompt_version(version).answer_label}: {answer}"


def easy_vqa_split(split: str) -> list[dict]:
    """Images of an easy-VQA split with known shape and colour: {path, shape, colour, qas}."""
    per_image, paths = _easy_vqa_facts(split)
    rows = []
    for image_id in sorted(per_image):
        shape, colour = image_truth(per_image[image_id])
        if shape and colour:
            rows.append(
                {"id": image_id, "path": paths[image_id], "shape": shape, "colour": colour, "qas": per_image[image_id]}
            )
    return rows


def chat_prompt(processor, question: str, version: str | None) -> str:
    """The prompt string our engine sends for `question` with one image (user turn + 'Assistant:')."""
    text = user_prompt(question, 1, version) if version else question  # a description: the bare question
    parts = content_parts(text, 1)
    return processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)


class _Batcher:
    """Tokenized examples (prompt ids, answer ids, image index) and the images' pixel values, made once."""

    def __init__(self, processor, rows: list[dict], version: str):
        import torch
        from PIL import Image

        self.processor, self.version = processor, version
        tokenizer = processor.tokenizer
        self.pixels = torch.cat(
            [
                processor.image_processor(Image.open(r["path"]).convert("RGB"), return_tensors="pt")["pixel_values"][0]
                for r in rows
            ]
        )  # (images, 3, H, W): one image, no splitting
        self._prompts: dict[str, list[int]] = {}
        self.eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        self.qa, self.short, self.long = [], [], []
        dummy = Image.new("RGB", (self.pixels.shape[-1],) * 2)
        self._dummy = dummy
        for k, r in enumerate(rows):
            for question, answer in r["qas"]:
                self.qa.append(
                    (
                        self._prompt(question, version),
                        self._answer(reasoning(r["shape"], r["colour"], answer, version)),
                        k,
                    )
                )
            self.short.append(
                (self._prompt(DESCRIBE_QUESTION, None), self._answer(f"a {r['colour']} {r['shape']}"), k)
            )
            self.long.append(
                (self._prompt(DESCRIBE_QUESTION, None), self._answer(describe(r["shape"], r["colour"])), k)
            )

    def _prompt(self, question: str, version: str | None) -> list[int]:
        if question not in self._prompts:
            text = chat_prompt(self.processor, question, version)
            self._prompts[question] = self.processor(text=text, images=[self._dummy])["input_ids"][0]
        return self._prompts[question]

    def _answer(self, text: str) -> list[int]:
        return self.processor.tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [self.eou]

    def batch(self, examples: list[tuple[list[int], list[int], int]], images=None):
        """input_ids, attention_mask, labels (answers only), pixel_values; `images` overrides the image indices."""
        import torch

        pad = self.processor.tokenizer.pad_token_id
        length = max(len(p) + len(a) for p, a, _ in examples)
        ids = torch.full((len(examples), length), pad)
        labels = torch.full((len(examples), length), -100)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, (p, a, _) in enumerate(examples):  # right padding
            n = len(p) + len(a)
            ids[i, :n] = torch.tensor(p + a)
            labels[i, len(p) : n] = torch.tensor(a)
            mask[i, :n] = 1
        index = torch.tensor([k for _, _, k in examples] if images is None else images)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": self.pixels[index].unsqueeze(1),
        }


def answer_loss(model, batch):
    """Mean cross-entropy of the answer tokens; the LM head runs on those positions only."""
    import torch

    labels = batch["labels"]
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
    ).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def train(model, processor, rows: list[dict], recipe: VlmRecipe, log=print) -> dict:
    """The seeded training loop; returns figures of the last steps."""
    import torch

    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    rng = random.Random(recipe.seed)
    data = _Batcher(processor, rows, recipe.prompt_version)
    vision = [p for n, p in model.named_parameters() if "vision_model" in n or "connector" in n]
    vision_ids = {id(p) for p in vision}
    text = [p for p in model.parameters() if id(p) not in vision_ids]
    optimizer = torch.optim.AdamW(
        [{"params": vision, "lr": recipe.vision_lr}, {"params": text, "lr": recipe.lr}],
        weight_decay=0.0,
        betas=(0.9, 0.98),
    )
    peaks = [recipe.vision_lr, recipe.lr]

    def factor(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    model.train()
    start, recent = time.monotonic(), []
    for step in range(recipe.steps):
        if step < recipe.describe_first:
            examples = rng.sample(data.short, recipe.batch_size)
        else:
            n_describe = sum(rng.random() < recipe.describe_share for _ in range(recipe.batch_size))
            examples = [rng.choice(rng.choice((data.short, data.long))) for _ in range(n_describe)]
            examples += [rng.choice(data.qa) for _ in range(recipe.batch_size - n_describe)]
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * factor(step)
        loss = answer_loss(model, data.batch(examples))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(loss.item())
        if (step + 1) % 25 == 0:
            with torch.no_grad():  # this batch with its images and with others': a model that sees loses more
                own = answer_loss(model, data.batch(examples)).item()
                other = answer_loss(
                    model, data.batch(examples, images=rng.sample(range(len(rows)), len(examples)))
                ).item()
            log(
                f"step {step + 1}: loss {sum(recent) / len(recent):.3f}; this batch now {own:.3f}, with other images"
                f" {other:.3f} ({time.monotonic() - start:.0f} s)"
            )
            recent = []
    model.eval()
    return {"seconds": time.monotonic() - start}


def question_type(question: str, answer: str) -> str:
    """shape, colour or yes/no, by the answer's kind."""
    return "shape" if answer in SHAPES else "colour" if answer in COLOURS else "yes/no"


def greedy_accuracy(
    model,
    processor,
    rows: list[dict],
    questions: int,
    seed: int = 0,
    version: str = "en",
    blank: bool = False,
    batch_size: int = 32,
) -> dict:
    """Greedy answers in transformers on `questions` random questions of `rows`, judged by our judge
    (format and VQA match); per question type. `blank`: a grey image instead of the true one."""
    import torch
    from PIL import Image

    from mpo_data.preference.judge import answers_match, extract_answer

    rng = random.Random(seed)
    picked = [(r, *rng.choice(r["qas"])) for r in rng.sample(rows, questions)]
    processor.tokenizer.padding_side = "left"
    right: dict[str, list[bool]] = {}
    for start in range(0, len(picked), batch_size):
        chunk = picked[start : start + batch_size]
        texts = [chat_prompt(processor, q, version) for _, q, _ in chunk]
        images = [
            [Image.new("RGB", (64, 64), (128, 128, 128)) if blank else Image.open(r["path"]).convert("RGB")]
            for r, _, _ in chunk
        ]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        for (r, q, a), ids in zip(chunk, out[:, inputs["input_ids"].shape[1] :]):
            extraction = extract_answer(processor.tokenizer.decode(ids, skip_special_tokens=True), version)
            ok = bool(extraction.format_ok and answers_match(extraction.answer, a, ("vqa",)))
            right.setdefault(question_type(q, a), []).append(ok)
            right.setdefault("all", []).append(ok)
    return {k: (round(sum(v) / len(v), 3), len(v)) for k, v in sorted(right.items())}


def engine_calibration(
    engine,
    rows: list[dict],
    questions: int,
    temperature: float,
    n: int,
    seed: int = 0,
    version: str = "en",
    top_k: int = 50,
) -> dict:
    """Through our vLLM engine, with the images: greedy accuracy per question type, and the share of items
    whose `n` samples at `temperature` get both a right and a wrong verdict from our judge."""
    from PIL import Image

    from mpo_data.preference.judge import answers_match, extract_answer
    from mpo_data.sampling.engine import GenerationRequest
    from mpo_data.sampling.stage_config import SamplingConfig

    rng = random.Random(seed)
    picked = [(r, *rng.choice(r["qas"])) for r in rng.sample(rows, questions)]
    requests = [
        GenerationRequest(
            [{"role": "user", "content": user_prompt(q, 1, version)}], [Image.open(r["path"]).convert("RGB")]
        )
        for r, q, _ in picked
    ]

    def verdicts(result, answer):
        out = []
        for c in result.completions:
            e = extract_answer(c.text, version)
            out.append(bool(e.format_ok and answers_match(e.answer, answer, ("vqa",))))
        return out

    greedy = engine.generate(requests, SamplingConfig(n=1, temperature=0.0, max_new_tokens=32))
    sampled = engine.generate(requests, SamplingConfig(n=n, temperature=temperature, top_k=top_k, max_new_tokens=32))
    right: dict[str, list[bool]] = {}
    both = []
    for (r, q, a), g, s in zip(picked, greedy, sampled):
        ok = verdicts(g, a)[0]
        right.setdefault(question_type(q, a), []).append(ok)
        right.setdefault("all", []).append(ok)
        v = verdicts(s, a)
        both.append(any(v) and not all(v))
    return {
        "greedy": {k: (round(sum(v) / len(v), 3), len(v)) for k, v in sorted(right.items())},
        "both_verdicts": round(sum(both) / len(both), 3),
        "items": len(both),
        "n": n,
        "temperature": temperature,
        "example": greedy[0].completions[0].text,
    }
