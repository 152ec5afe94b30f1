"""Description hallucination rate on held-out images, before vs after training a VLM.

Both models describe every held-out image *with* the image (greedy, the bare description question the
DropoutNTP pairs were made from), and the shape/colour rule of mpo_data/preference/hallucination.py scores
each description against the image's truth (read from the prompt's faithful `chosen`): faithful,
hallucination (names another shape or colour) or no claim. The rate is over all images (a description
that claims nothing does not hallucinate; the rate among descriptions that claim something is in
`before_claims` / `after_claims`), with Wilson intervals; the same images are described by both models, so
the difference is paired (Newcombe's interval, as for answer accuracy), and `gained` / `lost` count the
images hallucinated only after / only before training.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from mpo_data.errors import InputError
from mpo_data.preference import hallucination
from mpo_data.train.config import DescriptionEvalArgs


def read_prompts(path: str | Path, limit: int | None) -> list:
    """The held-out description items; each `chosen` must name one shape and one colour (the truth)."""
    from mpo_data.records.inputs import PromptReader

    items = list(PromptReader(path, "dropout-ntp", Path(path).stem))[:limit]
    if not items:
        raise InputError(f"{path}: no description prompts to evaluate on")
    for item in items:
        if hallucination.truth(item.chosen) is None:
            raise InputError(f"{item.source}: `chosen` does not name exactly one shape and one colour")
    return items


def describe_images(engine, items: list, args: DescriptionEvalArgs, image_root: str | Path) -> list[str]:
    """One greedy description per item from a running `Engine`, the image in the prompt."""
    from mpo_data.sampling.sample import item_request
    from mpo_data.sampling.stage_config import SamplingConfig

    requests = [item_request(item, image_root) for item in items]
    sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens)
    return [result.completions[0].text for result in engine.generate(requests, sampling)]


def verdicts(items: list, texts: list[str]) -> list[str]:
    """faithful / hallucination / no_claim per description."""
    return [hallucination.verdict(text, *hallucination.truth(item.chosen)) for item, text in zip(items, texts)]


def summarize(before: list[str], after: list[str]) -> dict[str, Any]:
    """The `hallucination` body of eval.json from per-image verdicts (same images, same order)."""
    from mpo_data.train.answer_accuracy import summarize as paired

    flags = {name: [v == "hallucination" for v in vs] for name, vs in (("before", before), ("after", after))}
    body = paired(flags["before"], flags["after"])
    return {
        "images": body.pop("questions"),
        **body,
        "before_claims": hallucination.rate(Counter(before)),
        "after_claims": hallucination.rate(Counter(after)),
    }


def describe(summary: dict[str, Any]) -> str:
    """Three lines for people, as answer accuracy's."""
    from mpo_data.train.answer_accuracy import paired_lines

    return paired_lines(
        summary,
        f"description hallucination rate on {summary['images']} held-out images (with the image):",
        "images newly hallucinated",
        "no longer",
    )
