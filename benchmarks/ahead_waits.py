"""What the just-in-time step ahead does in a live run: how often and how long a replica's
engine loop waits for the step ahead to be due, and the timer's inputs (each decode step's
observed time from its start on the device to its tokens back, the cost model's prediction,
their ratio, and the driver's time to form a step, with the part of it the executor's submit took: on one
device the launch of the step's kernels), and the interpreter's garbage-collection pauses in the
driver. It runs `kunserve bench --launch` in this process
with those points recorded (kunserve/engine/ahead_timer.py, AsyncEngine._wait_until); the
table gives percentiles (1, 10, 50, 90, 99) in milliseconds.

    python benchmarks/ahead_waits.py --out /tmp/ahead_waits.json -- --replicas 1 --model llama-3-8b \\
        --load-format dummy --memory-budget 40 --dataset sharegpt --num-prompts 200 --request-rate 4 \\
        --seed 0 --async-scheduling on

Everything after `--` goes to `kunserve bench --launch`.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np

from kunserve.cli import main as kunserve_main
from kunserve.engine.ahead_timer import AheadTimer
from kunserve.engine.async_engine import AsyncEngine
from kunserve.executor.in_process import InProcessExecutor
from kunserve.step import StepInput

PERCENTILES = (1, 10, 50, 90, 99)


class Recorder:
    """The loop's waits and the timer's inputs, recorded as the run goes."""

    def __init__(self) -> None:
        self.waits_s: list[float] = []  # due time less now, each time the loop looked (<= 0: no wait)
        self.observed_s: list[float] = []
        self.predicted_s: list[float] = []
        self.form_s: list[float] = []
        self.submit_s: list[float] = []
        self.gc_pauses: list[tuple[int, float, float]] = []  # (generation, start, seconds)
        self._gc_start = 0.0
        self._first_submit = self._last_collect = 0.0  # the serving window: pauses outside are not the loop's

    def install(self) -> None:
        wait_until, collected, submitted = AsyncEngine._wait_until, AheadTimer.collected, AheadTimer.submitted
        submit = InProcessExecutor.submit
        recorder = self

        def recorded_executor_submit(executor: InProcessExecutor, step: StepInput) -> None:
            start = time.perf_counter()
            recorder._first_submit = recorder._first_submit or start
            submit(executor, step)
            recorder.submit_s.append(time.perf_counter() - start)

        def recorded_gc(phase: str, info: dict) -> None:
            if phase == "start":
                recorder._gc_start = time.perf_counter()
            else:
                start = recorder._gc_start
                recorder.gc_pauses.append((info["generation"], start, time.perf_counter() - start))

        def recorded_wait(loop: AsyncEngine, due: float | None) -> None:
            if due is not None:
                recorder.waits_s.append(due - loop.engine.clock())
            wait_until(loop, due)

        def recorded_collect(timer: AheadTimer, now: float) -> None:
            recorder._last_collect = time.perf_counter()
            if timer._running is not None and timer._running[1] is not None:  # a decode step: timed
                start, predicted_s = timer._running
                recorder.observed_s.append(now - start)
                recorder.predicted_s.append(predicted_s)
            collected(timer, now)

        def recorded_submit(timer: AheadTimer, now: float, predicted_s: float | None, form_s: float) -> None:
            recorder.form_s.append(form_s)
            submitted(timer, now, predicted_s, form_s)

        AsyncEngine._wait_until = recorded_wait  # type: ignore[method-assign]
        AheadTimer.collected = recorded_collect  # type: ignore[method-assign]
        AheadTimer.submitted = recorded_submit  # type: ignore[method-assign]
        InProcessExecutor.submit = recorded_executor_submit  # type: ignore[method-assign]
        gc.callbacks.append(recorded_gc)

    def summary(self) -> dict:
        waits = np.array(self.waits_s)
        observed, predicted = np.array(self.observed_s), np.array(self.predicted_s)
        serving = [(gen, seconds) for gen, start, seconds in self.gc_pauses
                   if self._first_submit <= start <= self._last_collect]
        return {
            "loop_iterations_with_a_due_time": len(waits), "waited": int((waits > 0).sum()),
            "wait_ms": percentiles(waits[waits > 0] * 1e3), "observed_step_ms": percentiles(observed * 1e3),
            "predicted_step_ms": percentiles(predicted * 1e3),
            "observed_over_predicted": percentiles(observed / np.maximum(predicted, 1e-12)),
            "form_ms": percentiles(np.array(self.form_s) * 1e3),
            "submit_ms": percentiles(np.array(self.submit_s) * 1e3),
            **{f"gc_gen{generation}_pause_ms": percentiles(np.array(
                [seconds for gen, seconds in serving if gen == generation]) * 1e3) for generation in range(3)},
            "gc_collections_by_generation": [sum(gen == g for gen, _ in serving) for g in range(3)],
            "gc_pause_max_ms": max((seconds for _, seconds in serving), default=0.0) * 1e3,
        }


def percentiles(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(values, PERCENTILES)] if len(values) else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: arguments of kunserve bench --launch")
    args = parser.parse_args()
    bench_args = [arg for arg in args.bench_args if arg != "--"]
    recorder = Recorder()
    recorder.install()
    kunserve_main(["bench", "--launch", "--no-progress", *bench_args])
    summary = recorder.summary()
    print(f"loop looked {summary['loop_iterations_with_a_due_time']} times with a due time, waited {summary['waited']}")
    print("| ms (ratio: observed/predicted) | " + " | ".join(f"P{p}" for p in PERCENTILES) + " |")
    print("|" + " --- |" * (len(PERCENTILES) + 1))
    keys = ("wait_ms", "observed_step_ms", "predicted_step_ms", "observed_over_predicted", "form_ms", "submit_ms",
            "gc_gen0_pause_ms", "gc_gen1_pause_ms", "gc_gen2_pause_ms")
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{v:.3f}" for v in summary[key]) + " |")
    print(f"while serving: garbage collections by generation {summary['gc_collections_by_generation']}, "
          f"longest pause {summary['gc_pause_max_ms']:.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench_args": bench_args, **summary}, indent=1))


if __name__ == "__main__":
    main()
