"""Host time of the control plane per decode step: scheduling, step building, output processing.

The executor is replaced by one that returns tokens at once, so what is timed is exactly the
work that runs while a GPU would sit idle between steps (no device needed).

    python benchmarks/control_plane.py --out results/control_plane.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from kunserve import LLM, SamplingParams
from kunserve.layout import ArenaLayout
from kunserve.sampling_params import RequestOutputKind
from kunserve.step import StepInput

CONTEXT = 1024
STEPS = 100


class InstantExecutor:
    """Samples token 0 for every row without running a model."""

    max_in_flight = 1

    def __init__(self, layout: ArenaLayout) -> None:
        self.layout = layout
        self._rows = 0

    def submit(self, step: StepInput) -> None:
        self._rows = len(step.sample_rows)

    def collect(self) -> np.ndarray:
        return np.zeros(self._rows, dtype=np.int64)


def time_batch(batch: int) -> float:
    max_tokens = 4 * STEPS  # early requests decode while later ones still prefill
    llm = LLM(num_kv_blocks=batch * -(-(CONTEXT + max_tokens) // 16), max_model_len=CONTEXT + max_tokens, max_num_seqs=batch,
              max_num_batched_tokens=8192)
    engine = llm.engine
    engine.executor = InstantExecutor(engine.executor.layout)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    rng = np.random.default_rng(0)
    for i in range(batch):
        engine.add_request(str(i), rng.integers(0, engine.spec.vocab_size, CONTEXT).tolist(), params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < len(s) - 1 for s in engine.scheduler.running):
        engine.step()
    start = time.perf_counter()
    for _ in range(STEPS):
        engine.step()
    return (time.perf_counter() - start) / STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32,128,256")
    parser.add_argument("--out", default="results/control_plane.json")
    args = parser.parse_args()
    rows = [{"batch": b, "ms_per_step": time_batch(b) * 1e3} for b in map(int, args.batches.split(","))]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "context": CONTEXT, "rows": rows}, indent=2))
    print(f"{'batch':>6} {'control plane ms/step':>22}")
    for r in rows:
        print(f"{r['batch']:>6} {r['ms_per_step']:>22.2f}")


if __name__ == "__main__":
    main()
