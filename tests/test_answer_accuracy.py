"""Answer accuracy before/after training: the summary (pure logic), the held-out split, and one real run
(real LoRA adapter merged, real vLLM engine, real judge) on a handful of questions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mpo_data.errors import InputError
from mpo_data.train import answer_accuracy as aa
from mpo_data.train.config import EvalArgs, load_run_config

ROOT = Path(__file__).resolve().parents[1]
DEMO_PIPELINE, DEMO_TRAIN = ROOT / "pipelines" / "demo.yaml", ROOT / "training" / "configs" / "smollm2_lora_cpu.yaml"


def test_summary_counts_gained_and_lost():
    # 3 right both times, 2 gained, 1 lost, 4 never right
    before = [True] * 3 + [False] * 2 + [True] + [False] * 4
    after = [True] * 3 + [True] * 2 + [False] + [False] * 4
    s = aa.summarize(before, after)
    assert (s["questions"], s["before"], s["after"], s["gained"], s["lost"]) == (10, 0.4, 0.5, 2, 1)
    assert s["before_ci"][0] < 0.4 < s["before_ci"][1] and s["diff_ci"][0] < 0.1 < s["diff_ci"][1]
    assert "+10.0 points" in aa.describe(s)
    with pytest.raises(ValueError):
        aa.summarize([True], [])


def test_training_config_checks_the_answer_settings_before_training(tmp_path):
    from mpo_data.commands import train as train_command
    from mpo_data.train.config import load

    config = load(DEMO_TRAIN)
    assert (
        config.eval.answers.questions == "data/demo/arithmetic_heldout.jsonl" and config.eval.answers.temperature == 0
    )
    with pytest.raises(InputError, match="eval.answers.prompt_version: 'en3'"):
        load(DEMO_TRAIN, ["eval.answers.prompt_version=en3"])
    args = type(
        "Args", (), {"config": str(DEMO_TRAIN), "overrides": [f"eval.answers.questions={tmp_path / 'nope.jsonl'}"]}
    )
    with pytest.raises(InputError, match="nope.jsonl: no such file"):
        train_command.main(args)


def test_evaluate_without_questions_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="eval.answers.questions"):
        aa.evaluate_models("base", "trained", EvalArgs(), tmp_path)
    with pytest.raises(InputError, match="not a training run folder"):
        load_run_config(tmp_path)  # what `mpo-data eval` reads first


def test_held_out_questions_share_no_fact_with_the_sampled_ones():
    from mpo_data.tools import demo

    train, held = demo.arithmetic_problems(48, seed=0, held_out=256)
    assert (len(train), len(held)) == (48, 256)
    terms = lambda row: re.search(r"(\d+) ([+-]) (\d+)", row["question"]).groups()  # noqa: E731
    fact = lambda row: (row["op"], *sorted(int(n) for n in terms(row)[::2]))  # noqa: E731
    assert not {fact(r) for r in train} & {fact(r) for r in held}
    for row in train + held:  # exact answers
        left, op, right = terms(row)
        assert op == row["op"] and int(row["answer"]) == (
            int(left) + int(right) if op == "+" else int(left) - int(right)
        )
    assert demo.arithmetic_problems(48, seed=0, held_out=256) == (train, held)  # the same sets every time
    assert len({r["question"] for r in held}) == 256
    with pytest.raises(ValueError, match="disjoint"):
        demo.arithmetic_problems(48, seed=0, held_out=10_000)
    sampled = [d["settings"].get("prompt_path") for d in yaml.safe_load(DEMO_PIPELINE.read_text())["datasets"]]
    train_config = yaml.safe_load(DEMO_TRAIN.read_text())
    assert train_config["eval"]["answers"]["questions"] == "data/demo/arithmetic_heldout.jsonl" not in sampled


def test_tuning_and_reworded_sets_are_never_sampled_and_reworded_never_uses_a_trained_wording():
    from mpo_data.tools import demo

    train, held = demo.arithmetic_problems(48, seed=0, held_out=256)
    tune, reworded = demo.tuning_and_reworded(48, seed=0, held_out=256)
    numbers = lambda row: tuple(sorted(int(n) for n in re.findall(r"\d+", row["question"])))  # noqa: E731
    fact = lambda row: (row["op"], *numbers(row))  # noqa: E731
    sampled = {fact(r) for r in train}
    assert tune and reworded and not ({fact(r) for r in tune} | {fact(r) for r in reworded}) & sampled
    assert not {r["question"] for r in tune} & {
        r["question"] for r in held + train
    }  # never reported on, never trained
    shape = lambda q: re.sub(r"\d+", "N", q)  # noqa: E731
    trained_shapes = {shape(r["question"]) for r in train + held}
    assert not {shape(r["question"]) for r in reworded} & trained_shapes
    for row in reworded:  # exact answers: the sum, or the larger number minus the smaller
        a, b = numbers(row)
        assert int(row["answer"]) == (a + b if row["op"] == "+" else b - a)
    assert demo.tuning_and_reworded(48, seed=0, held_out=256) == (tune, reworded)


def _random_adapter_run(models_dir, run):
    """A run folder as `mpo-data train` leaves it, with a real LoRA adapter whose weights are not zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = str(models_dir / "smollm2-135m-instruct")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(run)
    AutoTokenizer.from_pretrained(base).save_pretrained(run)
    run_config = {"model": {"path": base}, "data": {"meta": "unused.json"}, "output_dir": str(run)}
    (run / "train_config.yaml").write_text(yaml.safe_dump(run_config))
    return base


@pytest.mark.engine
def test_adapter_run_answers_judged_before_and_after(models_dir, text_engine, tmp_path):
    """Merged adapter (float32) computes what the PEFT model computes, vLLM answers with it, the judge marks both."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mpo_data.preference.judge import extract_answer

    run = tmp_path / "run"
    base = _random_adapter_run(models_dir, run)
    merged = aa.trained_model(run, base)
    assert merged == run / "merged" and aa.trained_model(run, base) == merged  # merged once, then reused
    ids = torch.tensor([[1, 504, 3458, 314, 1638, 30]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), run)
    expected = peft(ids).logits
    assert torch.allclose(AutoModelForCausalLM.from_pretrained(merged)(ids).logits, expected, atol=1e-4)

    questions = tmp_path / "held_out.jsonl"
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in ((2, 3), (4, 4), (6, 1))]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = aa.AnswerEvalArgs(questions=str(questions), max_new_tokens=48)
    summary = aa.evaluate_models(text_engine, merged, EvalArgs(answers=args), tmp_path)["answer_accuracy"]

    lines = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [line["answer"] for line in lines] == ["5", "8", "7"]
    assert any(line["before_response"] != line["after_response"] for line in lines)  # the adapter is in the weights
    for when in ("before", "after"):
        assert summary[when] == pytest.approx(sum(line[f"{when}_correct"] for line in lines) / 3, abs=1e-4)
        for line in lines:  # no final-answer line: wrong; exactly the right number: right
            extraction = extract_answer(line[f"{when}_response"], "en")
            if not extraction.format_ok or extraction.answer == line["answer"]:
                assert line[f"{when}_correct"] == extraction.format_ok
    assert summary["gained"] == sum(row["after_correct"] and not row["before_correct"] for row in lines)
