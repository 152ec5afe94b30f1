"""Output tokens/s of our engine layer vs raw `vllm.LLM.generate` vs a per-item transformers `generate` loop.

All three run in one process on identical requests (chats x n samples x max new tokens, sampled with the
same settings). Ours and raw vLLM share one engine, alternate over rounds, and start each round with an
empty prefix cache, so neither profits from the other's cache. Target: ours >= 0.95x raw vLLM.

    make bench-engine            # or: python benchmarks/bench_engine.py --help
"""

from __future__ import annotations

import argparse
import time

QUESTIONS = [
    "What is {a} + {b}? Explain briefly.",
    "Tom has {a} apples and buys {b} more. How many apples does he have?",
    "Write one sentence about the number {a}.",
    "Is {a} larger than {b}? Answer and explain.",
]


def chats(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": QUESTIONS[i % 4].format(a=7 + 3 * i, b=11 + i)}] for i in range(count)]


def timed(fn) -> tuple[int, float]:
    """(output tokens, seconds) of one call that returns the output token count."""
    start = time.perf_counter()
    tokens = fn()
    return tokens, time.perf_counter() - start


def bench_vllm(
    model: str, conversations: list, n: int, max_new_tokens: int, rounds: int
) -> dict[str, tuple[int, float]]:
    from vllm import SamplingParams

    from mpo_data.sampling.engine import Engine, EngineConfig, GenerationRequest, SamplingConfig

    engine = Engine(EngineConfig(model=model, max_model_len=2048))
    sampling = SamplingConfig(n=n, max_new_tokens=max_new_tokens)
    params = SamplingParams(
        n=n, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, max_tokens=max_new_tokens
    )
    requests = [GenerationRequest(messages=c) for c in conversations]
    tokenizer = engine.llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]

    def ours() -> int:
        return sum(c.output_tokens for r in engine.generate(requests, sampling) for c in r.completions)

    def raw() -> int:
        return sum(len(o.token_ids) for r in engine.llm.generate(prompts, params, use_tqdm=False) for o in r.outputs)

    ours(), raw()  # warm-up: first-call allocations are no one's throughput
    totals = {"ours": [0, 0.0], "raw": [0, 0.0]}
    for round_ in range(rounds):
        for name in ("ours", "raw") if round_ % 2 == 0 else ("raw", "ours"):
            engine.llm.reset_prefix_cache()
            tokens, seconds = timed(ours if name == "ours" else raw)
            totals[name][0] += tokens
            totals[name][1] += seconds
    engine.close()
    return {k: (v[0], v[1]) for k, v in totals.items()}


def bench_transformers(model: str, conversations: list, n: int, max_new_tokens: int) -> tuple[int, float]:
    """The reference scripts' style: one `generate` per item with num_return_sequences=n."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    eos = hf.generation_config.eos_token_id

    def loop() -> int:
        tokens = 0
        for conversation in conversations:
            inputs = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                out = hf.generate(
                    **inputs,
                    do_sample=True,
                    top_k=50,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=n,
                )
            for row in out[:, inputs["input_ids"].shape[1] :].tolist():  # up to and with eos, as vLLM counts
                tokens += row.index(eos) + 1 if eos in row else len(row)
        return tokens

    hf.generate(**tokenizer("warm up", return_tensors="pt"), max_new_tokens=2)
    return timed(loop)


LABELS = {
    "ours": "mpo_data Engine.generate",
    "raw": "raw vllm.LLM.generate",
    "transformers": "transformers generate loop",
}


def report(results: dict[str, tuple[int, float]], *names: str) -> None:
    for name in names:
        tokens, seconds = results[name]
        print(f"{LABELS[name]:28s} {tokens:6d} tokens {seconds:7.1f} s {tokens / seconds:7.1f} tok/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--chats", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds each for ours and raw vLLM (alternating)")
    parser.add_argument(
        "--hf-chats",
        type=int,
        default=None,
        help="the transformers loop runs only the first K chats (slow; default all)",
    )
    args = parser.parse_args()
    conversations = chats(args.chats)
    print(f"{args.chats} chats x n={args.n} x max {args.max_new_tokens} new tokens, model {args.model}", flush=True)
    results = bench_vllm(args.model, conversations, args.n, args.max_new_tokens, args.rounds)
    report(results, "ours", "raw")  # printed now: the transformers loop below takes minutes
    results["transformers"] = bench_transformers(
        args.model, conversations[: args.hf_chats], args.n, args.max_new_tokens
    )
    report(results, "transformers")
    rate = {name: tokens / seconds for name, (tokens, seconds) in results.items()}
    print(f"ours / raw vLLM      = {rate['ours'] / rate['raw']:.3f}  (target >= 0.95)")
    print(f"ours / transformers  = {rate['ours'] / rate['transformers']:.2f}x")


if __name__ == "__main__":
    main()
