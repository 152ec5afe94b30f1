"""The progress logic on its own: the windowed tokens/s and the engine-side counting (a real run's bar is
checked in tests/test_stages.py, test_correctness_with_images_on_tiny_vlm)."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from mpo_data.sampling.engine import Completion, GenerationResult
from mpo_data.sampling.progress import EngineProgress, ProgressCounter, Snapshot, WindowedRate


def test_windowed_rate_needs_two_points_at_different_times():
    rate = WindowedRate(10)
    assert rate.rate() is None
    rate.add(5.0, 0)
    assert rate.rate() is None
    rate.add(5.0, 10)
    assert rate.rate() is None
    rate.add(7.0, 10)
    assert rate.rate() == pytest.approx(5.0)


def test_windowed_rate_counts_from_the_first_point_until_the_window_is_full():
    rate = WindowedRate(10)
    rate.add(100.0, 0)  # the engine ready: its start-up before this never enters the rate
    rate.add(102.0, 0)  # nothing finished yet
    rate.add(104.0, 400)
    assert rate.rate() == pytest.approx(100.0)


def test_windowed_rate_forgets_what_is_older_than_the_window():
    rate = WindowedRate(10)
    for t in range(0, 21):  # 100 units/s for 20 s ...
        rate.add(float(t), 100.0 * t)
    for t in range(21, 31):  # ... then 10 units/s
        rate.add(float(t), 2000 + 10.0 * (t - 20))
    assert rate.rate() == pytest.approx(10.0)  # the last 10 s only
    assert len(rate.points) == 11


def test_windowed_rate_spans_at_least_the_window_when_points_are_sparse():
    rate = WindowedRate(10)
    rate.add(0.0, 0)
    rate.add(8.0, 80)
    rate.add(25.0, 250)  # 25 - 10 = 15: the newest point at least 10 s old is t=8
    assert rate.points[0] == (8.0, 80)
    assert rate.rate() == pytest.approx(10.0)


def test_windowed_rate_widened_to_the_longest_request_reads_a_burst_of_finishes_truthfully():
    """Every request enters at t=0 and they finish from 9 s to 34 s, 100 tokens each (at 660 tokens/s over the
    run): a 20 s window counts tokens made before it began; one as long as the longest request does not."""
    finishes = [9.0 + 25.0 * i / 223 for i in range(224)]
    narrow, widened = WindowedRate(20), WindowedRate(20)
    for rate in (narrow, widened):
        rate.add(0.0, 0)
    for i, at in enumerate(finishes, 1):
        narrow.add(at, 100.0 * i)
        widened.widen(at)  # this request spent `at` seconds in the engine
        widened.add(at, 100.0 * i)
    assert widened.rate() == pytest.approx(22400 / 34, rel=0.01)
    assert narrow.rate() > 1.3 * widened.rate()
    widened.widen(5.0)
    assert widened.window_s == 34.0  # never narrows


class LocalHandle:
    """A ProgressCounter called in-process the way an actor handle is called (`handle.method.remote(...)`)."""

    def __init__(self, counter: ProgressCounter):
        self.counter = counter

    def __getattr__(self, name):
        method = getattr(self.counter, name)
        return type("Method", (), {"remote": staticmethod(lambda *a: method(*a))})


def _done(result: GenerationResult | None = None, error: Exception | None = None) -> Future:
    future: Future = Future()
    future.set_exception(error) if error else future.set_result(result)
    return future


def test_engine_progress_counts_generated_samples_and_tokens_only():
    counter = ProgressCounter()
    progress = EngineProgress(LocalHandle(counter), every_s=3600)  # pushes only when told, here
    assert counter.read().engine_ready_at is not None and progress.push() is None
    assert counter.read().first_request_at is None  # ready, but no request yet: engine time has not begun
    first = progress.submitted()
    assert progress.submitted() >= first  # only the first request's time goes to the counter
    progress.finished(_done(GenerationResult(7, [Completion("a", 3, "stop"), Completion("b", 5, "length")])), first)
    progress.finished(_done(GenerationResult(0, [], refused="vLLM refused the request: too long")), first - 99)
    progress.finished(
        _done(error=RuntimeError("engine died")), first - 99
    )  # the caller hears of it, the bar counts nothing
    assert counter.read().samples == 0  # counted, not yet pushed
    progress.push()
    progress.finished(_done(GenerationResult(4, [Completion("c", 2, "stop")])), first - 30.0)
    progress.push()
    s = counter.read()
    assert (s.samples, s.output_tokens) == (3, 10)
    assert 30.0 <= s.longest_request_s < 60.0  # only requests that made samples count, the refused one did not
    assert s.engine_ready_at <= s.first_request_at <= s.first_sample_at <= s.last_sample_at
    assert progress.push() is None  # nothing new


def test_counter_takes_the_first_engine_ready_and_the_span_of_all_engines():
    counter = ProgressCounter()
    counter.engine_ready(20.0)
    counter.engine_ready(10.0)
    counter.first_request(21.0)
    counter.first_request(11.0)
    counter.add(2, 30, 15.0, 18.0, 7.0)
    counter.add(1, 10, 12.0, 25.0, 4.0)
    assert counter.read() == Snapshot(3, 40, 10.0, 12.0, 25.0, 11.0, 7.0)
    assert counter.read().engine_s() == 14.0  # from the first request, not from the engine ready at 10.0
    assert Snapshot().engine_s() is None
    assert Snapshot(engine_ready_at=1.0, last_sample_at=5.0).engine_s() is None  # no request: no engine time
