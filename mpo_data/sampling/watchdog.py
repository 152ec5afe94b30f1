"""No silent stage run: a watchdog that says what a stalled run waits on, and interrupts that end it in one line.

A stage run waits on Ray (placement groups, Ray Data's tasks, the engine actors, the engines), and Ray waits
without a word for resources the cluster cannot give. The watchdog counts progress: a sample finished in an
engine or an engine became ready (the run's `progress.ProgressCounter`), a part written. After `watchdog_report_s` without any it prints what Ray has
pending (resource demands, placement groups, actors not alive, free resources), and again as often; after
`watchdog_timeout_s` it interrupts the run, which ends with one line (the parts written are kept; a rerun resumes).

SIGINT and SIGTERM (Ctrl-C, `scancel`, Slurm's time limit) end a run with one line too, printed at once, and
never in the middle of writing a part. The handler replaces the one Ray's core worker installs at `ray.init`
(a C++ stack dump on SIGTERM); a second signal ends the process at once.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from tqdm import tqdm

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict[str, Any] = {"signal": None, "holding": False, "pending": False, "quiet": False}


def say(line: str) -> None:
    """One line on stderr that leaves a running progress bar intact."""
    tqdm.write(line, file=sys.stderr)


def received() -> int | None:
    """The SIGINT or SIGTERM that interrupted this process (its line already printed), or None."""
    return _state["signal"]


def _on_signal(signum: int, frame: Any) -> None:
    if _state["quiet"]:  # the watchdog's own interrupt: its message is the run's error
        raise KeyboardInterrupt
    if _state["signal"] is not None:  # a second signal: stop now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _state["signal"] = signum
    say(
        f"interrupted by {signal.Signals(signum).name}: the parts written so far are kept; rerun the same command to resume"
    )
    if _state["holding"]:
        _state["pending"] = True  # raised once the part is written
        return
    raise KeyboardInterrupt  # (inside ray.get Ray turns any exception a handler raises into KeyboardInterrupt)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM end the run with one line; call after `ray.init` (whose SIGTERM handler prints a C++
    stack dump). Signal handlers belong to the main thread: elsewhere this does nothing."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _on_signal)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """A block (writing one part) that a signal does not cut: the interrupt takes effect once it is done."""
    _state["holding"] = True
    try:
        yield
    finally:
        _state["holding"] = False
    if _state["pending"]:
        _state["pending"] = False
        raise KeyboardInterrupt


def pending() -> list[str]:
    """What Ray has pending, one line per kind; a query that fails says so instead of failing the report."""
    import ray

    def resources() -> str:
        total, free = ray.cluster_resources(), ray.available_resources()
        return "free " + ", ".join(f"{k} {free.get(k, 0):g}/{total[k]:g}" for k in ("CPU", "GPU") if k in total)

    def demands() -> str:  # what `ray status` calls pending demands
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
        asks = [
            f"{d.bundle} x{d.count} (tasks/actors)" for r in status.ray_task_actor_demand for d in r.bundles_by_count
        ]
        asks += [
            f"{[b.bundle for b in d.bundles_by_count]} (placement group {(d.pg_id or '?')[:8]} {d.strategy})"
            for d in status.placement_group_demand
        ]
        return "; ".join(asks) or "none"

    def groups() -> str:
        table = ray.util.placement_group_table().values()
        return (
            "; ".join(
                f"{g['placement_group_id'][:8]} {g['state']} {list(g['bundles'].values())}"
                for g in table
                if g["state"] != "REMOVED"
            )
            or "none"
        )

    def actors() -> str:
        from ray._private import state  # ray.util.state needs the dashboard, which a private Ray has not

        waiting = [a for a in state.actors().values() if a.get("State") not in ("ALIVE", "DEAD")]
        return (
            "; ".join(f"{a.get('ActorClassName') or a.get('Name') or '?'} {a.get('State')}" for a in waiting) or "none"
        )

    lines = []
    for name, query in (
        ("resources", resources),
        ("waiting for resources", demands),
        ("placement groups", groups),
        ("actors not alive", actors),
    ):
        try:
            lines.append(f"  {name}: {query()}")
        except Exception as e:  # noqa: BLE001  (a report that fails must not end the run)
            lines.append(f"  {name}: could not read ({type(e).__name__}: {str(e)[:200]})")
    return lines


class Watchdog:
    """Driver side, from `start` to `stop`: reports a run without progress, and past the limit interrupts the
    main thread (`stalled` says why)."""

    def __init__(self, what: str, report_s: float, timeout_s: float, counter: Any):
        self.what, self.report_s, self.timeout_s = what, report_s, timeout_s
        self.counter = counter  # the run's progress.ProgressCounter: the engines' sign of life
        self.stalled: str | None = None
        self._stop = threading.Event()
        self._progress = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mpo-data-watchdog", daemon=True)

    def progress(self) -> None:
        """The driver wrote a part."""
        self._progress.set()

    def start(self) -> Watchdog:
        _state["quiet"] = False
        if self.report_s or self.timeout_s:
            self._thread.start()
        return self

    def stop(self) -> None:
        _state["quiet"] = False  # (its interrupt, if any, has been raised by now)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def _beats(self, last: tuple) -> tuple:
        """What the engines have done: an engine ready, samples finished (`last` while the counter is unreachable)."""
        import ray

        try:
            snapshot = ray.get(self.counter.read.remote(), timeout=10)
        except Exception:  # noqa: BLE001  (an unreachable counter is no progress)
            return last
        return snapshot.engine_ready_at, snapshot.samples

    def _watch(self) -> None:
        limits = [s for s in (self.report_s, self.timeout_s) if s]
        poll = min(5.0, min(limits) / 2)
        beats, since, reported = (None, 0), time.monotonic(), 0
        while not self._stop.wait(poll):
            now_beats = self._beats(beats)
            if now_beats != beats or self._progress.is_set():
                beats, since, reported = now_beats, time.monotonic(), 0
                self._progress.clear()
                continue
            idle = time.monotonic() - since
            if self.timeout_s and idle >= self.timeout_s:
                self.stalled = f"{self.what}: no request finished and no part written for {self.timeout_s:g} s (--watchdog-timeout-s)"
                _state["quiet"] = True
                _thread.interrupt_main(signal.SIGINT)
                return
            if self.report_s and idle >= self.report_s * (reported + 1):
                reported += 1
                say(
                    f"{self.what}: no request finished and no part written for {idle:.0f} s; Ray has pending:\n"
                    + "\n".join(pending())
                )
