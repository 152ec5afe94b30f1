"""Ray's own log lines go to Ray's log folder, so the terminal shows our progress bars and summaries.

Ray's driver-side Python loggers (`ray`, `ray.data`) print INFO lines ("Started a local Ray instance",
"Registered dataset logger", execution plans) to stderr. Here they go to the session's log folder instead
(`mpo-data-driver.log` beside Ray's own files; Ray Data already copies its lines to `ray-data.log`), and
only WARNING and above still reach the terminal: a real problem is never hidden. Ray's notices that report
no problem though logged as warnings (`NOTICES`: token authentication is on, as we ask) go to the file only.
Worker output stays in
the workers' files (`log_to_driver=False`). The folder is named in every stage summary (`ray_logs`).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

DRIVER_LOG = "mpo-data-driver.log"
# (logger, message start) of Ray's WARNING lines that report no problem: kept off the terminal
NOTICES = (("ray._private.authentication.authentication_token_setup", "Token authentication is enabled"),)
_last_dir: str | None = None


def _console(logger: logging.Logger) -> list[logging.Handler]:
    return [
        h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


def _not_a_notice(record: logging.LogRecord) -> bool:
    return not any(record.name == name and record.getMessage().startswith(text) for name, text in NOTICES)


def _logs_dir() -> str | None:
    import ray

    try:
        return ray._private.worker.global_worker.node.get_logs_dir_path()  # no public API names the folder
    except AttributeError:  # a client connection (ray://) has no local node
        return None


def init(**kwargs) -> str | None:
    """`ray.init(**kwargs)` with Ray's INFO lines sent to its log folder; returns that folder."""
    global _last_dir
    import ray
    import ray.data  # noqa: F401  (configures the `ray.data` logger, whose console handler we turn down)
    from ray.util.debug import log_once

    ray_logger = logging.getLogger("ray")
    console = _console(ray_logger)
    for handler in set(ray_logger.handlers) - set(console):  # the file of an earlier session in this process
        handler.close()
    held = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
    ray_logger.handlers = [held]  # lines logged while Ray starts wait here until its log folder exists
    try:
        ray.init(**kwargs)
    except BaseException:
        ray_logger.handlers = console
        for record in held.buffer:  # Ray failed to start: whatever it said belongs on the terminal
            ray_logger.handle(record)
        raise
    _last_dir = _logs_dir()
    # The stages turn Ray Data's progress bars off (ours is the tqdm bar), a choice Ray Data warns about once.
    log_once("ray_data_progress_manager_disabled")
    to_file = logging.FileHandler(os.path.join(_last_dir, DRIVER_LOG)) if _last_dir else logging.NullHandler()
    to_file.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"))
    for handler in console + _console(logging.getLogger("ray.data")):
        handler.setLevel(logging.WARNING)
        handler.addFilter(_not_a_notice)  # once: the same filter is never added twice
    for record in held.buffer:
        to_file.handle(record)
        if record.levelno >= logging.WARNING:
            for handler in console:
                handler.handle(record)
    ray_logger.handlers = console + [to_file]
    return _last_dir


def folder() -> str | None:
    """The log folder of the Ray session this process is in, or last started or joined (None: no Ray yet)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return _logs_dir()
    return _last_dir
