"""Evaluation of an MPO run: preference accuracy on held-out pairs and answers, before vs after training.

"Before" is the reference model (the base weights; for an adapter, the model with the adapter switched off),
"after" is the trained policy. Per pair we sum the log-probabilities of the chosen and the rejected answer
under both. A model prefers chosen when logp(chosen) > logp(rejected); the trained policy also gets DPO's
implicit reward, beta * (log-ratio to the reference), and its accuracy: margin > 0, as TRL's
`rewards/accuracies`. Before training that margin is 0 for every pair by definition.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import ProcessorMixin
from trl.data_utils import apply_chat_template
from trl.trainer.dpo_trainer import DataCollatorForPreference, DataCollatorForVisionPreference

from mpo_data.records.jsonl import atomic_write_bytes


def collate(rows: list[dict[str, Any]], processing_class) -> dict[str, torch.Tensor]:
    """A TRL preference batch (chosen rows first, then rejected), built by TRL's own collators."""
    if isinstance(processing_class, ProcessorMixin):
        return DataCollatorForVisionPreference(processor=processing_class)([dict(r) for r in rows])
    tokenizer = processing_class
    examples = []
    for row in rows:
        text = apply_chat_template({k: row[k] for k in ("prompt", "chosen", "rejected")}, tokenizer)
        ids = {k: tokenizer(text[k], add_special_tokens=False)["input_ids"] for k in ("prompt", "chosen", "rejected")}
        examples.append({"prompt_ids": ids["prompt"], "chosen_ids": ids["chosen"], "rejected_ids": ids["rejected"]})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForPreference(pad_token_id=pad)(examples)


def pair_length(row: dict[str, Any], processing_class) -> int:
    """Tokens of the longer of prompt+chosen and prompt+rejected, image tokens included."""
    batch = collate([row], processing_class)
    return int(batch["attention_mask"].sum(dim=1).max())


@torch.no_grad()
def completion_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and of the rejected completions (float32), one value per pair."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "completion_mask"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:].to(device)
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logps = (token_logps * batch["completion_mask"][:, 1:].to(device)).sum(dim=1).cpu()
    return logps.chunk(2)


@dataclass
class Scores:
    """Per-pair summed log-probs under the policy and the reference."""

    policy_chosen: list[float]
    policy_rejected: list[float]
    ref_chosen: list[float]
    ref_rejected: list[float]


def preference_metrics(s: Scores, beta: float) -> dict[str, dict[str, float]]:
    """Accuracy and mean margins, before (reference) and after (policy), and the mean summed log-prob of chosen
    and of rejected: after minus before says whether training raised or lowered each (likelihood displacement:
    chosen falls too)."""
    n = len(s.policy_chosen)
    before = [c - r for c, r in zip(s.ref_chosen, s.ref_rejected)]
    after = [c - r for c, r in zip(s.policy_chosen, s.policy_rejected)]
    rewards = [beta * (a - b) for a, b in zip(after, before)]
    return {
        "before": {
            "logp_accuracy": sum(m > 0 for m in before) / n,
            "mean_logp_margin": sum(before) / n,
            "reward_accuracy": 0.0,
            "mean_reward_margin": 0.0,
            "mean_chosen_logp": sum(s.ref_chosen) / n,
            "mean_rejected_logp": sum(s.ref_rejected) / n,
        },
        "after": {
            "logp_accuracy": sum(m > 0 for m in after) / n,
            "mean_logp_margin": sum(after) / n,
            "reward_accuracy": sum(r > 0 for r in rewards) / n,
            "mean_reward_margin": sum(rewards) / n,
            "mean_chosen_logp": sum(s.policy_chosen) / n,
            "mean_rejected_logp": sum(s.policy_rejected) / n,
        },
    }


def reference_of(policy, reference=None):
    """A context in which `policy` computes as the reference: the adapter off, or the separate ref model."""
    if reference is not None:
        return contextlib.nullcontext(reference)
    if hasattr(policy, "disable_adapter"):
        return _adapter_off(policy)
    raise ValueError("a fully fine-tuned policy needs its reference model")


@contextlib.contextmanager
def _adapter_off(policy) -> Iterator[Any]:
    with policy.disable_adapter():
        yield policy


def score(policy, reference, rows: list[dict], processing_class, batch_size: int) -> Scores:
    """Log-probs of every held-out pair under the policy and under the reference."""
    out: list[list[float]] = [[], [], [], []]
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], processing_class)
        for i, tensor in enumerate(completion_logps(policy, batch)):
            out[i] += tensor.tolist()
        with reference_of(policy, reference) as ref:
            for i, tensor in enumerate(completion_logps(ref, batch)):
                out[2 + i] += tensor.tolist()
    return Scores(*out)


@torch.no_grad()
def greedy_answer(model, processing_class, row: dict[str, Any], max_new_tokens: int) -> str:
    """Greedy answer to one held-out prompt (cookbook section 4)."""
    device = next(model.parameters()).device
    if isinstance(processing_class, ProcessorMixin):
        text = processing_class.apply_chat_template(row["prompt"], add_generation_prompt=True)
        inputs = processing_class(text=[text], images=row.get("images") or None, return_tensors="pt")
        tokenizer = processing_class.tokenizer
    else:
        tokenizer = processing_class
        inputs = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    inputs = {k: v.to(device) for k, v in inputs.items()}
    was_training = model.training
    model.eval()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def prompt_text(row: dict[str, Any]) -> str:
    content = row["prompt"][-1]["content"]
    return content if isinstance(content, str) else " ".join(p.get("text") or "<image>" for p in content)


def evaluate_preferences(
    policy, reference, processing_class, rows: list[dict], beta: float, eval_args
) -> dict[str, Any]:
    """The eval.json body: preference metrics and before/after generations on held-out rows."""
    scored = rows[: eval_args.pairs]
    result: dict[str, Any] = {"pairs": len(scored), "beta": beta}
    if scored:
        s = score(policy, reference, scored, processing_class, eval_args.batch_size)
        result.update(preference_metrics(s, beta))
        result["per_pair"] = [
            {"policy_chosen": pc, "policy_rejected": pr, "ref_chosen": rc, "ref_rejected": rr}
            for pc, pr, rc, rr in zip(s.policy_chosen, s.policy_rejected, s.ref_chosen, s.ref_rejected)
        ]
    generations = []
    for row in rows[: eval_args.generations]:
        with reference_of(policy, reference) as ref:
            before = greedy_answer(ref, processing_class, row, eval_args.max_new_tokens)
        after = greedy_answer(policy, processing_class, row, eval_args.max_new_tokens)
        generations.append(
            {
                "prompt": prompt_text(row),
                "chosen": prompt_text({"prompt": row["chosen"]}),
                "before": before,
                "after": after,
            }
        )
    result["generations"] = generations
    return result


def write(path: str | Path, result: dict[str, Any]) -> Path:
    path = Path(path)
    atomic_write_bytes(path, json.dumps(result, indent=2, ensure_ascii=False).encode() + b"\n")
    return path
