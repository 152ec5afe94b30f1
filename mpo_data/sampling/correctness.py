"""The correctness stage strategy: a request asks the templated question with the images; every sample is
kept (the judge decides in `mpo-data pairs`)."""

from __future__ import annotations

from typing import Any

from mpo_data.records.formats import Sample, image_list
from mpo_data.sampling.engine import Completion, GenerationRequest
from mpo_data.sampling.prompts import user_prompt
from mpo_data.sampling.stage_config import CorrectnessConfig


class CorrectnessStage:
    """Requests ask the templated question with the images; every sample is kept (the judge decides)."""

    def __init__(self, config: CorrectnessConfig):
        self.config = config
        self.wants_images = True
        self.sampling = config.sampling_config().as_dict()

    def user_text(self, item: dict[str, Any]) -> str:
        """The user turn exactly as sampled (stored in each sample as `prompt`)."""
        return user_prompt(item["question"], len(image_list(item.get("image"))), self.config.prompt_version)

    def request(self, item: dict[str, Any], pil: list) -> GenerationRequest:
        return GenerationRequest([{"role": "user", "content": self.user_text(item)}], pil)

    def outcome(
        self, item: dict[str, Any], key: dict[str, Any], completion: Completion, prompt_tokens: int
    ) -> tuple[dict, str | None]:
        sample = Sample(
            item_id=key["item_id"],
            sample_index=key["sample_index"],
            item=item,
            prompt=self.user_text(item),
            response=completion.text,
            finish_reason=completion.finish_reason,
            prompt_tokens=prompt_tokens,
            output_tokens=completion.output_tokens,
            prompt_version=self.config.prompt_version,
            model=self.config.model_name,
            sampling=self.sampling,
            max_num=key.get("max_num"),
        )
        return sample.to_dict(), None
