"""The DropoutNTP stage strategy: a request continues a prefix of `chosen` without the image (or with it);
the continuation becomes `rejected`, or a counted drop."""

from __future__ import annotations

import re
from typing import Any

from mpo_data.records.formats import strip_placeholders
from mpo_data.sampling.engine import Completion, GenerationRequest
from mpo_data.sampling.stage_config import DropoutNTPConfig


def collapse_whitespace(text: str) -> str:
    """Whitespace-insensitive form of a text, for comparing continuations."""
    return " ".join(text.split())


def cut_prefix(chosen: str, start_ratio: float) -> tuple[str, str]:
    """(prefix, rest) with prefix + rest == chosen: the cut falls after the first int(words x ratio) words,
    so the prefix is chosen's own text byte for byte (newlines, list markup, double spaces kept) and ends
    on a word, and the rest starts with the whitespace that followed it."""
    ends = [m.end() for m in re.finditer(r"\S+", chosen)]
    keep = int(len(ends) * start_ratio)
    cut = ends[keep - 1] if keep else 0
    return chosen[:cut], chosen[cut:]


def join_continuation(prefix: str, continuation: str) -> str:
    """`rejected` text. The prefix ends on a word with no trailing space (a trailing space would make the
    model start on a lone-space token), so the continuation carries its own leading space, as decoded."""
    return prefix + continuation if prefix else continuation.lstrip()


def drop_reason(completion: Completion, rest: str) -> str | None:
    """Why a DropoutNTP continuation makes no usable `rejected`, or None if it does."""
    if not completion.text.strip():
        return "empty"
    if completion.finish_reason in ("length", "context"):  # cut at max_new_tokens or by a full context
        return "max_tokens"
    if collapse_whitespace(completion.text) == collapse_whitespace(rest):
        return "same_as_chosen"
    return None


class DropoutNTPStage:
    """Requests continue a prefix of `chosen`; continuations become `rejected` or counted drops."""

    def __init__(self, config: DropoutNTPConfig):
        self.config = config
        self.wants_images = config.load_image
        self.provenance = {
            "model": config.model_name,
            "stage": config.stage,
            "start_ratio": config.start_ratio,
            "load_image": config.load_image,
            "sampling": config.sampling_config().as_dict(),
        }

    def request(self, item: dict[str, Any], pil: list) -> GenerationRequest:
        prefix, _ = cut_prefix(item["chosen"], self.config.start_ratio)
        # without the image its placeholders go too: a VLM tokenizer reads `<image>` as an image token
        question = item["question"] if self.config.load_image else strip_placeholders(item["question"])
        # an empty prefix is a plain answer: continuing an empty assistant turn is template-dependent
        return GenerationRequest([{"role": "user", "content": question}], pil, prefix or None)

    def outcome(
        self, item: dict[str, Any], key: dict[str, Any], completion: Completion, prompt_tokens: int
    ) -> tuple[dict, str | None]:
        prefix, rest = cut_prefix(item["chosen"], self.config.start_ratio)
        reason = drop_reason(completion, rest)
        if reason:
            return {
                **key,
                "reason": reason,
                "finish_reason": completion.finish_reason,
                "text": completion.text,
            }, reason
        line = {
            **item,
            **key,
            "rejected": join_continuation(prefix, completion.text),
            "finish_reason": completion.finish_reason,
            "output_tokens": completion.output_tokens,
            "provenance": self.provenance,
        }
        return line, None
