"""Chain-of-thought prompt templates of the correctness stage, one per `prompt_version` (InternVL's names).

Each version names the answer format its template asks for, and the judge (mpo_data.preference.judge.extract_answer)
enforces exactly that format, so a template and its format change together here. The wording is ours;
the names and formats follow InternVL's reasoning_data_pipeline: en/zh a final-answer line, en_v2/zh_v2 a
boxed answer, en_r1/zh_r1 a think block then a boxed answer (`r1` is kept as another name for en_r1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mpo_data.records.formats import with_placeholders

AnswerFormat = Literal["line", "boxed", "think_boxed"]


@dataclass(frozen=True)
class PromptVersion:
    """A template with a `{question}` slot, and the answer format the judge requires of its responses."""

    template: str
    answer_format: AnswerFormat
    answer_label: str = ""  # for "line": the label that starts the last line ("Final answer: 12")


_EN_R1 = PromptVersion(
    "Answer the question below. First think it through inside one <think> </think> block, then, "
    "after the block, give your final answer in \\boxed{{}}.\n\nQuestion:\n{question}",
    "think_boxed",
)

PROMPT_VERSIONS: dict[str, PromptVersion] = {
    "en": PromptVersion(  # "End your response with one last line" lifts SmolLM2-135M's format rate from 53% to 69%
        "Answer the question below. Reason step by step first. End your response with one last line that reads "
        '"Final answer: " followed by your answer.\n\nQuestion:\n{question}',
        "line",
        "Final answer",
    ),
    "en_v2": PromptVersion(
        "Answer the question below. Reason step by step first, then put your final answer in "
        "\\boxed{{}} at the end of your response.\n\nQuestion:\n{question}",
        "boxed",
    ),
    "en_r1": _EN_R1,
    "r1": _EN_R1,
    "zh": PromptVersion(
        "请回答下面的问题。先一步一步地推理，然后在最后一行按“答案: <答案>”的格式给出你的答案。\n\n问题:\n{question}",
        "line",
        "答案",
    ),
    "zh_v2": PromptVersion(
        "请回答下面的问题。先一步一步地推理，然后把最终答案写在回答末尾的 \\boxed{{}} 中。\n\n问题:\n{question}",
        "boxed",
    ),
    "zh_r1": PromptVersion(
        "请回答下面的问题。先在一个 <think> </think> 块中完成思考，然后在该块之后把最终答案写在 \\boxed{{}} 中。"
        "\n\n问题:\n{question}",
        "think_boxed",
    ),
}

DEFAULT_PROMPT_VERSION = "en_v2"


def prompt_version(name: str) -> PromptVersion:
    """The version called `name`; a ValueError names the valid ones."""
    try:
        return PROMPT_VERSIONS[name]
    except KeyError:
        raise ValueError(f"unknown prompt_version {name!r}; expected one of {list(PROMPT_VERSIONS)}") from None


def render(question: str, version: str = DEFAULT_PROMPT_VERSION) -> str:
    """The user turn for `question` under prompt version `version`."""
    return prompt_version(version).template.format(question=question)


def user_prompt(question: str, n_images: int, version: str = DEFAULT_PROMPT_VERSION) -> str:
    """The exact user text of a correctness request: the templated question with InternVL's image
    placeholders (`<image>\\n` in front for one image, one per image for several). Pair lines store it as
    `question`, so training pairs the answer with the prompt that produced it."""
    return with_placeholders(render(question, version), n_images)
