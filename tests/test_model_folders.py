"""The locally built models load in transformers, behave like what they claim to be, and rebuild identically."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mpo_data.cli import main
from mpo_data.tools import model_folders


def test_smollm2_is_the_real_instruct_model(models_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models_dir / model_folders.SMOLLM2
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # de-quantized weights still compute: random or mis-copied weights would not


def test_tiny_smolvlm_runs_in_transformers_with_an_image(models_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = models_dir / model_folders.TINY_VLM
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.new("RGB", (80, 60), "red")], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == model_folders.IMAGE_SEQ_LEN
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_tiny_smolvlm_rebuilds_identically(models_dir, tmp_path):
    rebuilt = model_folders.build_tiny_smolvlm(tmp_path / "again", models_dir / model_folders.SMOLLM2)
    ours, again = (
        load_file(models_dir / model_folders.TINY_VLM / "model.safetensors"),
        load_file(rebuilt / "model.safetensors"),
    )
    assert ours.keys() == again.keys()
    assert all(torch.equal(ours[k], again[k]) for k in ours)


def test_build_all_keeps_complete_models(models_dir):
    weights = models_dir / model_folders.TINY_VLM / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert model_folders.build_all(models_dir)[model_folders.TINY_VLM] == models_dir / model_folders.TINY_VLM
    assert weights.stat().st_mtime_ns == before


@pytest.mark.parametrize("name", [model_folders.TINY_QWEN, model_folders.TINY_INTERNVL])
def test_gpu_model_builders_need_torchvision_and_say_so(models_dir, name, capsys):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here (GPU machine): the builder runs instead")
    assert main(["models", "--out", str(models_dir), "--model", name]) == 1
    assert "needs torchvision" in capsys.readouterr().err
    assert not (models_dir / name).exists()
