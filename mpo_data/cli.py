"""`mpo-data` command line. Each command is a thin module in mpo_data/commands/; only the chosen one is
imported, so `mpo-data --help` and `mpo-data judge --help` answer without loading vLLM, Ray or torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from mpo_data.errors import OUTPUT_ERRNOS, InputError, output_error

# command -> one-line help, in the order `--help` lists them; the module is mpo_data/commands/<name>.py ('-' -> '_')
COMMANDS: dict[str, str] = {
    "validate": "check a prompt, pair or meta file; report every problem as FILE:LINE: reason",
    "demo-data": "build the offline demo prompt sets (arithmetic, easy-VQA)",
    "models": "build the local models offline (SmolLM2 from GGUF, a tiny SmolVLM)",
    "gpu-smoke": "first thing on a GPU cluster: both stages, pairs, meta and 2 training steps on tiny models, pass/fail",
    "sample": "plain vLLM answers to a prompt file (smoke-tests a model and the engine settings)",
    "dropout-ntp": "DropoutNTP: continue half of `chosen` without the image -> rejected (resumable, on Ray)",
    "correctness": "correctness sampling: n reasoning answers per item (resumable, on Ray)",
    "run": "run a pipeline YAML: sampling stages -> pairs -> meta.json (resumable)",
    "rounds": "Iterative RPO's loop: run + train K times, each round sampling with the previous round's merged model (resumable)",
    "report": "one static HTML page: counts, correctness rates, lengths, sample pairs",
    "train": "MPO training (TRL DPOTrainer, sigmoid+bco_pair+sft) on a meta.json mixture",
    "ablate": "loss ablations (sft, dpo, rpo, mpo, mpo_trl) over seeds on the same pairs: one table of held-out answer accuracy vs sft",
    "eval": "a training run's evaluation again: preference accuracy, and answer accuracy on held-out questions (vLLM + judge, intervals)",
    "judge": "judge responses against ground-truth answers (the judge contract)",
    "pairs": "turn sample shards into MMPR preference pairs (correctness and DropoutNTP)",
    "meta": "write a meta.json mixture over pair files (repeat ratios, target size)",
    "export": "a meta.json mixture as a TRL-ready preference set (save_to_disk folder or Parquet, images embedded)",
}


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"mpo_data.commands.{name.replace('-', '_')}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed and only `command`'s arguments declared (its module imported)."""
    parser = argparse.ArgumentParser(
        prog="mpo-data",
        description="Build multimodal MPO preference data with vLLM on Ray, and train on it with TRL.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            command_module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)  # the top level has no options but -h
    args = build_parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    try:
        return command_module(args.command).main(args) or 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS:
            raise
        print(f"error: {output_error(e, 'cannot use')}", file=sys.stderr)  # a write our own writers did not name
        return 1
    except KeyboardInterrupt:
        from mpo_data.sampling import watchdog

        signum = watchdog.received()  # a stage run printed its line as the signal came
        if signum is None:
            print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 128 + (signum or 2)  # the shell's status for death by that signal (SIGINT 130, SIGTERM 143)


if __name__ == "__main__":
    sys.exit(main())
