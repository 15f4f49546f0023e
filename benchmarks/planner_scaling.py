"""How long the drop planner takes to plan a check over N replicas (host time, no device).

    python benchmarks/planner_scaling.py --out results/planner_scaling.json

Each replica's demand is drawn uniformly from [0, 1.6x) its capacity (about a third
overloaded), eight replicas per host; the figure is the median of `--repeats` plans.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from kunserve.cluster.planner import Planner, PlannerConfig, ReplicaLoad
from kunserve.engine.cost_model import CostModel
from kunserve.model.presets import resolve_model

CAPACITY_BLOCKS = 200
WEIGHT_BLOCKS = 100
DEVICES_PER_HOST = 8
OVERLOAD_SPREAD = 1.6  # demand drawn up to this multiple of the capacity


def plan_seconds(planner: Planner, num_replicas: int, repeats: int, seed: int) -> tuple[float, int]:
    rng = np.random.default_rng(seed)
    demands = rng.integers(0, int(OVERLOAD_SPREAD * CAPACITY_BLOCKS), num_replicas)
    loads = [ReplicaLoad(i, int(d), CAPACITY_BLOCKS, WEIGHT_BLOCKS, running=8, context_tokens=8 * 512,
                         host=i // DEVICES_PER_HOST) for i, d in enumerate(demands)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        groups = planner.plan_drops(loads)
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    spec = resolve_model("llama-3-8b").spec
    planner = Planner(PlannerConfig(spec.num_layers, drop_headroom=0.0), CostModel.default(spec, "llama-3-8b"))
    rows = []
    print("| replicas | groups planned | plan time (ms, median) |\n| ---: | ---: | ---: |")
    for n in args.replicas:
        seconds, groups = plan_seconds(planner, n, args.repeats, args.seed)
        rows.append({"replicas": n, "groups": groups, "plan_ms": seconds * 1e3})
        print(f"| {n} | {groups} | {seconds * 1e3:.2f} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
