"""One run per output folder: a second process is refused at once, naming the holder; a killed holder leaves
no stale lock. (The stage test `test_sigkill_then_rerun_gives_exactly_once` checks the same against a real
stage run on Ray.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mpo_data.errors import InputError
from mpo_data.pipeline import load_pipeline, run_pipeline
from mpo_data.preference.pairs import PairsConfig, build_pairs
from mpo_data.runlock import run_lock
from mpo_data.sampling.stage_config import CorrectnessConfig, EngineConfig
from mpo_data.sampling.stages import run_stage

HOLD = "import sys; from mpo_data.runlock import run_lock\nwith run_lock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()"


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/out, as a running stage would."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "out")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "held\n"
    yield proc
    proc.kill()
    proc.wait()


def test_second_run_is_refused_naming_folder_and_holder(tmp_path, holder, demo_dir):
    out = tmp_path / "out"
    expected = rf"{out}: in use by another run \(host {socket.gethostname()}, pid {holder.pid}, since "
    with pytest.raises(InputError, match=expected):
        run_stage(
            CorrectnessConfig(
                str(demo_dir / "arithmetic.jsonl"), EngineConfig("models/smollm2-135m-instruct"), out_dir=str(out)
            )
        )
    with pytest.raises(InputError, match=expected):
        build_pairs(PairsConfig(data_dir=tmp_path / "samples", save_dir=out))
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(
        yaml.safe_dump(
            {
                "out_dir": str(out),
                "meta": {"out": str(tmp_path / "m.json")},
                "datasets": [
                    {
                        "name": "a",
                        "stage": "correctness",
                        "settings": {"engine": {"model": "models/x"}, "prompt_path": "p.jsonl"},
                    }
                ],
            }
        )
    )
    with pytest.raises(InputError, match=expected):
        run_pipeline(*load_pipeline(pipe))
    cli = subprocess.run(
        [sys.executable, "-m", "mpo_data", "run", str(pipe)], capture_output=True, text=True, timeout=120
    )
    assert cli.returncode == 1 and f"pid {holder.pid}" in cli.stderr and "Traceback" not in cli.stderr


def test_killed_holder_leaves_no_stale_lock(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "out" / ".mpo-data.lock").exists()  # the file stays; the lock went with the process
    with run_lock(tmp_path / "out"):
        with run_lock(tmp_path / "out"):  # a pipeline's stages nest inside the pipeline's hold
            pass
        refused = subprocess.run(
            [sys.executable, "-c", HOLD, str(tmp_path / "out")], capture_output=True, text=True, input="", timeout=60
        )
        assert refused.returncode == 1 and f"pid {os.getpid()}" in refused.stderr
    assert Path(tmp_path / "out").is_dir()
