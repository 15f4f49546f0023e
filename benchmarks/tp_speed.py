"""Tensor parallelism's speed (issue 25): decode steps at TP 1, 2, 4 and the all-reduce link.

On the GPUs of one host, dummy weights in bf16 (`load_format="dummy"`: the same model at every
TP size, each rank drawing the whole tensor and keeping its shard):

  (a) the all-reduce among t GPUs (NCCL, t worker processes): seconds per all-reduce of a
      decode step's activations at several batch sizes and of a large buffer, fitted to
      latency + 2(t-1)/t · bytes / bandwidth: the cost model's "all_reduce" link
      (kunserve/engine/cost_model.py), nominal until this measures it;
  (b) the decode step of `--model` at `--batch` sequences with `--context`-token contexts at
      each TP size that fits the GPUs; the target: TP 2 <= 0.6x TP 1 at batch 128 for
      Llama-3-8B;
  (c) with 4 or more GPUs, `--big-model` (Qwen2.5-72B-shaped) served at TP 4: load, a decode step at
      batch 32, and its arena.

    python benchmarks/tp_speed.py --out $OUT/tp_speed.json                 # GPUs: all of (a)-(c) that fit
    python benchmarks/tp_speed.py --model tiny-llama --dtype float32 --batch 8 --context 64 --tp 1 2 \
        --worker-threads 1 --out /tmp/tp.json                               # a CPU run of the same code (gloo)
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kunserve import LLM, SamplingParams
from kunserve.sampling_params import RequestOutputKind

DECODE_STEPS = 30
ALL_REDUCE_REPEATS = 50
ALL_REDUCE_TOKENS = (1, 8, 32, 128, 512)  # decode batches: the activations one layer all-reduces
LARGE_ALL_REDUCE_BYTES = 64 << 20  # a buffer large enough that bandwidth dominates
BIG_MODEL_TP = 4
BIG_MODEL_BATCH = 32
TARGET_RATIO = 0.6  # TP 2's decode step against TP 1's (issue 25)


def free_port() -> int:
    """A port of this host free now, for the all-reduce's own rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- (a) the all-reduce link ------------------------------------------------------------------


def _all_reduce_rank(rank: int, tp_size: int, port: int, sizes: list[int], dtype: torch.dtype, out: dict) -> None:
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=tp_size)
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    seconds = []
    for numel in sizes:
        x = torch.ones(numel, dtype=dtype, device=device)
        for _ in range(5):  # warm-up: the communicator, the buffers
            dist.all_reduce(x)
        sync()
        times = []
        for _ in range(ALL_REDUCE_REPEATS):
            dist.barrier()
            sync()
            start = time.perf_counter()
            dist.all_reduce(x)
            sync()
            times.append(time.perf_counter() - start)
        seconds.append(statistics.median(times))
    if rank == 0:
        out["seconds"] = seconds
    dist.destroy_process_group()


