"""A stage's progress as the engines make it: samples counted as their requests finish, tokens/s over recent engine time.

With continuous feeding every item of a small run is inside the engine at once and the first part file is
written minutes in, so a bar driven by parts sits at 0 and then jumps. Instead each engine actor counts
what finishes in its engine (`EngineProgress`, a future's done-callback: no change to the feeder) and a
thread pushes the counts to one small Ray actor (`ProgressCounter`, num_cpus=0) at most every `PUSH_EVERY_S`,
and once more before a call returns; the driver reads the counter from a thread every `POLL_EVERY_S` and
draws the tqdm bar (`StageProgress`). One small actor call a second per engine: nothing next to sampling.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

# Every push and read wakes Ray processes on the engine's cores (engine actor, counter, driver): 2 s keeps the
# bar live at a quarter of the wake-ups of 0.5 s (measured in docs/throughput.md).
PUSH_EVERY_S = 2.0  # an engine actor's pushes to the counter
POLL_EVERY_S = 2.0  # the driver's reads of the counter
WINDOW_S = 20.0  # the bar's tokens/s: over at least this much recent engine time (see `StageProgress`)


class WindowedRate:
    """Units/s over the last `window_s` seconds, from (time, running total) points added in time order.

    The window starts at the newest point at least `window_s` old (so it spans window_s to window_s plus one
    point spacing), or at the first point while fewer than `window_s` seconds have passed: add the first
    request's time with a total of 0 first, and the rate covers engine time only, never its start-up.
    """

    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self.points: deque[tuple[float, float]] = deque()

    def widen(self, window_s: float) -> None:
        """Never narrows: points already dropped stay dropped, so a window that shrank could not be honoured."""
        self.window_s = max(self.window_s, window_s)

    def add(self, at: float, total: float) -> None:
        self.points.append((at, total))
        while len(self.points) > 2 and self.points[1][0] <= at - self.window_s:
            self.points.popleft()

    def rate(self) -> float | None:
        """None until two points at different times."""
        if len(self.points) < 2:
            return None
        (start, first), (end, last) = self.points[0], self.points[-1]
        return (last - first) / (end - start) if end > start else None


@dataclass
class Snapshot:
    """What the engines have finished so far (times are wall clock, `time.time()`, of the engine actors)."""

    samples: int = 0
    output_tokens: int = 0
    engine_ready_at: float | None = None  # the first engine ready
    first_sample_at: float | None = None
    last_sample_at: float | None = None
    first_request_at: float | None = None  # the first request handed to an engine
    longest_request_s: float = 0.0  # the longest time from a request handed to an engine to its samples finished

    def engine_s(self) -> float | None:
        """Engine time: from the first request handed to an engine to the last sample finished. Not from the
        engine ready: Ray Data starts the actor's calls a while after (`first_request_s` - `engine_start_s` in
        summary.json), and a peer's figure (vllm.LLM's chat call, Ray Data LLM's engine calls) starts at its first request too."""
        if self.first_request_at is None or self.last_sample_at is None:
            return None
        return self.last_sample_at - self.first_request_at


class ProgressCounter:
    """Ray actor: the sums of what every engine actor reported; the driver reads them."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def engine_ready(self, at: float) -> None:
        ready = self.snapshot.engine_ready_at
        self.snapshot.engine_ready_at = at if ready is None else min(ready, at)

    def first_request(self, at: float) -> None:
        first = self.snapshot.first_request_at
        self.snapshot.first_request_at = at if first is None else min(first, at)

    def add(self, samples: int, output_tokens: int, first_at: float, last_at: float, longest_s: float = 0.0) -> None:
        s = self.snapshot
        s.longest_request_s = max(s.longest_request_s, longest_s)
        s.samples += samples
        s.output_tokens += output_tokens
        s.first_sample_at = first_at if s.first_sample_at is None else min(s.first_sample_at, first_at)
        s.last_sample_at = last_at if s.last_sample_at is None else max(s.last_sample_at, last_at)

    def read(self) -> Snapshot:
        return self.snapshot


def start_counter() -> Any:
    """The run's counter actor: no CPU reserved, so it never keeps an engine actor from being placed."""
    import ray

    return ray.remote(num_cpus=0)(ProgressCounter).remote()


