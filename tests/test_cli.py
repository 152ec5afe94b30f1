"""The command line: flags derived from the config dataclasses, InternVL's guide flags, and a light --help."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from mpo_data.cli import COMMANDS, build_parser, main
from mpo_data.config import build, config_from_args
from mpo_data.preference.pairs import PairsConfig
from mpo_data.sampling.stage_config import (
    CorrectnessConfig,
    DropoutNTPConfig,
    EngineConfig,
    SamplingConfig,
    StageConfig,
)

HEAVY = ("torch", "transformers", "vllm", "ray")

# The InternVL MPO guide's three commands, flags as printed there (values of its placeholders filled in).
GUIDE_DROPOUT = [
    "dropout-ntp",
    "--checkpoint",
    "M",
    "--prompt-path",
    "p.jsonl",
    "--out-dir",
    "OUT",
    "--batch-size",
    "1",
    "--num-workers",
    "8",
    "--num-return-sequences",
    "1",
    "--top-k",
    "50",
    "--temperature",
    "1.0",
    "--dynamic",
    "--max-num",
    "6",
    "--sample-max-num",
    "500000",
    "--tp",
    "8",
    "--start-ratio",
    "0.5",
]
GUIDE_CORRECTNESS = [
    "correctness",
    "--checkpoint",
    "M",
    "--prompt-path",
    "p.jsonl",
    "--out-dir",
    "OUT",
    "--batch-size",
    "1",
    "--num-workers",
    "8",
    "--num-return-sequences",
    "32",
    "--top-k",
    "50",
    "--temperature",
    "1.0",
    "--dynamic",
    "--max-num",
    "6",
    "--sample-max-num",
    "20000",
    "--tp",
    "8",
]
GUIDE_POSTPROCESS = [
    "pairs",
    "--data-dir",
    "OUT",
    "--save-dir",
    "SAVE",
    "--answer-fix",
    "--force",
    "--num-pairs-per-key",
    "15",
    "--max-lines",
    "1200000",
]


def parse(argv: list[str]):
    return build_parser(argv[0]).parse_args(argv)


def test_help_imports_no_engine_or_trainer():
    """`mpo-data --help` and every command's --help build their parser without torch, transformers, vLLM or Ray."""
    probe = (
        "import contextlib, io, sys\n"
        "from mpo_data import cli\n"
        f"for argv in [['--help']] + [[name, '--help'] for name in {list(COMMANDS)!r}]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        cli.main(argv)\n"
        f"    heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "    if heavy:\n"
        "        sys.exit(f'{argv}: imported {heavy}')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_guide_sampling_flags_map_to_our_settings():
    dropout = config_from_args(DropoutNTPConfig, parse(GUIDE_DROPOUT))
    assert dropout.engine == EngineConfig("M", tensor_parallel_size=8, max_num=[6], dynamic=True)
    assert dropout.sampling == SamplingConfig(n=1, top_k=50, temperature=1.0)
    assert (dropout.prompt_path, dropout.out_dir, dropout.batch_size, dropout.sample_max_num, dropout.start_ratio) == (
        "p.jsonl",
        "OUT",
        1,
        500000,
        0.5,
    )
    correctness = config_from_args(CorrectnessConfig, parse(GUIDE_CORRECTNESS))
    assert (
        correctness.sampling.n == 32
        and correctness.engine.tensor_parallel_size == 8
        and correctness.prompt_version == "en_v2"
    )
    pairs = config_from_args(PairsConfig, parse(GUIDE_POSTPROCESS))
    assert (str(pairs.data_dir), pairs.answer_fix, pairs.num_pairs_per_key, pairs.max_lines) == (
        "OUT",
        True,
        15,
        1200000,
    )


def test_internvl_only_flags_say_what_they_do_here(capsys):
    from mpo_data.commands import internvl

    args = parse([*GUIDE_CORRECTNESS, "--vit-batch-size", "4", "--cache-max-entry-count", "0.5"])
    internvl.report_given(args, internvl.SAMPLING_FLAGS)
    notes = capsys.readouterr().err.splitlines()
    assert [n.split(":")[1].strip() for n in notes] == ["--num-workers", "--vit-batch-size", "--cache-max-entry-count"]
    assert all("no effect" in n for n in notes)
    args = parse([*GUIDE_POSTPROCESS, "--overwrite", "--use-correctness-cache"])
    internvl.report_given(args, internvl.POSTPROCESS_FLAGS)
    assert len(capsys.readouterr().err.splitlines()) == 3  # --force, --overwrite, --use-correctness-cache
    # an InternVL flag that means something here is an alias of our setting
    args = parse(
        [
            "correctness",
            "--checkpoint",
            "M",
            "--prompt-path",
            "p",
            "--session-len",
            "16384",
            "--prompt-version",
            "zh_r1",
        ]
    )
    config = config_from_args(CorrectnessConfig, args)
    assert config.engine.max_model_len == 16384 and config.prompt_version == "zh_r1"


def test_flags_and_yaml_give_the_same_config():
    """One declaration, two spellings: a YAML section and the flags derived from it build equal configs."""
    yaml_like = {
        "prompt_path": "p",
        "engine": {"model": "M", "max_model_len": 8192, "enforce_eager": False, "engine_kwargs": {"max_num_seqs": 64}},
        "sampling": {"max_new_tokens": 2048, "stop": ["</s>"]},
        "prompt_version": "en",
    }
    from_yaml = build(CorrectnessConfig, yaml_like, "p.yaml")
    argv = [
        "correctness",
        "--prompt-path",
        "p",
        "--model",
        "M",
        "--max-model-len",
        "8192",
        "--no-enforce-eager",
        "--engine-kwargs",
        "max_num_seqs=64",
        "--max-new-tokens",
        "2048",
        "--stop",
        "</s>",
        "--prompt-version",
        "en",
    ]
    assert config_from_args(CorrectnessConfig, parse(argv)) == from_yaml
    assert from_yaml.sampling.n == 8  # the stage's own default survives a partial sampling section


@pytest.mark.parametrize("cls", [CorrectnessConfig, DropoutNTPConfig])
def test_each_stage_setting_is_declared_once(cls):
    names = [f.name for f in fields(cls)]
    nested = [f.name for section in (EngineConfig, SamplingConfig) for f in fields(section)]
    assert not set(names) & set(nested) and len(set(nested)) == len(nested)
    assert {f.name for f in fields(StageConfig)} <= set(names)
    engine = EngineConfig("M", max_model_len=1234, tensor_parallel_size=2)
    assert cls("p", engine).engine_config() == EngineConfig("M", max_model_len=1234, tensor_parallel_size=2)


def test_bad_flag_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["correctness", "--checkpoint", "M", "--prompt-path", "p", "--prompt-version", "klingon"])
    assert exit_.value.code == 2 and "--prompt-version" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["meta", "--pairs-dir", "p", "--image-root", "i", "--out", "m.json", "--weight", "noequals"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_guide_tiling_flags_on_a_model_that_is_not_internvl_are_accepted_with_one_note(models_dir, tmp_path, capsys):
    argv = [
        "correctness",
        "--checkpoint",
        str(models_dir / "smollm2-135m-instruct"),
        "--prompt-path",
        "p.jsonl",
        "--dynamic",
        "--max-num",
        "6",
    ]
    config = config_from_args(CorrectnessConfig, parse(argv))
    config.check()
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: --dynamic/--max-num:") and "LlamaForCausalLM" in notes[0]
    assert "no effect" in notes[0] and "processor's own" in notes[0]
    assert config.engine.tiling_kwargs() == {}  # nothing reaches the engine
    # a rerun without them resumes the same samples: flags with no effect are not recorded as settings
    assert config.stage_settings() == config_from_args(CorrectnessConfig, parse(argv[:5])).stage_settings()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-in-flight", "0", "--max-in-flight must be >= 1, got 0"),
        ("--placement-timeout-s", "0", "--placement-timeout-s must be > 0, got 0.0"),
    ],
)
def test_nonsense_counts_are_refused_before_anything_starts(flag, value, message):
    from mpo_data.errors import InputError

    config = config_from_args(
        CorrectnessConfig, parse(["correctness", "--checkpoint", "M", "--prompt-path", "p", flag, value])
    )
    with pytest.raises(InputError, match=message):
        config.check()
