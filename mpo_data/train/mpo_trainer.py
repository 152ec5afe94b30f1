"""The MPO paper's quality loss in TRL's DPOTrainer: `bco_pair` with the reward shift delta.

The paper's quality loss is BCO's: -log sigmoid(beta*r_c - delta) - log sigmoid(-(beta*r_r - delta)), where
r = log pi(y|x) - log pi_ref(y|x) and delta is a running mean of the rewards over training. TRL 1.16's
`bco_pair` drops delta (it is the formula with delta = 0). `MPOTrainer` keeps TRL for everything else (the
forward passes, the sigmoid and sft terms, every metric) and computes only the `bco_pair` term itself, with
delta as InternVL's trainer (trl 0.10's `RunningMoments`) and ms-swift's MPO keep it: each training batch
first adds the mean of its chosen and rejected rewards to the running mean (one value per batch and
process), then delta is that mean. Evaluation batches use delta as it stands and do not move it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from trl import DPOTrainer

from mpo_data.errors import InputError

QUALITY = "bco_pair"


def bco_pair_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, delta: float) -> torch.Tensor:
    """Per-pair BCO quality loss: rewards are beta * (policy - reference) summed completion log-probs."""
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))


@dataclass
class RunningMean:
    """The mean of every value added so far (trl 0.10's RunningMoments.mean, which InternVL uses)."""

    mean: float = 0.0
    count: int = 0

    def update(self, values: torch.Tensor) -> float:
        n = values.numel()
        self.mean += (values.float().mean().item() - self.mean) * n / (self.count + n)
        self.count += n
        return self.mean


@contextlib.contextmanager
def captured_log_probs(modules: list[torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Per-token log-probs of every forward of `modules`, in call order (TRL's fused-head outputs)."""
    seen: list[torch.Tensor] = []

    def keep(_module, _args, out):
        if getattr(out, "log_probs", None) is not None:  # not the logits-only forward of return_outputs
            seen.append(out.log_probs)

    handles = [m.register_forward_hook(keep) for m in modules]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class MPOTrainer(DPOTrainer):
    """DPOTrainer whose `bco_pair` subtracts delta (`bco_delta=True`, the default); with False it is TRL's own."""

    def __init__(self, *args, bco_delta: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.delta = RunningMean()
        self.quality_weight: float | None = None
        if bco_delta and QUALITY in self.loss_types:
            if self.ld_alpha is not None or self.f_divergence_type != "reverse_kl" or self.use_weighting:
                raise InputError(
                    "dpo: bco_pair with bco_delta (the paper's reward shift) takes plain summed log-probs: "
                    "unset ld_alpha, f_divergence_type and use_weighting, or set bco_delta: false"
                )
            i = self.loss_types.index(QUALITY)
            self.quality_weight = self.loss_weights[i]
            # TRL computes the other terms; this class adds the quality term
            self.loss_types = self.loss_types[:i] + self.loss_types[i + 1 :]
            self.loss_weights = self.loss_weights[:i] + self.loss_weights[i + 1 :]

    def _scored_modules(self) -> list[torch.nn.Module]:
        """The modules whose forwards TRL runs in `_compute_loss`: the policy first, then the reference
        (the same PEFT model with the adapter off, or the separate reference model)."""
        modules = [self.accelerator.unwrap_model(self.model)]
        if self.ref_model is not None and not self.precompute_ref_logps:
            modules.append(self.accelerator.unwrap_model(self.ref_model))
        return modules

    def _compute_loss(self, model, inputs, return_outputs):
        if self.quality_weight is None:
            return super()._compute_loss(model, inputs, return_outputs)
        with captured_log_probs(self._scored_modules()) as seen:
            result = super()._compute_loss(model, inputs, return_outputs)
        if len(seen) != 1 + (not self.precompute_ref_logps):
            raise RuntimeError(f"expected the policy and reference forwards of TRL's DPOTrainer, saw {len(seen)}")
        n_tokens = inputs["completion_mask"].size(1) - 1
        policy_logps = seen[0][:, -n_tokens:].sum(dim=1)
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            ref_logps = seen[1][:, -n_tokens:].sum(dim=1).detach()
        chosen_rewards, rejected_rewards = (self.beta * (policy_logps - ref_logps)).chunk(2)
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            batch_mean = torch.cat([chosen_rewards, rejected_rewards]).mean().detach().reshape(1)
            self.delta.update(self.accelerator.gather(batch_mean))
        quality = bco_pair_loss(chosen_rewards, rejected_rewards, self.delta.mean).mean()
        self._metrics[mode]["bco_pair/delta"].append(self.delta.mean)
        self._metrics[mode]["bco_pair/loss"].append(self.accelerator.gather(quality.detach()).mean().item())
        quality = quality * self.quality_weight
        if return_outputs:
            return result[0] + quality, result[1]
        return result + quality
