"""Where Ray's own log lines go, around `ray.init` (stood in for here: what is tested is our routing; the real
Ray run is tests/test_pipeline.py::test_tiny_pipeline_runs_and_rerun_does_no_work, which checks the terminal)."""

from __future__ import annotations

import io
import logging

import pytest

from mpo_data.sampling import ray_logs


@pytest.fixture
def terminal():
    """The `ray` logger's terminal handler, writing into a buffer for the test."""
    import ray  # noqa: F401  (sets up the `ray` logger with its terminal handler)

    logger, data = logging.getLogger("ray"), ray_logs._console(logging.getLogger("ray.data"))
    saved, levels = logger.handlers[:], [h.level for h in data]
    buffer = io.StringIO()
    logger.handlers = [logging.StreamHandler(buffer)]
    yield buffer
    logger.handlers = saved
    for handler, level in zip(data, levels):
        handler.setLevel(level)


def fake_init(fail: bool = False):
    def init(**kwargs):
        logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
        logging.getLogger("ray._private.worker").warning("something Ray wants you to see")
        logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
            "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
        )
        if fail:
            raise ConnectionError("no cluster at that address")

    return init


def test_info_lines_go_to_the_log_folder_warnings_also_to_the_terminal(terminal, tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", fake_init())
    monkeypatch.setattr(ray_logs, "_logs_dir", lambda: str(tmp_path))
    assert ray_logs.init(address="local") == str(tmp_path)
    data = ray_logs._console(logging.getLogger("ray.data"))  # Ray Data writes ray-data.log itself
    assert data and all(h.level == logging.WARNING for h in data)
    err = terminal.getvalue()
    assert (
        "something Ray wants you to see" in err
        and "Started a local Ray" not in err
        and "Token authentication" not in err
    )
    written = (tmp_path / ray_logs.DRIVER_LOG).read_text()
    assert "Started a local Ray instance" in written and "something Ray wants you to see" in written
    assert "Token authentication is enabled" in written  # a notice, not a problem: the log file only


def test_ray_failing_to_start_says_everything_on_the_terminal(terminal, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", fake_init(fail=True))
    with pytest.raises(ConnectionError):
        ray_logs.init(address="10.0.0.1:6379")
    err = terminal.getvalue()
    assert "Started a local Ray instance" in err and "something Ray wants you to see" in err