class EngineProgress:
    """In an engine actor: counts its finished requests' samples and output tokens, and pushes them to the counter."""

    def __init__(self, counter: Any, every_s: float = PUSH_EVERY_S):
        self.counter = counter
        self._lock = threading.Lock()
        self._samples = self._tokens = 0
        self._first_at = self._last_at = self._longest_s = 0.0
        self._requested = False
        counter.engine_ready.remote(time.time())
        threading.Thread(target=self._push_every, args=(every_s,), name="progress-push", daemon=True).start()

    def submitted(self) -> float:
        """Before a request goes to the feeder: its time, for `finished`; the first one's goes to the counter
        (engine time starts there)."""
        now = time.time()
        with self._lock:
            if self._requested:
                return now
            self._requested = True
        self.counter.first_request.remote(now)
        return now

    def finished(self, future: Future, submitted_at: float) -> None:
        """A request future's done-callback (runs in the feeder thread): count its samples, if it made any."""
        if future.cancelled() or future.exception() is not None:
            return
        completions = future.result().completions
        if not completions:  # refused by vLLM or an undecodable image: nothing generated
            return
        now = time.time()
        with self._lock:
            if not self._samples:
                self._first_at = now
            self._samples += len(completions)
            self._tokens += sum(c.output_tokens for c in completions)
            self._last_at = now
            self._longest_s = max(self._longest_s, now - submitted_at)

    def push(self) -> Any:
        """Send what finished since the last push; the ObjectRef of that call, or None if nothing did."""
        with self._lock:
            if not self._samples:
                return None
            args = (self._samples, self._tokens, self._first_at, self._last_at, self._longest_s)
            self._samples = self._tokens = 0
        return self.counter.add.remote(*args)

    def _push_every(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            self.push()


class StageProgress:
    """The driver's bar: samples and tokens/s from the counter (read by a thread), parts and items from the parts written.

    Tokens count when their request finishes, so the tokens/s window is at least as long as the longest time a
    request has spent in an engine: a shorter one would count tokens made before it began (a small run whose
    requests all enter at once read 1,124 tok/s over 20 s at its end, where its engine made 660.7).
    """

    def __init__(self, counter: Any, total: int, desc: str, window_s: float = WINDOW_S, every_s: float = POLL_EVERY_S):
        self.counter = counter
        self.bar = tqdm(total=total, unit="sample", desc=desc, file=sys.stderr)
        self.snapshot = Snapshot()
        self.rate = WindowedRate(window_s)
        self.parts = {"parts": 0, "items": 0, "kept": 0, "dropped": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_every, args=(every_s,), name="progress-poll", daemon=True)
        self._thread.start()

    def sync(self) -> Snapshot:
        """Read the counter now and redraw. The driver calls it before writing a part, so the bar always
        counts at least the samples of the parts written."""
        import ray

        with self._lock:  # the read too: two readers must not store their snapshots out of order
            snapshot = ray.get(self.counter.read.remote())
            if snapshot.first_request_at is not None:
                if not self.rate.points:  # engine time starts at the first request
                    self.rate.add(snapshot.first_request_at, 0)
                self.rate.widen(snapshot.longest_request_s)
                self.rate.add(max(time.time(), snapshot.last_sample_at or 0.0), snapshot.output_tokens)
            self.snapshot = snapshot
            self._draw()
        return snapshot

    def written(self, parts: int, items: int, kept: int, dropped: int) -> None:
        """After a part is written: the postfix's counts."""
        with self._lock:
            self.parts = {"parts": parts, "items": items, "kept": kept, "dropped": dropped}
            self._draw()

    def _draw(self) -> None:
        self.bar.update(self.snapshot.samples - self.bar.n)
        rate = self.rate.rate()
        self.bar.set_postfix(**self.parts, tok_s=f"{rate:.1f}" if rate is not None else "-")

    def _poll_every(self, every_s: float) -> None:
        import ray

        while not self._stop.wait(every_s):
            try:
                self.sync()
            except ray.exceptions.RayError:  # the counter is gone (the run is failing): the driver says why
                return

    def close(self) -> Snapshot:
        """Stop polling, draw the final counts, close the bar; the final snapshot (the last one read if the
        counter is gone, so a failing run reports its own error, not the counter's)."""
        import ray

        self._stop.set()
        self._thread.join()
        try:
            self.sync()
        except ray.exceptions.RayError:
            pass
        self.bar.close()
        return self.snapshot
