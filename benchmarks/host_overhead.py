"""The driver's host time per step under load, for the simulator (kunserve/sim/executor.py's
`SimulatorConfig.host_*`): what a live replica's step takes beyond the cost model's device
time for its shape.

One replica serves a trace window through the in-process replay of `kunserve bench --launch`
(the same engine thread and event loop). Every engine step is timed, and the shape of the
step it submitted recorded; the residual (step wall time - the cost model's prediction) is
fitted as host_step_s + host_seq_s * sequences + host_token_s * tokens, non-negative, by
relative error.

    python benchmarks/host_overhead.py --memory-budget-bytes 42949672960 --trace data/traces/azure_llm_conv_2023.csv \
        --trace-start-s 600 --trace-duration-s 60 --rate-scale 4 --out $OUT/host_overhead.json

`--refit STEPS.json` fits again the steps such a run saved, against the current cost model
(the host time is what the cost model leaves; a new cost term changes it), and
`--write-profile` puts the result into the model's packaged cost profile with a note:

    python benchmarks/host_overhead.py --refit docs/results/longgen_h200_2026-12-02/steps_recompute.json --write-profile

It also prints measured over modelled time by kind of step (decode-only, with a prefill chunk,
with swaps, long and uneven contexts): run on a long-generation burst (`--dataset reasoning`,
each `--preemption-mode`) it shows which steps the simulator underprices.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from kunserve import EngineConfig
from kunserve.bench.in_process import replay
from kunserve.bench.run import add_workload_arguments, build_workload
from kunserve.bench.workload import prompt_token_ids
from kunserve.cluster.cluster import Cluster
from kunserve.engine.cost_model import CostModel, HostTime, StepShape, nonnegative_least_squares, profile_path
from kunserve.engine.llm_engine import LLMEngine
from kunserve.model.presets import resolve_model
from kunserve.step import StepInput

PROMPT_TOKEN_IDS = 256  # byte tokens: any byte-level vocabulary has them


def trace_steps(engine: LLMEngine, records: list[dict]) -> None:
    """Record every step of `engine`: its shape (from what it submitted) and its wall time."""
    submit, step = engine.executor.submit, engine.step
    shapes: list[StepShape] = []

    def submit_recorded(step_input: StepInput) -> None:
        batch = step_input.batch
        shapes.append(StepShape.of_batch(batch.query_lens, batch.context_lens, len(step_input.sample_rows)))
        decode = batch.query_lens == 1
        extras.append({"max_decode_context": int(batch.context_lens[decode].max()) if decode.any() else 0,
                       "swapped_blocks": len(step_input.swap_out) + len(step_input.swap_in)})
        submit(step_input)

    extras: list[dict] = []

    def step_timed() -> list:
        shapes.clear()
        extras.clear()
        start = time.perf_counter()
        outputs = step()
        if shapes:
            shape = shapes[0]
            records.append({"seconds": time.perf_counter() - start, "num_seqs": int(shape.num_samples),
                            "num_tokens": int(shape.num_tokens), "decode_context": int(shape.decode_context),
                            "prefill_pairs": int(shape.prefill_pairs), **extras[0],
                            "predicted": engine.cost_model.step_time(shape, engine.spec.num_layers)})
        return outputs

    engine.executor.submit = submit_recorded  # type: ignore[method-assign]
    engine.step = step_timed  # type: ignore[method-assign]


def print_breakdown(records: list[dict], fitted: np.ndarray) -> None:
    """Measured over modelled step time (cost model + the fitted host time) by kind of step:
    where a workload's steps run slower than the simulator prices them (long generations:
    decodes at long or uneven contexts; swaps, which the cost model leaves out)."""
    seconds = np.array([r["seconds"] for r in records])
    ratio = seconds / fitted
    decode_only = np.array([r["prefill_pairs"] == 0 for r in records])
    swaps = np.array([r["swapped_blocks"] > 0 for r in records])
    mean_context = np.array([r["decode_context"] / max(r["num_seqs"], 1) for r in records])
    uneven = np.array([r["max_decode_context"] for r in records]) > 2 * mean_context
    long_context = mean_context > 2048
    kinds = {"decode only": decode_only & ~swaps, "with a prefill chunk": ~decode_only & ~swaps, "with swaps": swaps,
             "decodes, mean context > 2048": decode_only & long_context,
             "decodes, max context > 2x mean": decode_only & uneven}
    print(f"{'steps':<32} {'count':>6} {'measured / modelled':>20} {'seconds measured':>17}")
    for name, mask in kinds.items():
        if mask.any():
            print(f"{name:<32} {int(mask.sum()):>6} {float(np.mean(ratio[mask])):>20.3f} {seconds[mask].sum():>17.1f}")


def fit_host_time(records: list[dict]) -> tuple[float, float, float]:
    """host_step_s, host_seq_s, host_token_s: the steps' wall time beyond their `predicted`,
    non-negative, by relative error (every step alike, not the few longest)."""
    seconds = np.array([r["seconds"] for r in records])
    predicted = np.array([r["predicted"] for r in records])
    features = np.array([[1.0, r["num_seqs"], r["num_tokens"]] for r in records])
    weights = 1.0 / seconds
    step_s, seq_s, token_s = (float(c) for c in nonnegative_least_squares(features * weights[:, None],
                                                                          (seconds - predicted) * weights))
    return step_s, seq_s, token_s


def repredicted(records: list[dict], cost: CostModel, layers: int) -> list[dict]:
    """The records with `predicted` from `cost` (steps saved before a field existed: 0)."""
    return [{**r, "predicted": cost.step_time(StepShape(r["num_tokens"], r["decode_context"], r["prefill_pairs"],
                                                        r["num_seqs"], r.get("max_decode_context", 0)), layers)}
            for r in records]


def refit(path: Path, model: str, write_profile: bool) -> None:
    cost_path = profile_path(model)
    cost = CostModel.load(cost_path)
    saved = json.loads(path.read_text())["steps"]
    records = repredicted(saved[1:], cost, resolve_model(model).spec.num_layers)  # the first warms up
    step_s, seq_s, token_s = fit_host_time(records)
    report(records, step_s, seq_s, token_s)
    if write_profile:
        notes = {**cost.notes, "host": f"benchmarks/host_overhead.py --refit {path.as_posix()} (its steps, "
                                       f"{len(records)}, against this profile's step coefficients)"}
        replace(cost, host=HostTime(step_s, seq_s, token_s), notes=notes).save(cost_path)
        print(f"wrote {cost_path}")


def report(records: list[dict], step_s: float, seq_s: float, token_s: float) -> None:
    seconds = np.array([r["seconds"] for r in records])
    predicted = np.array([r["predicted"] for r in records])
    features = np.array([[1.0, r["num_seqs"], r["num_tokens"]] for r in records])
    fitted = predicted + features @ np.array([step_s, seq_s, token_s])
    print(f"{len(records)} steps; wall {seconds.sum():.1f} s, cost model {predicted.sum():.1f} s")
    print(f"host time per step: {step_s * 1e3:.3f} ms + {seq_s * 1e6:.2f} us/sequence + {token_s * 1e9:.1f} ns/token")
    print(f"step time error, cost model alone: mean {np.mean(np.abs(predicted - seconds) / seconds) * 100:.1f}%; "
          f"with the host time: {np.mean(np.abs(fitted - seconds) / seconds) * 100:.1f}%")
    print_breakdown(records, fitted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--memory-budget-bytes", type=int, default=None,
                        help="the engine's memory (default: 0.9 of the GPU's)")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--preemption-mode", choices=("recompute", "swap"), default="recompute")
    parser.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="off",
                        help="off: every step's host time is in its wall time, as the fit assumes")
    parser.add_argument("--refit", type=Path, default=None,
                        help="fit the steps this script saved (--out) again, against the current cost model; runs nothing")
    parser.add_argument("--write-profile", action="store_true",
                        help="with --refit: write the host time into the model's packaged cost profile")
    add_workload_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.refit is not None:
        refit(args.refit, args.model, args.write_profile)
        return
    config = EngineConfig(model=args.model, load_format=args.load_format, memory_budget_bytes=args.memory_budget_bytes,
                          max_model_len=args.max_model_len, skip_tokenizer_init=True,
                          preemption_mode=args.preemption_mode, async_scheduling=args.async_scheduling)
    specs = build_workload(args)
    prompts = prompt_token_ids(specs, PROMPT_TOKEN_IDS, args.seed)
    cluster = Cluster.launch(config, 1)
    records: list[dict] = []
    trace_steps(cluster.engines[0], records)

    async def run() -> None:
        cluster.start(asyncio.get_running_loop())
        await replay(cluster, specs, prompts, request_id_prefix="r", timeout_s=600.0, show_progress=False)

    try:
        asyncio.run(run())
    finally:
        cluster.shutdown()
    step_s, seq_s, token_s = fit_host_time(records)
    report(records, step_s, seq_s, token_s)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "host_step_s": step_s, "host_seq_s": seq_s, "host_token_s": token_s,
                                              "steps": records}, indent=1))


if __name__ == "__main__":
    main()
