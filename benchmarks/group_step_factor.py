"""How much slower a pipeline group's stages run than the cost model predicts, from a
measured drop: the simulator's `group_stage_factor` (kunserve/sim/settings.py), written as a
profile the simulator loads (kunserve/sim/profiles/).

benchmarks/drop_restore.py measures, on two GPUs, decode time per batch token of two replicas
and of the 2-stage group they fuse into (`replica_ms_per_batch_token`,
`group_ms_per_batch_token`). This replays the same procedure on simulated devices (same
model, batch, context and engine settings; the engines stepped directly, as there) with the
factor at 1, and takes the measured group time over the simulated one as the factor. The
replica's ratio is printed beside it: the part of the gap that is the cost model's, not the
group's.

    python benchmarks/group_step_factor.py docs/results/drop_restore_h200x2.json \\
        --out kunserve/sim/profiles/group_stage.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kunserve import EngineConfig, LLMEngine
from kunserve.bench.in_process import request_params
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.transitions import fuse
from kunserve.config import GiB
from kunserve.sim.cluster import SimulatedCluster
from kunserve.sim.run import DEVICE_RESERVED_GIB, H200_MEMORY_GIB
from kunserve.sim.settings import SimulatorConfig

DECODE_STEPS = 20  # as benchmarks/drop_restore.py
FIT_ROUNDS = 3  # fixed-point rounds fitting the factor to the measured group time
GPU_MEMORY_UTILIZATION = 0.9  # its default
PROMPT_TOKEN = 0


def decode_until_all_decoding(engines: list[LLMEngine]) -> None:
    while any(e.scheduler.waiting or any(s.num_computed_tokens < len(s) - 1 for s in e.scheduler.running)
              for e in engines):
        for engine in engines:
            engine.step()


def time_steps(cluster: SimulatedCluster, engine: LLMEngine, steps: int) -> float:
    start = cluster.clock()
    for _ in range(steps):
        engine.step()
    return (cluster.clock() - start) / steps


def simulate(measured: dict, factor: float) -> tuple[float, float]:
    """Simulated (replica, group) seconds per batch token of the measured procedure, with
    group stages `factor` times slower than the cost model."""
    batch, context = measured["batch_per_replica"], measured["context"]
    config = EngineConfig(model=measured["model"], load_format="dummy", device="cuda", max_model_len=context + 512,
                          max_num_batched_tokens=8192, max_num_seqs=batch, async_scheduling="off")
    budget = int((H200_MEMORY_GIB * GPU_MEMORY_UTILIZATION - DEVICE_RESERVED_GIB) * GiB)
    cluster = SimulatedCluster(config, 2, CoordinatorConfig("recompute"),
                               settings=SimulatorConfig(group_stage_factor=factor, schedule_ahead=False),
                               device_budget_bytes=budget)
    engines = cluster.engines
    for r, engine in enumerate(engines):
        for i in range(batch):
            engine.add_request(f"{r}-{i}", [PROMPT_TOKEN] * context, request_params(500))
    decode_until_all_decoding(engines)
    for engine in engines:
        time_steps(cluster, engine, 2)
    replica = time_steps(cluster, engines[0], DECODE_STEPS)
    time_steps(cluster, engines[1], DECODE_STEPS)
    group, _ = fuse(engines)
    for _ in range(4):
        group.step()
    return replica, 2 * time_steps(cluster, group, 2 * DECODE_STEPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measured", type=Path, help="a benchmarks/drop_restore.py JSON")
    parser.add_argument("--out", type=Path, default=None, help="write the profile here")
    args = parser.parse_args()
    measured = json.loads(args.measured.read_text())
    measured_group_s = measured["group_ms_per_batch_token"] / 1e3
    measured_replica_s = measured["replica_ms_per_batch_token"] / 1e3
    factor = 1.0
    replica_s, unscaled_s = simulate(measured, factor)
    group_s = unscaled_s
    for _ in range(FIT_ROUNDS):  # the factor scales the stages' compute, not the driver's time
        factor *= measured_group_s / group_s
        _, group_s = simulate(measured, factor)
    profile = {
        "group_stage_factor": factor,
        "source": f"{args.measured} (benchmarks/drop_restore.py), replayed by benchmarks/group_step_factor.py",
        "model": measured["model"], "batch_per_replica": measured["batch_per_replica"],
        "context": measured["context"],
        "group_ms_per_batch_token": {"measured": measured_group_s * 1e3, "simulated_factor_1": unscaled_s * 1e3,
                                     "simulated": group_s * 1e3},
        "replica_ms_per_batch_token": {"measured": measured_replica_s * 1e3, "simulated": replica_s * 1e3},
        "replica_ratio": measured_replica_s / replica_s,
    }
    print(f"{'per batch token':<16} {'measured ms':>12} {'simulated ms':>13} {'ratio':>6}")
    print(f"{'replica':<16} {measured_replica_s * 1e3:>12.2f} {replica_s * 1e3:>13.2f} {profile['replica_ratio']:>6.2f}")
    print(f"{'group':<16} {measured_group_s * 1e3:>12.2f} {unscaled_s * 1e3:>13.2f} "
          f"{measured_group_s / unscaled_s:>6.2f}")
    print(f"group_stage_factor {factor:.3f} (the group simulated with it: {group_s * 1e3:.2f} ms)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(profile, indent=1) + "\n")


if __name__ == "__main__":
    main()
