"""The driver's host time per step of a drop's pipeline group against a replica's, per member.

A replica's engine step advances its b sequences by one token; a g-group's engine step
completes one micro-batch, one member's share of b sequences. So "host time per step per
member" compares like with like: the driver's work (scheduling, building and sending the
step, processing the tokens) for one member's batch. Host time is a step's wall time less
the time the driver waits for the devices (inside `Executor.collect`). Target: the group's
no more than the replica's.

    python benchmarks/group_host_time.py --out /tmp/group_host_time.json   # CPU, tiny-llama
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from drop_restore import decode_until_all_decoding

from kunserve import EngineConfig, SamplingParams
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.transitions import fuse, split
from kunserve.engine.llm_engine import LLMEngine
from kunserve.sampling_params import RequestOutputKind

WARMUP_STEPS = 5  # untimed steps after a switch (replica to group), so every queue is full


def host_seconds_per_step(engine: LLMEngine, steps: int) -> tuple[float, float]:
    """(median host seconds, median wall seconds) of `engine`'s next `steps` steps."""
    executor = engine.executor
    collect = executor.collect
    waited = [0.0]

    def timed_collect() -> np.ndarray:
        start = time.perf_counter()
        try:
            return collect()
        finally:
            waited[0] += time.perf_counter() - start

    executor.collect = timed_collect  # type: ignore[method-assign]
    host, wall = [], []
    try:
        for i in range(WARMUP_STEPS + steps):
            waited[0] = 0.0
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            if i >= WARMUP_STEPS:
                wall.append(elapsed)
                host.append(elapsed - waited[0])
    finally:
        del executor.collect
    return statistics.median(host), statistics.median(wall)


def case(args: argparse.Namespace, batch: int, async_scheduling: str) -> dict:
    config = EngineConfig(model=args.model, load_format="dummy", dtype="float32", device="cpu",
                          max_model_len=args.context + 2 * args.steps + 64, max_num_seqs=batch,
                          max_num_batched_tokens=max(batch * args.context, 256), skip_tokenizer_init=True,
                          worker_threads=1, async_scheduling=async_scheduling,
                          lookahead_batching=not args.no_lookahead_batching)
    cluster = Cluster.launch(config, num_replicas=args.group_size)
    try:
        cluster.open_links()
        engines = list(cluster.engines)
        rng = np.random.default_rng(0)
        params = SamplingParams(temperature=0.0, max_tokens=10 * args.steps + 64, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        for r, engine in enumerate(engines):
            for i in range(batch):
                engine.add_request(f"{r}-{i}", rng.integers(0, engine.spec.vocab_size, args.context).tolist(), params)
        decode_until_all_decoding(engines)
        replica_host, replica_wall = host_seconds_per_step(engines[0], args.steps)
        for engine in engines:
            engine.drain()
        group, _ = fuse(engines)
        group_host, group_wall = host_seconds_per_step(group, args.steps)
        ahead = group.scheduler.num_steps_ahead
        split(group, engines)
    finally:
        cluster.shutdown()
    return {"batch_per_member": batch, "context": args.context, "group_size": args.group_size,
            "async_scheduling": async_scheduling, "replica_host_ms_per_step": replica_host * 1e3,
            "group_host_ms_per_step_per_member": group_host * 1e3, "ratio": group_host / replica_host,
            "replica_wall_ms_per_step": replica_wall * 1e3, "group_wall_ms_per_step": group_wall * 1e3,
            "group_steps_ahead": ahead, "lookahead_batching": not args.no_lookahead_batching}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64], help="running requests per member")
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each engine")
    parser.add_argument("--modes", nargs="+", default=["off", "on"], help="async_scheduling settings")
    parser.add_argument("--no-lookahead-batching", action="store_true",
                        help="micro-batches by sequence count (how much of the group's host time is lookahead's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for mode in args.modes:
        for batch in args.batches:
            rows.append(case(args, batch, mode))
            print(rows[-1], flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{args.model} on CPU: the driver's host ms per step (per member for the group)")
    print("| async | batch / member | replica | group | group / replica | group steps ahead |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['async_scheduling']} | {row['batch_per_member']} | {row['replica_host_ms_per_step']:.2f} | "
              f"{row['group_host_ms_per_step_per_member']:.2f} | {row['ratio']:.2f} | {row['group_steps_ahead']} |")


if __name__ == "__main__":
    main()
