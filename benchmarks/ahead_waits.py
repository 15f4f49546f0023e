"""What the just-in-time step ahead does in a live run: how often and how long a replica's
engine loop waits for the step ahead to be due, and the timer's inputs (each step's observed
time from its start on the device to its tokens back, the cost model's prediction, their
ratio, and the driver's time to form a step). It runs `kunserve bench --launch` in this process
with those points recorded (kunserve/engine/ahead_timer.py, AsyncEngine._wait_until); the
table gives percentiles (1, 10, 50, 90, 99) in milliseconds.

    python benchmarks/ahead_waits.py --out /tmp/ahead_waits.json -- --replicas 1 --model llama-3-8b \\
        --load-format dummy --memory-budget 40 --dataset sharegpt --num-prompts 200 --request-rate 4 \\
        --seed 0 --async-scheduling on

Everything after `--` goes to `kunserve bench --launch`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from kunserve.cli import main as kunserve_main
from kunserve.engine.ahead_timer import AheadTimer
from kunserve.engine.async_engine import AsyncEngine

PERCENTILES = (1, 10, 50, 90, 99)


class Recorder:
    """The loop's waits and the timer's inputs, recorded as the run goes."""

    def __init__(self) -> None:
        self.waits_s: list[float] = []  # due time less now, each time the loop looked (<= 0: no wait)
        self.observed_s: list[float] = []
        self.predicted_s: list[float] = []
        self.form_s: list[float] = []

    def install(self) -> None:
        wait_until, collected, submitted = AsyncEngine._wait_until, AheadTimer.collected, AheadTimer.submitted
        recorder = self

        def recorded_wait(loop: AsyncEngine, due: float | None) -> None:
            if due is not None:
                recorder.waits_s.append(due - loop.engine.clock())
            wait_until(loop, due)

        def recorded_collect(timer: AheadTimer, now: float) -> None:
            if timer._running is not None:
                start, predicted_s = timer._running
                recorder.observed_s.append(now - start)
                recorder.predicted_s.append(predicted_s)
            collected(timer, now)

        def recorded_submit(timer: AheadTimer, now: float, predicted_s: float, form_s: float) -> None:
            recorder.form_s.append(form_s)
            submitted(timer, now, predicted_s, form_s)

        AsyncEngine._wait_until = recorded_wait  # type: ignore[method-assign]
        AheadTimer.collected = recorded_collect  # type: ignore[method-assign]
        AheadTimer.submitted = recorded_submit  # type: ignore[method-assign]

    def summary(self) -> dict:
        waits = np.array(self.waits_s)
        observed, predicted = np.array(self.observed_s), np.array(self.predicted_s)
        return {
            "loop_iterations_with_a_due_time": len(waits), "waited": int((waits > 0).sum()),
            "wait_ms": percentiles(waits[waits > 0] * 1e3), "observed_step_ms": percentiles(observed * 1e3),
            "predicted_step_ms": percentiles(predicted * 1e3),
            "observed_over_predicted": percentiles(observed / np.maximum(predicted, 1e-12)),
            "form_ms": percentiles(np.array(self.form_s) * 1e3),
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
    for key in ("wait_ms", "observed_step_ms", "predicted_step_ms", "observed_over_predicted", "form_ms"):
        print(f"| {key} | " + " | ".join(f"{v:.3f}" for v in summary[key]) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench_args": bench_args, **summary}, indent=1))


if __name__ == "__main__":
    main()