def measure_all_reduce(tp_size: int, hidden_size: int, dtype: torch.dtype) -> dict:
    """Median seconds per all-reduce among `tp_size` processes, per size, and the link fitted
    to them (least squares of seconds = latency + 2(t-1)/t · bytes / bandwidth)."""
    elem_bytes = dtype.itemsize
    sizes = [tokens * hidden_size for tokens in ALL_REDUCE_TOKENS] + [LARGE_ALL_REDUCE_BYTES // elem_bytes]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_all_reduce_rank, args=(tp_size, free_port(), sizes, dtype, out), nprocs=tp_size)
        seconds = list(out["seconds"])
    moved = np.array([2 * (tp_size - 1) / tp_size * n * elem_bytes for n in sizes])
    slope, latency = np.polyfit(moved, np.array(seconds), 1)
    return {"tp": tp_size, "bytes": [n * elem_bytes for n in sizes], "seconds": seconds,
            "link": {"bandwidth_bytes_s": float(1 / slope), "latency_s": float(max(latency, 0.0))}}


# ---- (b), (c) decode steps ----------------------------------------------------------------------


def decode_step_s(llm: LLM, batch: int, context: int) -> float:
    """Mean seconds of a decode step of `batch` sequences with `context`-token prompts."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=context, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    rng = np.random.default_rng(batch)
    for i in range(batch):
        engine.add_request(f"d{i}", rng.integers(0, engine.spec.vocab_size, context).tolist(), params)
    while any(s.num_computed_tokens < len(s) - 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()  # warm-up decode
    if len(engine.scheduler.running) != batch:
        raise RuntimeError(f"{len(engine.scheduler.running)} of {batch} requests are running: raise the KV memory")
    sync()
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        engine.step()
    seconds = (time.perf_counter() - start) / DECODE_STEPS
    for i in range(batch):
        engine.abort_request(f"d{i}")
    return seconds


def engine_args(args: argparse.Namespace, max_model_len: int) -> dict:
    return {"load_format": "dummy", "dtype": args.dtype, "max_model_len": max_model_len,
            "max_num_seqs": max(args.batch, BIG_MODEL_BATCH), "worker_threads": args.worker_threads}


def bench_decode(args: argparse.Namespace, tp_size: int) -> dict:
    started = time.perf_counter()
    llm = LLM(args.model, tensor_parallel_size=tp_size, **engine_args(args, 2 * args.context))
    load_s = time.perf_counter() - started
    try:
        step_s = decode_step_s(llm, args.batch, args.context)
        layout = llm.engine.executor.layout
        return {"tp": tp_size, "batch": args.batch, "context": args.context, "step_ms": step_s * 1e3,
                "load_s": load_s, "kv_blocks": len(llm.engine.executor.kv_block_ids()),
                "layer_MiB_per_rank": layout.layer_bytes / 2**20,
                "predicted_step_ms": predicted_step_ms(llm, args.batch, args.context)}
    finally:
        llm.engine.shutdown()


def predicted_step_ms(llm: LLM, batch: int, context: int) -> float:
    """What the engine's cost model (TP-aware) predicts for the measured step."""
    from kunserve.engine.cost_model import StepShape

    shape = StepShape(num_tokens=batch, decode_context=batch * (context + DECODE_STEPS // 2), num_samples=batch)
    return llm.engine.cost_model.step_time(shape, llm.engine.spec.num_layers) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--big-model", default="qwen2.5-72b", help="served at TP 4 with 4 GPUs; '' to skip")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tp", type=int, nargs="+", default=None, help="TP sizes (default: 1, 2, 4 as GPUs allow)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--worker-threads", type=int, default=None, help="torch CPU threads per worker (CPU runs)")
    parser.add_argument("--out", default="results/tp_speed.json")
    args = parser.parse_args()

    gpus = gpu_count()
    sizes = args.tp or [t for t in (1, 2, 4) if t <= max(gpus, 1)]
    if gpus and max(sizes) > gpus:
        raise SystemExit(f"--tp {max(sizes)}: this host has {gpus} GPU(s)")
    dtype = getattr(torch, args.dtype)
    from kunserve.model.presets import resolve_model

    hidden = resolve_model(args.model).spec.hidden_size
    report: dict = {"date": time.strftime("%Y-%m-%d"), "gpus": gpus, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if gpus else "cpu", "model": args.model}
    report["all_reduce"] = [measure_all_reduce(t, hidden, dtype) for t in sizes if t > 1]
    report["decode"] = [bench_decode(args, t) for t in sizes]
    steps = {row["tp"]: row["step_ms"] for row in report["decode"]}
    if 1 in steps and 2 in steps:
        report["tp2_over_tp1"] = steps[2] / steps[1]
    if args.big_model and gpus >= BIG_MODEL_TP:
        big = argparse.Namespace(**{**vars(args), "model": args.big_model, "batch": BIG_MODEL_BATCH})
        report["big_model"] = bench_decode(big, BIG_MODEL_TP)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"\n{report['device']} x{max(gpus, 1)}: {args.model} {args.dtype}, decode of {args.batch} x {args.context}")
    for row in report["decode"]:
        print(f"  TP {row['tp']}: {row['step_ms']:.2f} ms/step (cost model {row['predicted_step_ms']:.2f}), "
              f"load {row['load_s']:.0f} s, {row['kv_blocks']} KV blocks")
    if "tp2_over_tp1" in report:
        verdict = "meets" if report["tp2_over_tp1"] <= TARGET_RATIO else "misses"
        print(f"  TP 2 / TP 1 = {report['tp2_over_tp1']:.2f} ({verdict} the {TARGET_RATIO} target)")
    for row in report["all_reduce"]:
        link = row["link"]
        print(f"  all-reduce among {row['tp']}: {link['latency_s'] * 1e6:.1f} us + bytes / "
              f"{link['bandwidth_bytes_s'] / 1e9:.0f} GB/s")
    if "big_model" in report:
        big = report["big_model"]
        print(f"  {args.big_model} at TP {BIG_MODEL_TP}: {big['step_ms']:.2f} ms/step at batch {big['batch']}, "
              f"{big['layer_MiB_per_rank']:.0f} MiB per layer per rank, {big['kv_blocks']} KV blocks")


if __name__ == "__main__":
    main()
