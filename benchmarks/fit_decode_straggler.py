"""Fit the decode attention kernel's straggler (kunserve/engine/cost_model.py:
`StepCoefficients.layer_longest_s`) to decode steps measured on a long-generation burst, and
write it into the cost profile with a note naming the measurement.

The steps come from benchmarks/host_overhead.py (every step's wall time and shape, with the
longest decode context), run with scheduling ahead on, so that a step's wall time is its
device time. Only decode steps without swaps are used. The kernel's key splits
(`decode_split_width`, `max_decode_splits`) are its own constants
(kunserve/kernels/triton_attention.py) for a GPU of `--num-sms` SMs; the one coefficient left is
chosen to minimize the mean relative error of the step times.

    python benchmarks/fit_decode_straggler.py docs/results/longgen_h200_2026-12-02/steps_recompute_async.json \\
        --num-sms 132 --profile kunserve/engine/profiles/llama-3-8b.json
    python benchmarks/fit_decode_straggler.py docs/results/longgen_qwen32b_h200_2026-12-03/steps_qwen32b_async.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from kunserve.engine.cost_model import CostModel, StepCoefficients, StepShape, profile_path
from kunserve.kernels.triton_attention import _DECODE_PROGRAMS_PER_SM, _MAX_DECODE_SPLITS
from kunserve.model.presets import resolve_model

H200_SMS = 132
# Candidate coefficients, seconds per key of the longest slice per layer: a grid, then a finer
# one around the best (the error is smooth and has one minimum in this range).
COARSE_GRID = np.linspace(0.0, 2e-7, 201)
FINE_STEPS = 201


def decode_steps(records: list[dict]) -> list[dict]:
    return [r for r in records if r["prefill_pairs"] == 0 and r["swapped_blocks"] == 0 and r["num_seqs"] > 0]


def shape_of(record: dict) -> StepShape:
    return StepShape(record["num_tokens"], record["decode_context"], 0, record["num_seqs"],
                     record["max_decode_context"])


def mean_relative_error(cost: CostModel, records: list[dict], layers: int) -> float:
    predicted = np.array([cost.step_time(shape_of(r), layers) for r in records])
    measured = np.array([r["seconds"] for r in records])
    return float(np.mean(np.abs(predicted - measured) / measured))


def with_straggler(cost: CostModel, layer_longest_s: float, width: int, max_splits: int) -> CostModel:
    step: StepCoefficients = dataclasses.replace(cost.step, layer_longest_s=layer_longest_s,
                                                 decode_split_width=width, max_decode_splits=max_splits)
    return dataclasses.replace(cost, step=step)


def fit(cost: CostModel, records: list[dict], layers: int, width: int, max_splits: int) -> tuple[float, float]:
    """The coefficient with the least mean relative error, and that error."""
    def error(k: float) -> float:
        return mean_relative_error(with_straggler(cost, k, width, max_splits), records, layers)

    coarse = [error(k) for k in COARSE_GRID]
    best = int(np.argmin(coarse))
    lo, hi = COARSE_GRID[max(best - 1, 0)], COARSE_GRID[min(best + 1, len(COARSE_GRID) - 1)]
    fine = np.linspace(lo, hi, FINE_STEPS)
    errors = [error(k) for k in fine]
    return float(fine[int(np.argmin(errors))]), float(min(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", type=Path, help="a benchmarks/host_overhead.py --out JSON (scheduling ahead on)")
    parser.add_argument("--model", default=None,
                        help="the measured model (default: the steps file's, else the --profile's)")
    parser.add_argument("--profile", type=Path, default=None, help="the cost profile to update (default: the model's packaged one)")
    parser.add_argument("--num-sms", type=int, default=H200_SMS, help="the measured GPU's SMs")
    parser.add_argument("--check", type=Path, nargs="*", default=[],
                        help="other steps JSONs to report the fitted model's error on")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write the profile")
    args = parser.parse_args()
    measured = json.loads(args.steps.read_text())
    model = args.model or measured.get("model") or (CostModel.load(args.profile).model if args.profile else None)
    if model is None:
        raise SystemExit(f"{args.steps}: names no model; say --model")
    path = args.profile or profile_path(model)
    cost = CostModel.load(path)
    if cost.model != model:
        raise SystemExit(f"{path} is {cost.model!r}'s profile, but the steps are of {model!r}")
    spec = resolve_model(model).spec
    width = args.num_sms * _DECODE_PROGRAMS_PER_SM // spec.num_kv_heads
    records = decode_steps(measured["steps"])
    layers = spec.num_layers
    before = mean_relative_error(cost, records, layers)
    coefficient, after = fit(cost, records, layers, width, _MAX_DECODE_SPLITS)
    fitted = with_straggler(cost, coefficient, width, _MAX_DECODE_SPLITS)
    print(f"{len(records)} decode steps of {args.steps}")
    print(f"layer_longest_s = {coefficient:.4g} s per key of the longest slice per layer "
          f"(decode_split_width {width}, max_decode_splits {_MAX_DECODE_SPLITS})")
    print(f"mean relative step-time error: {before * 100:.1f}% without, {after * 100:.1f}% with")
    for other in args.check:
        steps = decode_steps(json.loads(other.read_text())["steps"])
        print(f"  {other}: {mean_relative_error(cost, steps, layers) * 100:.1f}% without, "
              f"{mean_relative_error(fitted, steps, layers) * 100:.1f}% with ({len(steps)} decode steps)")
    if args.dry_run:
        return
    notes = dict(fitted.notes)
    notes["layer_longest_s"] = (f"benchmarks/fit_decode_straggler.py on {args.steps.as_posix()} ({len(records)} decode "
                                f"steps, {args.num_sms} SMs): step-time error {before * 100:.1f}% -> {after * 100:.1f}%")
    dataclasses.replace(fitted, notes=notes).save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
