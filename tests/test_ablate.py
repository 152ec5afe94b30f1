"""`mpo-data ablate`: variant configs and the table (pure logic), then one tiny real ablation (TRL steps, vLLM,
judge) that is stopped and continued."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mpo_data.errors import InputError
from mpo_data.records.formats import MetaEntry, write_meta
from mpo_data.records.jsonl import write_jsonl
from mpo_data.stats import paired_difference_ci
from mpo_data.train import ablate
from mpo_data.train.config import load

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "training" / "configs" / "smollm2_lora_cpu.yaml"


@pytest.mark.parametrize(
    "variant, loss_type, weights, bco_delta",
    [
        ("sft", ["sft"], [1.0], False),
        ("dpo", ["sigmoid"], [1.0], False),
        ("rpo", ["sigmoid", "sft"], [1.0, 1.0], False),
        ("mpo", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], True),
        ("mpo_trl", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], False),
    ],
)
def test_each_variant_is_the_base_config_with_its_loss_mix(tmp_path, variant, loss_type, weights, bco_delta):
    config = load(CPU_CONFIG, ablate.variant_overrides(variant, 3, tmp_path))
    kwargs = config.dpo_kwargs(cuda=False)
    assert (kwargs["loss_type"], kwargs["loss_weights"], config.bco_delta) == (loss_type, weights, bco_delta)
    assert kwargs["seed"] == 3 and config.output_dir == str(tmp_path / f"{variant}-s3")
    assert config.eval.answers.questions is None  # the ablation answers each set itself
    base = load(CPU_CONFIG)
    assert (config.data, kwargs["max_steps"], kwargs["learning_rate"]) == (
        base.data,
        base.dpo["max_steps"],
        base.dpo["learning_rate"],
    )


def test_variant_names_are_checked_and_sft_comes_first():
    assert ablate.check(ablate.AblationConfig(config="c", variants=["mpo", "dpo", "sft", "mpo"])) == [
        "sft",
        "mpo",
        "dpo",
    ]
    with pytest.raises(InputError, match=r"unknown variant\(s\) ipo; known: sft, dpo, rpo, mpo, mpo_trl"):
        ablate.check(ablate.AblationConfig(config="c", variants=["ipo"]))


def _fake_run(
    folder: Path, question_set: str, correct: list[bool], chosen: tuple[float, float] = (-20.0, -20.0)
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        ablate.answers_path(folder, question_set), ({"question": str(i), "correct": c} for i, c in enumerate(correct))
    )
    (folder / "summary.json").write_text(json.dumps({"train_seconds": 12.0, "steps": 4}))
    (folder / "eval.json").write_text(
        json.dumps(
            {  # chosen: mean summed log-prob of chosen (before, after)
                "pairs": 8,
                "before": {"mean_chosen_logp": chosen[0], "mean_rejected_logp": -30.0},
                "after": {"mean_chosen_logp": chosen[1], "mean_rejected_logp": -40.0},
            }
        )
    )


def test_table_pairs_each_variant_with_sft_over_questions_and_seeds(tmp_path):
    q = "sets/held.jsonl"
    _fake_run(tmp_path / "base", q, [False, False, True, False])
    runs = {
        ("sft", 0): [True, False, True, False],
        ("sft", 1): [True, True, False, False],
        ("mpo", 0): [True, True, True, False],
        ("mpo", 1): [True, True, True, True],
    }
    chosen = {
        ("sft", 0): (-20.0, -15.0),
        ("sft", 1): (-20.0, -17.0),
        ("mpo", 0): (-20.0, -26.0),
        ("mpo", 1): (-20.0, -30.0),
    }
    for (variant, seed), correct in runs.items():
        _fake_run(tmp_path / f"{variant}-s{seed}", q, correct, chosen[variant, seed])
    result = ablate.table_data(tmp_path, ["sft", "mpo"], [0, 1], [q])
    held = result["sets"]["held"]
    assert (held["questions"], held["base"]) == (4, 0.25)
    mpo = held["variants"]["mpo"]
    assert mpo["accuracy"] == {"0": 0.75, "1": 1.0} and mpo["mean"] == 0.875 and mpo["diff_vs_sft"] == 0.375
    pooled_sft, pooled_mpo = runs["sft", 0] + runs["sft", 1], runs["mpo", 0] + runs["mpo", 1]
    assert mpo["diff_vs_sft_ci"] == pytest.approx(paired_difference_ci(pooled_sft, pooled_mpo), abs=1e-4)
    # chosen log-probs: sft raised them by 4 on average, mpo lowered them by 8 (likelihood displacement)
    assert (held["variants"]["sft"]["chosen_logp_change"], mpo["chosen_logp_change"], mpo["rejected_logp_change"]) == (
        4.0,
        -8.0,
        -10.0,
    )
    table = ablate.describe(result)
    assert re.search(
        r"\| held \| mpo \| 75\.0 \| 100\.0 \| 87\.5 \| \+37\.5 \[.*\] \| -8\.0 / -10\.0 \| 4, 12 \|", table
    )
    assert "| held (4) | base |" in table


@pytest.mark.train
@pytest.mark.engine
def test_tiny_ablation_trains_answers_and_continues_after_a_stop(models_dir, tmp_path, monkeypatch):
    """Real: 1 LoRA step per run on SmolLM2 (sft and mpo, one seed), vLLM answers, our judge; then the same
    command again after one run's answers were lost trains nothing and answers only that run's set."""
    from mpo_data import cli
    from mpo_data.train import recipe

    questions = tmp_path / "held.jsonl"
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in ((2, 3), (4, 1))]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [
        {
            "question": f"What is {a} + {b}?",
            "chosen": f"{a} + {b} = {a + b}.\nFinal answer: {a + b}",
            "rejected": f"{a} + {b} = {a + b + 1}.\nFinal answer: {a + b + 1}",
        }
        for a, b in ((1, 2), (3, 3), (5, 1), (2, 6), (4, 4), (7, 1))
    ]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    write_meta(
        tmp_path / "meta.json", {"sums": MetaEntry(str(tmp_path), str(tmp_path / "pairs.jsonl"), 1.0, len(pairs))}
    )
    out = tmp_path / "ablate"
    argv = [
        "ablate",
        "--config",
        str(CPU_CONFIG),
        "--out",
        str(out),
        "--variants",
        "mpo",
        "--seeds",
        "0",
        "--questions",
        str(questions),
        f"data.meta={tmp_path / 'meta.json'}",
        "data.eval_size=2",
        "dpo.max_steps=1",
        "eval.pairs=2",
        "eval.generations=0",
        "eval.answers.max_new_tokens=48",
        "data.max_train_pairs=4",
        'dpo.eval_strategy="no"',
    ]
    assert cli.main(argv) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert list(result["sets"]["held"]["variants"]) == ["sft", "mpo"]
    for run in ("base", "sft-s0", "mpo-s0"):
        lines = (out / run / "answers_held.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all(isinstance(json.loads(line)["correct"], bool) for line in lines)
    assert json.loads((out / "mpo-s0" / "summary.json").read_text())["bco_delta"] is not None
    assert json.loads((out / "sft-s0" / "summary.json").read_text())["bco_delta"] is None

    (out / "mpo-s0" / "answers_held.jsonl").unlink()  # stopped while answering
    monkeypatch.setattr(recipe, "train", lambda config: pytest.fail(f"trained {config.output_dir} again"))
    assert cli.main(argv) == 0
    assert (out / "mpo-s0" / "answers_held.jsonl").is_file()
    assert json.loads((out / "ablation.json").read_text())["sets"] == result["sets"]  # greedy: the same answers
