"""Preference evaluation (mpo_data/train/preference_eval.py): batched log-probs and metrics, completion masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpo_data.train import preference_eval
from mpo_data.train.data import PairLoader

ROOT = Path(__file__).resolve().parents[1]
TINY_VLM = ROOT / "models" / "tiny-smolvlm"
CONFIG = ROOT / "training" / "configs" / "tiny_vlm_full_cpu.yaml"

pytestmark = pytest.mark.usefixtures("torch_threads")


def hand_logp(model, processor, row) -> tuple[float, float]:
    """Summed completion log-probs, one pair at a time, token by token, without TRL or padding."""
    tok = processor.tokenizer
    prompt = processor.apply_chat_template(row["prompt"], add_generation_prompt=True)
    out = []
    for key in ("chosen", "rejected"):
        full = processor.apply_chat_template(row["prompt"] + row[key])
        completion = full[len(prompt) :]
        inputs = processor(text=[prompt], images=row["images"] or None, return_tensors="pt", add_special_tokens=False)
        ids = tok(completion, add_special_tokens=False, return_tensors="pt")["input_ids"]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        n_prompt = inputs["input_ids"].shape[1] - ids.shape[1]
        total = 0.0
        for t in range(ids.shape[1]):
            total += torch.log_softmax(logits[n_prompt + t - 1], dim=-1)[ids[0, t]].item()
        out.append(total)
    return out[0], out[1]


def test_batched_logps_match_hand_computation_and_metrics(pairs):
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(TINY_VLM)
    processor.tokenizer.padding_side = "left"
    model = Idefics3ForConditionalGeneration.from_pretrained(TINY_VLM, dtype=torch.float32).eval()
    rows = PairLoader().read_meta(pairs / "meta.json", seed=0).rows
    batch = [rows[2], rows[4], rows[5]]  # two images, one image with a long rejected, text-only: padding everywhere
    chosen, rejected = preference_eval.completion_logps(model, preference_eval.collate(batch, processor))
    for i, row in enumerate(batch):
        c, r = hand_logp(model, processor, row)
        assert chosen[i].item() == pytest.approx(c, abs=1e-3)
        assert rejected[i].item() == pytest.approx(r, abs=1e-3)

    s = preference_eval.Scores(
        policy_chosen=[-1.0, -5.0, -2.0],
        policy_rejected=[-2.0, -4.0, -2.0],
        ref_chosen=[-3.0, -4.0, -2.5],
        ref_rejected=[-2.0, -4.0, -2.0],
    )
    m = preference_eval.preference_metrics(s, beta=0.1)
    # before margins: -1, 0, -0.5 ; after: 1, -1, 0 ; rewards 0.1*(2, -1, 0.5)
    assert m["before"] == {
        "logp_accuracy": 0.0,
        "mean_logp_margin": pytest.approx(-0.5),
        "reward_accuracy": 0.0,
        "mean_reward_margin": 0.0,
        "mean_chosen_logp": pytest.approx(-9.5 / 3),
        "mean_rejected_logp": pytest.approx(-8 / 3),
    }
    assert (m["after"]["mean_chosen_logp"], m["after"]["mean_rejected_logp"]) == (
        pytest.approx(-8 / 3),
        pytest.approx(-8 / 3),
    )
    assert m["after"]["logp_accuracy"] == pytest.approx(1 / 3)
    assert m["after"]["reward_accuracy"] == pytest.approx(2 / 3)
    assert m["after"]["mean_reward_margin"] == pytest.approx(0.05)


def test_text_model_batches_mask_exactly_the_completions(pairs):
    from mpo_data.train.recipe import load_processing_class

    tokenizer = load_processing_class(str(ROOT / "models" / "smollm2-135m-instruct"))
    rows = PairLoader(text_only=True, on_error="skip").read_meta(pairs / "meta.json", seed=0).rows
    batch = preference_eval.collate(rows, tokenizer)
    n = len(rows)
    for i, row in enumerate(rows):
        for half, key in ((0, "chosen"), (n, "rejected")):
            ids = batch["input_ids"][half + i][batch["completion_mask"][half + i].bool()]
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            assert text == row[key][0]["content"]
