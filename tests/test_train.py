"""MPO training stage: meta.json sampling, bad input messages, real TRL steps, evaluation numbers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from mpo_data.train import preference_eval
from mpo_data.errors import InputError
from mpo_data.records.formats import MetaEntry, write_meta
from mpo_data.records.jsonl import current_umask
from mpo_data.train.config import load
from mpo_data.train.data import PairLoader, repeat_indices

ROOT = Path(__file__).resolve().parents[1]
TINY_VLM = ROOT / "models" / "tiny-smolvlm"
CONFIG = ROOT / "training" / "configs" / "tiny_vlm_full_cpu.yaml"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)  # a shared 2-core machine


def meta_with(tmp_path: Path, repeat_time: float) -> Path:
    path = tmp_path / f"meta_{repeat_time}.json"
    write_meta(path, {"mix": MetaEntry(str(tmp_path / "img"), str(tmp_path / "pairs.jsonl"), repeat_time, 8)})
    return path


@pytest.mark.parametrize("repeat_time, rows", [(0.5, 4), (1, 8), (1.5, 8), (2.25, 16)])
def test_meta_sampling_follows_internvls_row_rule(pairs, repeat_time, rows):
    picked = PairLoader().read_meta(meta_with(pairs, repeat_time), seed=3)
    assert len(picked.rows) == rows and picked.counts["mix"] == {"lines": 8, "valid": 8, "sampled": rows}
    per_line = Counter(picked.sources)
    if repeat_time < 1:  # a random subset without replacement, drawn again by the same seed only
        assert len(per_line) == rows and set(per_line.values()) == {1}
        assert PairLoader().read_meta(meta_with(pairs, repeat_time), seed=3).sources == picked.sources
        draws = {tuple(PairLoader().read_meta(meta_with(pairs, repeat_time), seed=s).sources) for s in range(6)}
        assert len(draws) > 1
    else:  # int(r) whole copies of every line: 1.5 is one copy, 2.25 two, as InternVL reads them
        assert len(per_line) == 8 and set(per_line.values()) == {int(repeat_time)}


def test_repeat_indices_on_awkward_lengths():
    import random

    from mpo_data.preference.meta import active_rows

    for length in (1, 3, 7, 13, 100):
        for r in (0.1, 0.5, 0.99, 1, 1.5, 2.25, 3.7):
            picked = repeat_indices(length, r, random.Random(0))
            assert len(picked) == active_rows(length, r)
            assert set(Counter(picked).values()) <= ({1} if r < 1 else {int(r)})


def test_rows_are_trl_vision_preference_rows(pairs):
    rows = PairLoader().read_meta(pairs / "meta.json", seed=0).rows
    two = rows[2]
    assert [p["type"] for p in two["prompt"][0]["content"]] == ["image", "image", "text"]
    assert len(two["images"]) == 2 and all(isinstance(i, Image.Image) for i in two["images"])
    assert two["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "No."}]}]
    assert rows[5]["images"] == [] and rows[5]["prompt"][0]["content"] == [{"type": "text", "text": "What is 2 + 3?"}]
    text_only = PairLoader(text_only=True, on_error="skip").read_meta(pairs / "meta.json", seed=0)
    assert [r["prompt"] for r in text_only.rows][0] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert text_only.quarantine.counts == {"image row, text-only model": 5}


def test_bad_meta_and_pair_lines_name_file_and_line(pairs):
    write_meta(pairs / "gone.json", {"mix": MetaEntry(str(pairs / "img"), "nowhere.jsonl", 1.0, 8)})
    with pytest.raises(InputError, match=r"gone.json: entry 'mix': annotation 'nowhere.jsonl' not found"):
        PairLoader().read_meta(pairs / "gone.json", seed=0)
    (pairs / "bad.json").write_text('{"mix": {"root": "img", "annotation": "pairs.jsonl", "repeat_time": 0, "length": 8}}')
    with pytest.raises(InputError, match=r"bad.json: entry 'mix': 'repeat_time' must be > 0"):
        PairLoader().read_meta(pairs / "bad.json", seed=0)
    with (pairs / "pairs.jsonl").open("a") as f:
        f.write('{"image": "missing.png", "question": "q", "chosen": "a", "rejected": "b"}\n')
        f.write('{"question": "q", "chosen": "a"}\n')
    with pytest.raises(InputError, match=r"pairs.jsonl:9: image 'missing.png' not found"):
        PairLoader().read_meta(pairs / "meta.json", seed=0)
    loader = PairLoader(on_error="skip", quarantine=pairs / "q.jsonl")
    loader.read_meta(pairs / "meta.json", seed=0)
    loader.close()
    assert len(loader.out.rows) == 8 and loader.out.quarantine.counts == {"image missing": 1, "schema": 1}
    kept = [json.loads(line)["loc"] for line in (pairs / "q.jsonl").read_text().splitlines()]
    assert kept == [f"{pairs}/pairs.jsonl:9", f"{pairs}/pairs.jsonl:10"]


def test_hf_dataset_on_disk_with_pil_images(tmp_path):
    import datasets

    red = Image.new("RGB", (20, 20), "red")
    datasets.Dataset.from_list([
        {"prompt": "Colour?", "chosen": "Red.", "rejected": "Blue.", "images": [red]},
        {"prompt": "Colour?", "chosen": "Red.", "rejected": "", "images": [red]},
    ]).save_to_disk(tmp_path / "ds")
    with pytest.raises(InputError, match=r"ds:2: 'rejected' is empty"):
        PairLoader().read_dataset(tmp_path / "ds")
    rows = PairLoader(on_error="skip").read_dataset(tmp_path / "ds").rows
    assert len(rows) == 1 and rows[0]["images"][0].size == (20, 20)
    assert rows[0]["prompt"][0]["content"][0] == {"type": "image"}
    # Parquet written by `datasets`: Image cells are {bytes, path} structs, decoded here
    datasets.load_from_disk(tmp_path / "ds").to_parquet(tmp_path / "ds.parquet")
    rows = PairLoader(on_error="skip").read_dataset(tmp_path / "ds.parquet").rows
    assert len(rows) == 1 and rows[0]["images"][0].getpixel((3, 3)) == (255, 0, 0)


def test_mmpr_placeholders_become_image_parts_in_place(pairs):
    lines = [
        {"image": ["red.png", "blue.png"], "question": "Image-1: <image>\nImage-2: <image>\nSame?", "chosen": "No.", "rejected": "Yes."},
        {"image": "red.png", "question": "<image>\nColour?", "chosen": "Red.", "rejected": "Blue."},
    ]
    (pairs / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    two, one = PairLoader().read_meta(pairs / "meta.json", seed=0).rows[:2]
    assert two["prompt"][0]["content"] == [
        {"type": "text", "text": "Image-1: "}, {"type": "image"}, {"type": "text", "text": "\nImage-2: "}, {"type": "image"},
        {"type": "text", "text": "\nSame?"},
    ]
    assert one["prompt"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "\nColour?"}]
    assert "<image>" not in json.dumps([two["prompt"], one["prompt"]])


def test_config_errors_name_key_and_file(tmp_path):
    with pytest.raises(InputError, match=r"tiny_vlm_full_cpu.yaml(:\d+)?: dpo: unknown key 'rpo_alpha'"):
        load(CONFIG, ["dpo.rpo_alpha=0.5"])
    with pytest.raises(InputError, match=r"tiny_vlm_full_cpu.yaml:\d+: model: unknown key 'lora_rank' here: did you mean lora_r"):
        load(CONFIG, ["model.lora_rank=4"])
    with pytest.raises(InputError, match=r"model.finetune: 'qlora4' is not one of full, lora, qlora"):
        load(CONFIG, ["model.finetune=qlora4"])
    with pytest.raises(InputError, match=r"model.finetune: 'dora' is not one of .*model.use_dora: true"):
        load(CONFIG, ["model.finetune=dora"])
    with pytest.raises(InputError, match=r"model.use_dora: DoRA is an adapter method"):
        load(CONFIG, ["model.finetune=full", "model.use_dora=true"])
    from mpo_data.train.recipe import dpo_config, peft_config, quantization_config

    assert peft_config(load(CONFIG, ["model.finetune=lora", "model.use_dora=true"])).use_dora is True
    assert peft_config(load(CONFIG, ["model.finetune=lora"])).use_dora is False
    cookbook = load(ROOT / "training" / "configs" / "qwen2_5_vl_3b_qlora.yaml")
    assert (cookbook.model.finetune, peft_config(cookbook).use_dora) == ("qlora", True)

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match=r"qlora needs a CUDA GPU"):
            quantization_config(load(CONFIG, ["model.finetune=qlora"]), cuda=False)
    with pytest.raises(InputError, match=r"tiny_vlm_full_cpu.yaml: dpo: .*loss_weights"):
        dpo_config(load(CONFIG, ["dpo.loss_weights=[1.0]"]), cuda=False)
    args = dpo_config(load(CONFIG), cuda=False)
    assert (args.loss_type, args.loss_weights, args.beta) == (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.1)
    assert args.bf16 is False and args.report_to == ["tensorboard"]


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

    s = preference_eval.Scores(policy_chosen=[-1.0, -5.0, -2.0], policy_rejected=[-2.0, -4.0, -2.0],
                        ref_chosen=[-3.0, -4.0, -2.5], ref_rejected=[-2.0, -4.0, -2.0])
    m = preference_eval.preference_metrics(s, beta=0.1)
    # before margins: -1, 0, -0.5 ; after: 1, -1, 0 ; rewards 0.1*(2, -1, 0.5)
    assert m["before"] == {"logp_accuracy": 0.0, "mean_logp_margin": pytest.approx(-0.5), "reward_accuracy": 0.0,
                           "mean_reward_margin": 0.0}
    assert m["after"]["logp_accuracy"] == pytest.approx(1 / 3)
    assert m["after"]["reward_accuracy"] == pytest.approx(2 / 3)
    assert m["after"]["mean_reward_margin"] == pytest.approx(0.05)


@pytest.mark.train
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_two_mpo_steps_on_tiny_vlm(pairs, tmp_path, finetune):
    from mpo_data import cli
    from mpo_data.train.recipe import train

    out = tmp_path / f"run_{finetune}"
    config = load(CONFIG, [f"data.meta={pairs / 'meta.json'}", f"output_dir={out}", f"model.finetune={finetune}",
                           "data.eval_size=2", "eval.pairs=2", "eval.generations=1", "dpo.learning_rate=0.01"])
    run = train(config)
    assert run["steps"] == 2 and run["data"]["train_rows"] == 6 and run["data"]["eval_rows"] == 2
    saved = "adapter_model.safetensors" if finetune == "lora" else "model.safetensors"
    assert (out / saved).is_file() and (out / "processor_config.json").is_file()
    events = list((out / "runs").glob("*/events.out.tfevents.*"))
    assert events and b"bco_pair/delta" in events[0].read_bytes()  # the paper's bco_pair ran, delta logged
    assert run["bco_delta"] != 0  # step 1 at the reference (rewards 0), step 2 off it
    result = json.loads((out / "eval.json").read_text())
    for written in ("eval.json", "summary.json"):  # readable by the group, as open() would make them
        assert (out / written).stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert result["pairs"] == 2 and len(result["generations"]) == 1
    moved = [p["policy_chosen"] - p["ref_chosen"] for p in result["per_pair"]]
    assert any(abs(d) > 1e-4 for d in moved)  # the policy left the reference: training changed weights
    assert cli.main(["eval", str(out)]) == 0  # `mpo-data eval` reloads the run and gets the same numbers
    again = json.loads((out / "eval.json").read_text())
    assert "answer_accuracy" not in again  # the config sets no held-out questions
    assert again["after"] == pytest.approx(result["after"], abs=1e-3)
    assert again["before"] == pytest.approx(result["before"], abs=1e-3)


def test_long_rows_dropped_up_front_with_count(pairs, tmp_path):
    from mpo_data.train.recipe import load_processing_class, prepare_rows

    processor = load_processing_class(str(TINY_VLM))
    config = load(CONFIG, [f"data.meta={pairs / 'meta.json'}", f"output_dir={tmp_path / 'run'}", "data.eval_size=1"])
    rows = PairLoader().read_meta(pairs / "meta.json", seed=0).rows
    lengths = sorted(preference_eval.pair_length(row, processor) for row in rows)
    limit = lengths[4]
    train, held, info = prepare_rows(config, processor, max_length=limit)
    dropped = sum(n > limit for n in lengths)
    assert dropped > 0 and info["skipped"] == {"too long": dropped}
    assert len(train) + len(held) == 8 - dropped
    assert all(preference_eval.pair_length(r, processor) <= limit for r in train + held)
    quarantined = (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantined) == dropped and f"over max_length={limit}" in quarantined[0]


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
    return (weights[0] * sigmoid + weights[1] * bco + weights[2] * sft).item(), torch.cat([chosen_rewards, rejected_rewards]).mean().item()


@pytest.mark.train
def test_mpo_trainer_loss_matches_the_hand_formula_on_fixed_batches(pairs, tmp_path):
    """The real trainer on the tiny SmolVLM (image and text rows): TRL's sigmoid and sft terms plus our bco_pair,
    delta the running mean of the batch rewards; bco_delta=false is TRL's bco_pair (delta 0)."""
    from mpo_data.train.mpo_trainer import MPOTrainer
    from mpo_data.train.recipe import dpo_config, load_processing_class, to_dataset

    config = load(CONFIG, [f"data.meta={pairs / 'meta.json'}", f"output_dir={tmp_path / 'run'}"])
    processor = load_processing_class(str(TINY_VLM))
    rows = PairLoader().read_meta(pairs / "meta.json", seed=0).rows
    batches = [preference_eval.collate([rows[2], rows[5]], processor), preference_eval.collate([rows[4], rows[0]], processor)]
    losses = {}
    for bco_delta in (True, False):
        torch.manual_seed(0)
        trainer = MPOTrainer(model=str(TINY_VLM), args=dpo_config(config, cuda=False), train_dataset=to_dataset(rows),
                             processing_class=processor, bco_delta=bco_delta)
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
            assert abs(trainer.delta.mean) > 1e-3 and trainer._metrics["train"]["bco_pair/delta"][-1] == trainer.delta.mean
        else:
            assert trainer.quality_weight is None and trainer.loss_types == ["sigmoid", "bco_pair", "sft"]
    assert losses[True][1] != pytest.approx(losses[False][1], abs=1e-5)
