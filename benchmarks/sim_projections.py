"""Projections with the simulator: the overload comparison on more GPUs than the lent machines
have, and a sweep of the largest group a drop may form.

Every GPU count N replays the same trace window with its rate scaled by N × `--rate-per-gpu`
(each GPU sees the same load), under each policy; the sweep replays one N with each
`--max-group-size`. Prints the tables, writes a JSON of the summaries (per-request results
are left out: they grow with N) and two plots.

    python benchmarks/sim_projections.py --model llama-3-8b --memory-budget 40 --gpus 2 8 32 64 \
        --rate-per-gpu 4 --out-dir docs/results/projections_llama3_8b
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: files only, no display

import matplotlib.pyplot as plt

from kunserve.bench.run import build_workload
from kunserve.sim.run import add_simulate_arguments, simulate_policy, simulated_engine_config

POLICIES = ("recompute", "swap", "migrate", "kunserve")
KEPT = ("ttft_ms", "tpot_ms", "e2e_ms", "output_throughput", "slo_attainment", "preemptions", "completed", "failed")


def summarize_run(run: dict) -> dict:
    kinds: dict[str, int] = {}
    for transition in run["transitions"]:
        kinds[transition["kind"]] = kinds.get(transition["kind"], 0) + 1
    return {"policy": run["policy"], **{k: run["summary"][k] for k in KEPT}, "transitions": kinds}


def simulate(args: argparse.Namespace, gpus: int, policy: str, max_group_size: int | None) -> dict:
    args.replicas, args.rate_scale, args.max_group_size = gpus, args.rate_per_gpu * gpus, max_group_size
    specs = build_workload(args)
    start = time.perf_counter()
    run = simulate_policy(simulated_engine_config(args), args, policy, specs)
    row = {"gpus": gpus, "max_group_size": max_group_size, "requests": len(specs),
           "wall_s": time.perf_counter() - start, **summarize_run(run)}
    print(f"{gpus:>4} GPUs, group <= {max_group_size or '-'}, {policy:<9} {len(specs):>6} req: TTFT P50/P99 "
          f"{row['ttft_ms']['p50']:>8.0f}/{row['ttft_ms']['p99']:>8.0f} ms, TPOT P50/P99 "
          f"{row['tpot_ms']['p50']:>5.1f}/{row['tpot_ms']['p99']:>5.1f} ms, SLO {row['slo_attainment'] * 100:5.1f}%, "
          f"{row['transitions']} ({row['wall_s']:.0f} s)", flush=True)
    return row


def plot(rows: list[dict], out: Path, x: str, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy in POLICIES:
        mine = [r for r in rows if r["policy"] == policy]
        if not mine:
            continue
        xs = [r[x] or 0 for r in mine]
        axes[0].plot(xs, [r["ttft_ms"]["p99"] for r in mine], marker="o", label=policy)
        axes[1].plot(xs, [r["tpot_ms"]["p99"] for r in mine], marker="o", label=policy)
    for ax, name in zip(axes, ("P99 TTFT (ms)", "P99 TPOT (ms)")):
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_simulate_arguments(parser)
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 8, 32, 64])
    parser.add_argument("--rate-per-gpu", type=float, required=True, help="the trace's rate scale per GPU")
    parser.add_argument("--sweep-gpus", type=int, default=32)
    parser.add_argument("--group-sizes", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    scaling = [simulate(args, n, policy, None) for n in args.gpus for policy in args.policies]
    sweep = [simulate(args, args.sweep_gpus, "kunserve", size) for size in args.group_sizes]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "projections.json").write_text(json.dumps({"model": args.model, "memory_budget_bytes":
                                                      args.memory_budget_bytes, "trace": args.trace,
                                                      "trace_start_s": args.trace_start_s,
                                                      "trace_duration_s": args.trace_duration_s,
                                                      "rate_per_gpu": args.rate_per_gpu, "scaling": scaling,
                                                      "group_size_sweep": sweep}, indent=1))
    plot(scaling, out / "scaling.png", "gpus", f"{args.model}: P99 latency as the cluster grows (simulated)")
    plot(sweep, out / "group_size.png", "max_group_size",
         f"{args.model}, {args.sweep_gpus} GPUs, kunserve: largest group a drop forms (simulated)")


if __name__ == "__main__":
    main()
