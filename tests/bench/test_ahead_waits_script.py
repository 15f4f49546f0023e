"""benchmarks/ahead_waits.py instruments a live run through the engine's internals (the
timer's `submitted` and `collected`, the loop's wait, the executor's submit): specified here on
the embedded tiny model, so a change of those internals that breaks it fails in CI rather than
on the next GPU session. It runs in its own process: it patches classes for the whole process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ahead_waits_records_the_timers_inputs_and_the_loops_due_times(tmp_path: Path) -> None:
    out = tmp_path / "waits.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "ahead_waits.py"), "--out", str(out), "--",
                    "--replicas", "1", "--num-prompts", "6", "--request-rate", "20", "--output-len", "16",
                    "--async-scheduling", "on"], check=True, cwd=REPO, timeout=300)
    summary = json.loads(out.read_text())
    assert summary["loop_iterations_with_a_due_time"] > 0
    for key in ("observed_step_ms", "predicted_step_ms", "form_ms", "submit_ms"):
        assert len(summary[key]) == 5, key  # its percentiles: every point was recorded
