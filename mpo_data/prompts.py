"""Chain-of-thought prompt templates of the correctness stage, one per `prompt_version`.

The judge enforces the answer format that each template asks for, so the two must change together.
"""

from __future__ import annotations

from mpo_data.formats import with_placeholders

PROMPT_TEMPLATES: dict[str, str] = {
    # a last line "Final answer: ..."
    "en": (
        "Answer the question below. Reason step by step first, then give your answer on the last line "
        'in the form "Final answer: <answer>".\n\nQuestion:\n{question}'
    ),
    # the answer in a final \boxed{}
    "en_v2": (
        "Answer the question below. Reason step by step first, then put your final answer in "
        "\\boxed{{}} at the end of your response.\n\nQuestion:\n{question}"
    ),
    # one <think>...</think> block, then the boxed answer
    "r1": (
        "Answer the question below. First think it through inside one <think> </think> block, then, "
        "after the block, give your final answer in \\boxed{{}}.\n\nQuestion:\n{question}"
    ),
}

DEFAULT_PROMPT_VERSION = "en_v2"


def render(question: str, prompt_version: str = DEFAULT_PROMPT_VERSION) -> str:
    """The user turn for `question` under `prompt_version` (a KeyError names the valid versions)."""
    try:
        template = PROMPT_TEMPLATES[prompt_version]
    except KeyError:
        raise KeyError(f"unknown prompt version {prompt_version!r}; expected one of {sorted(PROMPT_TEMPLATES)}") from None
    return template.format(question=question)


def user_prompt(question: str, n_images: int, prompt_version: str = DEFAULT_PROMPT_VERSION) -> str:
    """The exact user text of a correctness request: the templated question with InternVL's image
    placeholders (`<image>\\n` in front for one image, one per image for several). Pair lines store it as
    `question`, so training pairs the answer with the prompt that produced it."""
    return with_placeholders(render(question, prompt_version), n_images)
