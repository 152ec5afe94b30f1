"""The MPO recipe (mpo_data/train/recipe.py): its config checks, the length filter, real TRL steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpo_data.errors import InputError
from mpo_data.records.jsonl import current_umask
from mpo_data.train import preference_eval
from mpo_data.train.config import load
from mpo_data.train.data import PairLoader

ROOT = Path(__file__).resolve().parents[1]
TINY_VLM = ROOT / "models" / "tiny-smolvlm"
CONFIG = ROOT / "training" / "configs" / "tiny_vlm_full_cpu.yaml"

pytestmark = pytest.mark.usefixtures("torch_threads")


def test_config_errors_name_key_and_file(tmp_path):
    with pytest.raises(InputError, match=r"tiny_vlm_full_cpu.yaml(:\d+)?: dpo: unknown key 'rpo_alpha'"):
        load(CONFIG, ["dpo.rpo_alpha=0.5"])
    with pytest.raises(
        InputError, match=r"tiny_vlm_full_cpu.yaml:\d+: model: unknown key 'lora_rank' here: did you mean lora_r"
    ):
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


@pytest.mark.train
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_two_mpo_steps_on_tiny_vlm(pairs, tmp_path, finetune):
    from mpo_data import cli
    from mpo_data.train.recipe import train

    out = tmp_path / f"run_{finetune}"
    config = load(
        CONFIG,
        [
            f"data.meta={pairs / 'meta.json'}",
            f"output_dir={out}",
            f"model.finetune={finetune}",
            "data.eval_size=2",
            "eval.pairs=2",
            "eval.generations=1",
            "dpo.learning_rate=0.01",
        ],
    )
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
