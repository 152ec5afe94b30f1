"""MPOTrainer (mpo_data/train/mpo_trainer.py): the paper's bco_pair with delta, and the loss against a hand formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpo_data.train import preference_eval
from mpo_data.train.config import load
from mpo_data.train.data import PairLoader

ROOT = Path(__file__).resolve().parents[1]
TINY_VLM = ROOT / "models" / "tiny-smolvlm"
CONFIG = ROOT / "training" / "configs" / "tiny_vlm_full_cpu.yaml"

pytestmark = pytest.mark.usefixtures("torch_threads")


def test_bco_pair_with_delta_is_the_papers_formula_on_known_rewards():
    import math

    from mpo_data.train.mpo_trainer import RunningMean, bco_pair_loss

    chosen, rejected = torch.tensor([0.3, -0.1]), torch.tensor([-0.2, 0.5])
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  (-log sigmoid(z) = softplus(-z))
    expected = [softplus(-(0.3 - 0.05)) + softplus(-0.2 - 0.05), softplus(-(-0.1 - 0.05)) + softplus(0.5 - 0.05)]
    assert bco_pair_loss(chosen, rejected, 0.05).tolist() == pytest.approx(expected, abs=1e-6)
    assert bco_pair_loss(chosen, rejected, 0.0).tolist() != pytest.approx(expected, abs=1e-3)  # delta matters
    running = RunningMean()
    assert running.update(torch.tensor([0.1])) == pytest.approx(0.1)
    assert running.update(torch.tensor([0.3, 0.5])) == pytest.approx(0.3)  # mean of every value so far
    assert running.count == 3


def _hand_mpo_loss(policy, reference, batch, beta: float, weights: tuple[float, float, float], delta: float):
    """(sigmoid + bco_pair shifted by delta + sft, the batch's mean reward), written out from both models' logits."""
    import torch.nn.functional as F

    def token_logps(model):
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
            logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        per_token = torch.log_softmax(logits, dim=-1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
        return per_token * batch["completion_mask"][:, 1:]

    mask = batch["completion_mask"][:, 1:]
    pol, ref = token_logps(policy), token_logps(reference)
    pc, pr = pol.sum(1).chunk(2)
    rc, rr = ref.sum(1).chunk(2)
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    sigmoid = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    bco = (-F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))).mean()
    n = len(pc)
    sft = -pol[:n].sum() / mask[:n].sum()  # TRL's sft: the mean over every chosen token of the batch
    return (weights[0] * sigmoid + weights[1] * bco + weights[2] * sft).item(), torch.cat(
        [chosen_rewards, rejected_rewards]
    ).mean().item()


@pytest.mark.train
def test_mpo_trainer_loss_matches_the_hand_formula_on_fixed_batches(pairs, tmp_path):
    """The real trainer on the tiny SmolVLM (image and text rows): TRL's sigmoid and sft terms plus our bco_pair,
    delta the running mean of the batch rewards; bco_delta=false is TRL's bco_pair (delta 0)."""
    from mpo_data.train.mpo_trainer import MPOTrainer
    from mpo_data.train.recipe import dpo_config, load_processing_class, to_dataset

    config = load(CONFIG, [f"data.meta={pairs / 'meta.json'}", f"output_dir={tmp_path / 'run'}"])
    processor = load_processing_class(str(TINY_VLM))
    rows = PairLoader().read_meta(pairs / "meta.json", seed=0).rows
    batches = [
        preference_eval.collate([rows[2], rows[5]], processor),
        preference_eval.collate([rows[4], rows[0]], processor),
    ]
    losses = {}
    for bco_delta in (True, False):
        torch.manual_seed(0)
        trainer = MPOTrainer(
            model=str(TINY_VLM),
            args=dpo_config(config, cuda=False),
            train_dataset=to_dataset(rows),
            processing_class=processor,
            bco_delta=bco_delta,
        )
        with torch.no_grad():  # move the policy off the reference, so that the rewards are not all 0
            for p in trainer.model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        trainer.model.train()
        means, got, want = [], [], []
        for batch in batches:
            got.append(trainer.compute_loss(trainer.model, batch).item())
            _, mean = _hand_mpo_loss(trainer.model, trainer.ref_model, batch, 0.1, (0.8, 0.2, 1.0), 0.0)
            means.append(mean)
            delta = sum(means) / len(means) if bco_delta else 0.0  # updated with this batch, then used
            want.append(_hand_mpo_loss(trainer.model, trainer.ref_model, batch, 0.1, (0.8, 0.2, 1.0), delta)[0])
        assert got == pytest.approx(want, abs=1e-4)
        losses[bco_delta] = got
        if bco_delta:
            assert trainer.delta.count == 2 and trainer.delta.mean == pytest.approx(sum(means) / 2, abs=1e-5)
            assert (
                abs(trainer.delta.mean) > 1e-3
                and trainer._metrics["train"]["bco_pair/delta"][-1] == trainer.delta.mean
            )
        else:
            assert trainer.quality_weight is None and trainer.loss_types == ["sigmoid", "bco_pair", "sft"]
    assert losses[True][1] != pytest.approx(losses[False][1], abs=1e-5)
