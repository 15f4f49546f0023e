"""How fast a drop's pipeline group decodes against the replicas it came from.

The measure is decode time per batch token at a matched per-GPU batch b: a replica's step
advances its b sequences by one token; a g-group runs g micro-batches of b (its members'
sequences), and each sequence advances one token per cycle. So the ratio is the group's cycle
time over the replica's step time (target <= 1.10 at b = 128, 256).

Two modes:

* `--mode bound` (one GPU): each stage of a g-group is a worker holding its L/g layers,
  decoding a batch of b with CUDA graphs (a later stage fed hidden states); the cycle is at
  least g x the slowest stage's step, since every stage runs every micro-batch. A lower bound
  of the group's cycle (no activation hops, no bubbles, no driver time), beside the replica's
  measured step. KV is laid out as in a real cache: cases whose KV does not fit one GPU are
  skipped.
* `--mode live` (g GPUs): g replicas of the same per-GPU batch decode, fuse into a group
  (the stall of the running requests and the KV exchange time measured), decode as a group
  (per batch token, the pipeline's bubble fraction), and split back (restore time).

    python benchmarks/group_speed.py --mode bound --out $OUT/group_speed_bound.json
    python benchmarks/group_speed.py --mode live --out $OUT/group_speed_live.json   # two GPUs
    python benchmarks/group_speed.py --mode bound --model tiny-llama --dtype float32 --device cpu \\
        --batches 4 --contexts 64 --memory-budget-gib 1 --out /tmp/group_speed.json   # a CPU dry run
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from drop_restore import decode_until_all_decoding, time_steps

from kunserve import EngineConfig, SamplingParams
from kunserve.bench.profiler import ProfileCase, case_sequences
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.transitions import fuse, split
from kunserve.engine.block_manager import BlockManager
from kunserve.engine.step_builder import build_step_input
from kunserve.layout import stage_ranges
from kunserve.model.presets import resolve_model
from kunserve.sampling_params import RequestOutputKind
from kunserve.worker.worker import Worker, build_worker

REPEATS = 20  # timed steps per case, after one warm-up
LIVE_DECODE_STEPS = 20
# Head-room tokens per sequence beyond its context, so the timed steps never run out of blocks.
SPARE_TOKENS = 64


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(worker: Worker, batch: int, context: int, block_size: int) -> float:
    """Median seconds of a decode step of `batch` sequences of `context` tokens on this worker
    (graphs where it has them); a stage that does not embed is fed hidden states."""
    blocks = BlockManager(block_size, worker.layout.initial_kv_blocks())
    step = build_step_input(case_sequences(ProfileCase(batch, context), blocks), block_size, [])
    hidden_in = None
    if worker.start != 0:
        hidden_in = torch.randn(batch, worker.spec.hidden_size, dtype=worker.arena.buffer.dtype, device=worker.device)
    samples = worker.end == worker.spec.num_layers
    times = []
    for _ in range(REPEATS + 1):
        synchronize(worker.device)
        start = time.perf_counter()
        hidden = worker.runner.forward(step, hidden_in)
        if samples:
            worker.runner.sample(step, hidden)
        synchronize(worker.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def kv_fits(config: EngineConfig, layers: int, batch: int, context: int) -> bool:
    """Whether `batch` sequences of `context` tokens fit the KV blocks of a worker holding `layers`."""
    model = resolve_model(config.model)
    per_token = layers * 2 * model.spec.num_kv_heads * model.spec.head_dim * torch.finfo(
        getattr(torch, config.dtype)).bits // 8
    return batch * (context + SPARE_TOKENS) * per_token <= (config.memory_budget_bytes or 0) * 0.8


def bound_rows(args: argparse.Namespace) -> list[dict]:
    model = resolve_model(args.model)
    num_layers = model.spec.num_layers
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            config = EngineConfig(model=args.model, load_format="dummy", dtype=args.dtype, device=args.device,
                                  max_model_len=context + SPARE_TOKENS, max_num_seqs=batch,
                                  memory_budget_bytes=args.memory_budget_gib << 30, skip_tokenizer_init=True)
            if not kv_fits(config, num_layers, batch, context):
                print(f"skipping batch {batch} x context {context}: its KV does not fit one device's budget")
                continue
            times = {}
            for name, layers in [("replica", (0, num_layers))] + [
                    (f"stage{r}", span) for r, span in enumerate(stage_ranges(num_layers, args.group_size))]:
                worker = build_worker(config, model, layers, torch.device(config.resolve_device()))
                times[name] = time_decode(worker, batch, context, config.block_size)
                del worker
                gc.collect()  # the worker's runner and graphs hold references in cycles
                if config.resolve_device().type == "cuda":
                    torch.cuda.empty_cache()
            stage_max = max(t for name, t in times.items() if name != "replica")
            row = {"batch": batch, "context": context, "group_size": args.group_size,
                   **{f"{name}_ms": t * 1e3 for name, t in times.items()},
                   "cycle_lower_bound_ms": args.group_size * stage_max * 1e3,
                   "ratio_lower_bound": args.group_size * stage_max / times["replica"]}
            print(row, flush=True)
            rows.append(row)
    return rows


def live_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            config = EngineConfig(model=args.model, load_format="dummy", dtype=args.dtype, device=args.device,
                                  max_model_len=context + 512, max_num_batched_tokens=8192, max_num_seqs=batch,
                                  skip_tokenizer_init=True)
            cluster = Cluster.launch(config, num_replicas=args.group_size, coordinator=CoordinatorConfig("recompute"))
            try:
                rows.append(live_case(cluster, batch, context))
                print(rows[-1], flush=True)
            finally:
                cluster.shutdown()
    return rows


def live_case(cluster: Cluster, batch: int, context: int) -> dict:
    engines = list(cluster.engines)
    links_start = time.perf_counter()
    cluster.open_links()  # before serving, as a launched cluster does: links and stages ready
    links_s = time.perf_counter() - links_start
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    for r, engine in enumerate(engines):
        for i in range(batch):
            engine.add_request(f"{r}-{i}", rng.integers(0, engine.spec.vocab_size, context).tolist(), params)
    decode_until_all_decoding(engines)
    replica_step = statistics.median([time_steps(engine, LIVE_DECODE_STEPS) for engine in engines])
    last_token_at = time.perf_counter()
    group, drop = fuse(engines)
    running = list(group.scheduler.running)
    lengths = {s.request_id: len(s) for s in running}
    first_after: dict[str, float] = {}
    while len(first_after) < len(running):
        group.step()
        now = time.perf_counter()
        first_after.update((s.request_id, now) for s in running
                           if s.request_id not in first_after and len(s) > lengths[s.request_id])
    stall = max(first_after.values()) - last_token_at
    g = len(engines)
    group.measure_pipeline()  # start the bubble window here
    cycle = time_steps(group, g * LIVE_DECODE_STEPS) * g  # one engine step completes one micro-batch
    busy = group.measure_pipeline()
    _, restore = split(group, engines)
    return {"batch": batch, "context": context, "group_size": g, "open_links_s": links_s,
            "replica_ms_per_batch_token": replica_step * 1e3, "group_ms_per_batch_token": cycle * 1e3,
            "ratio": cycle / replica_step, "bubble_fraction": 1 - busy.busy_s / busy.stage_s if busy.stage_s else None,
            "drop_s": drop.duration_s, "kv_exchange_s": drop.exchange_s, "stall_s": stall,
            "restore_s": restore.duration_s, "restore_weights_s": restore.weights_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("bound", "live"), required=True)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256], help="per-GPU batch")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--memory-budget-gib", type=int, default=120, help="bound mode: each worker's budget")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = bound_rows(args) if args.mode == "bound" else live_rows(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"date": time.strftime("%Y-%m-%d"), "device": device, "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    key = "ratio_lower_bound" if args.mode == "bound" else "ratio"
    print(f"\n{device}, {args.model} {args.dtype}, {args.mode}: group decode per batch token / replica's")
    print("| batch | context | ratio |\n| ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['batch']} | {row['context']} | {row[key]:.3f} |")


if __name__ == "__main__":
    main()
