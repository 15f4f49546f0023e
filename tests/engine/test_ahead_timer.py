"""Forming the step scheduled ahead just in time (kunserve/engine/ahead_timer.py): a replica
forms it shortly before the running step's predicted end (its driver's forming time and a
slack of the prediction before it), from the cost model's prediction scaled by what steps
took; nothing is due later while nothing has been observed, while no step runs, when a
step is already queued behind the running one, or when the running step has a prompt chunk
(only decode steps are timed). The engine loop waits for that time between
steps; an arrival ends the wait (the step formed then takes it), and neither a stop nor a
transition is held up by it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kunserve import EngineConfig, LLMEngine, SamplingParams
from kunserve.engine.ahead_timer import RECENT_STEPS, AheadTimer, lead_s
from kunserve.engine.async_engine import AsyncEngine

FORM_S = 0.001
SLACK = 0.25
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)  # the loop tests' requests


def observed_timer(step_s: float, predicted_s: float) -> AheadTimer:
    """A timer that saw one step of `predicted_s` take `step_s`, with the next submitted
    behind it, and has just collected that one (the next now runs alone)."""
    timer = AheadTimer(SLACK)
    timer.submitted(0.0, predicted_s, FORM_S)
    timer.submitted(0.0, predicted_s, FORM_S)
    timer.collected(step_s)
    return timer


def test_nothing_is_due_later_before_a_step_was_observed() -> None:
    timer = AheadTimer(SLACK)
    timer.submitted(0.0, 0.01, FORM_S)
    assert timer.due_at() is None


def test_the_next_step_is_due_the_lead_before_the_running_steps_expected_end() -> None:
    timer = observed_timer(step_s=0.02, predicted_s=0.01)  # steps take twice the prediction here
    expected_s = 2 * 0.01
    assert timer.due_at() == pytest.approx(0.02 + expected_s - lead_s(expected_s, FORM_S, SLACK))


def test_the_smallest_recent_ratio_of_observed_to_predicted_scales_the_prediction() -> None:
    timer = observed_timer(step_s=0.03, predicted_s=0.01)
    timer.submitted(0.03, 0.01, FORM_S)
    timer.collected(0.04)  # this one took its prediction: ratio 1, the smallest
    timer.submitted(0.04, 0.01, FORM_S)
    timer.collected(0.045)
    timer.submitted(0.045, 0.01, FORM_S)
    assert timer.due_at() is None  # queued behind the running step: nothing to form
    timer.collected(0.05)
    # The smallest of the ratios 3, 1, 0.5 and 0.5 (0.045 - 0.04 = 0.005 over 0.01).
    assert timer.due_at() == pytest.approx(0.05 + 0.005 - lead_s(0.005, FORM_S, SLACK))


def test_the_step_ahead_of_a_step_with_a_prompt_chunk_is_formed_at_once() -> None:
    timer = observed_timer(step_s=0.01, predicted_s=0.01)
    timer.collected(0.02)
    timer.submitted(0.02, None, FORM_S)
    assert timer.due_at() is None


def test_a_step_with_a_prompt_chunk_leaves_the_decode_steps_timing_alone() -> None:
    timer = observed_timer(step_s=0.01, predicted_s=0.01)
    timer.collected(0.02)
    timer.submitted(0.02, None, 0.03)  # a prompt step, slow to form: neither its time nor its forming kept
    timer.collected(0.04)
    timer.submitted(0.04, 0.01, FORM_S)
    assert timer.due_at() == pytest.approx(0.04 + 0.01 - lead_s(0.01, FORM_S, SLACK))


def test_nothing_is_due_later_when_no_step_runs() -> None:
    timer = observed_timer(step_s=0.02, predicted_s=0.01)
    timer.collected(0.04)
    assert timer.due_at() is None


def test_a_slack_of_one_forms_the_next_step_as_the_running_one_starts() -> None:
    timer = AheadTimer(1.0)
    timer.submitted(0.0, 0.01, FORM_S)
    timer.submitted(0.0, 0.01, FORM_S)
    timer.collected(0.02)
    due = timer.due_at()
    assert due is not None and due <= 0.02


def formation_lateness(true_s: list[float], predicted_s: float) -> list[float]:
    """A replica's loop forming each step ahead when the timer says (each forming taking
    FORM_S), on a device whose steps take `true_s` (one per step) against a prediction of
    `predicted_s` each: per step, how late the next step reached the device after the running
    one ended (<= 0: in time)."""
    timer = AheadTimer(SLACK)
    now = 0.0
    timer.submitted(now, predicted_s, FORM_S)
    running_end = now + true_s[0]
    lateness = []
    for step_s in true_s[1:]:
        due = timer.due_at()
        now = max(now, due if due is not None else now) + FORM_S
        timer.submitted(now, predicted_s, FORM_S)  # queued behind the running step, or on an idle device
        lateness.append(now - running_end)
        now = max(now, running_end)
        timer.collected(now)
        running_end = now + step_s
    return lateness


def test_steps_that_become_faster_than_observed_are_formed_late_only_for_a_few_steps() -> None:
    lateness = formation_lateness([0.01] * 20 + [0.0025] * 40, predicted_s=0.01)
    assert max(lateness[20:23]) > 0  # the steps took a quarter of what was observed before
    assert max(lateness[-20:]) <= 0


def test_a_cost_model_off_by_a_constant_factor_forms_every_step_in_time() -> None:
    for predicted_s in (0.005, 0.03):
        assert max(formation_lateness([0.01] * 40, predicted_s)) <= 0


def test_steady_steps_are_formed_within_their_lead_of_the_running_steps_end() -> None:
    lateness = formation_lateness([0.01] * 20, predicted_s=0.01)
    assert all(-lead_s(0.01, FORM_S, SLACK) <= late <= 0 for late in lateness[1:])


class SteppedClock:
    """A clock that moves only when told (each collected step adds its time)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_replica_scheduling_ahead_is_due_within_the_running_steps_observed_time(llama_dir: Path) -> None:
    clock = SteppedClock()
    engine = LLMEngine(EngineConfig(model=str(llama_dir), max_model_len=128, async_scheduling="on",
                                    ahead_slack=SLACK), clock=clock)
    collect = engine.executor.collect

    def collect_after_ten_seconds() -> np.ndarray:
        clock.now += 10.0  # far above the driver's forming time (on CPU it computes the step)
        return collect()

    engine.executor.collect = collect_after_ten_seconds  # type: ignore[method-assign]
    engine.add_request("r", [1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    for _ in range(RECENT_STEPS + 4):  # the prefill's step out of the timer's window: decodes alike
        engine.step()
    start = clock.now  # the step in flight started as the one before came back
    due = engine.next_step_due_at()
    assert due is not None and start + 10.0 * (1 - SLACK) - 1.0 < due < start + 10.0


def test_a_replica_forms_the_step_behind_a_prompt_step_at_once(llama_dir: Path) -> None:
    clock = SteppedClock()
    engine = LLMEngine(EngineConfig(model=str(llama_dir), max_model_len=128, async_scheduling="on"), clock=clock)
    engine.add_request("r", [1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    for _ in range(RECENT_STEPS + 4):
        engine.step()
    assert engine.next_step_due_at() is not None  # decodes alone: timed
    engine.add_request("late", list(range(1, 21)), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.step()  # submits the step with the new prompt, completes the decode step before it
    assert engine.next_step_due_at() is None


def test_a_replica_not_scheduling_ahead_forms_its_steps_at_once(llama_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(llama_dir), max_model_len=128, async_scheduling="off"))
    engine.add_request("r", [1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.next_step_due_at() is None


class DueLater:
    """An engine's `step` recording when it is called; its next step due `wait_s` after each."""

    def __init__(self, engine: LLMEngine, wait_s: float) -> None:
        self.engine, self.wait_s = engine, wait_s
        self.step_times: list[float] = []
        self.due_times: list[float] = []
        self._step = engine.step
        engine.step = self.step  # type: ignore[method-assign]
        engine.next_step_due_at = self.due  # type: ignore[method-assign]

    def step(self) -> list:
        self.step_times.append(self.engine.clock())
        return self._step()

    def due(self) -> float:
        self.due_times.append(self.engine.clock() + self.wait_s)
        return self.due_times[-1]


def run_loop(engine: LLMEngine, body: Callable[[AsyncEngine], None]) -> None:
    """Start an engine loop on `engine`, run `body(loop)` in a thread, stop the loop."""

    async def main() -> None:
        loop = AsyncEngine(engine)
        loop.start(asyncio.get_running_loop())
        try:
            await asyncio.to_thread(body, loop)
        finally:
            loop.stop()

    asyncio.run(main())


def test_the_engine_loop_waits_between_steps_until_the_next_step_is_due(llama_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(llama_dir), max_model_len=128))
    recorder = DueLater(engine, wait_s=0.05)

    def body(loop: AsyncEngine) -> None:
        loop.adopt_unstarted([engine.make_sequence("r", [1, 2, 3], PARAMS)])
        deadline = time.monotonic() + 60
        while engine.has_unfinished_requests() or not recorder.step_times:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    run_loop(engine, body)
    pairs = list(zip(recorder.due_times, recorder.step_times[1:], strict=False))
    assert len(pairs) >= 5 and all(step >= due for due, step in pairs)


def waiting_an_hour(llama_dir: Path) -> tuple[LLMEngine, DueLater]:
    """An engine whose every next step is due an hour after the one before."""
    engine = LLMEngine(EngineConfig(model=str(llama_dir), max_model_len=128))
    return engine, DueLater(engine, wait_s=3600.0)


def start_waiting(loop: AsyncEngine, engine: LLMEngine, recorder: DueLater) -> None:
    """Give the loop a request and return once it ran a step and waits for the next."""
    loop.adopt_unstarted([engine.make_sequence("first", [1, 2, 3], PARAMS)])
    while not recorder.due_times:
        time.sleep(0.01)


def test_a_stop_ends_the_engine_loops_wait_for_the_next_step(llama_dir: Path) -> None:
    engine, recorder = waiting_an_hour(llama_dir)
    stopped = threading.Event()

    def body(loop: AsyncEngine) -> None:
        start_waiting(loop, engine, recorder)
        loop.stop()  # joins the loop thread (a bounded wait: it warns and leaves it otherwise)
        stopped.set()

    run_loop(engine, body)
    assert stopped.is_set() and len(recorder.step_times) == 1


def test_an_arrival_ends_the_engine_loops_wait_and_joins_the_step_formed_then(llama_dir: Path) -> None:
    engine, recorder = waiting_an_hour(llama_dir)
    scheduled_late: list[bool] = []

    def body(loop: AsyncEngine) -> None:
        start_waiting(loop, engine, recorder)
        late = engine.make_sequence("late", [4, 5, 6], PARAMS)
        loop.adopt_unstarted([late])
        deadline = time.monotonic() + 30
        while late.metrics.first_scheduled_time is None and time.monotonic() < deadline:
            time.sleep(0.01)
        scheduled_late.append(late.metrics.first_scheduled_time is not None)

    run_loop(engine, body)
    assert scheduled_late == [True] and len(recorder.step_times) == 2


def test_a_transition_pauses_the_engine_loop_while_it_waits_for_the_next_step(llama_dir: Path) -> None:
    engine, recorder = waiting_an_hour(llama_dir)
    paused = threading.Event()

    def body(loop: AsyncEngine) -> None:
        start_waiting(loop, engine, recorder)
        pauser = threading.Thread(target=lambda: (loop.pause(), paused.set(), loop.resume()), daemon=True)
        pauser.start()
        pauser.join(30)

    run_loop(engine, body)
    assert paused.is_set()
