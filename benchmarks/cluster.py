"""Replicas and pipeline groups on two GPUs (nvidia-h200-x2), dummy Llama-3-8B in bf16:

  (a) offline throughput of 2 replicas against 1 on the same workload (requests with input
      and output lengths uniform in the given ranges, ignore_eos), every replica in its own
      worker process;
  (b) decode time per batch token of a g=2 pipeline against one replica at equal batch:
      the time for every sequence of the batch to advance one token (1k-token contexts);
  (c) the pipeline's bubble: per stage, 1 - (time the stage computes) / (wall time), the
      compute time taken from CUDA events around each stage's forward;
  (k) a correctness check on the same devices: greedy tokens of the tiny float32 Llama
      through a g=2 pipeline (NCCL between stages) equal those of one device.

    python benchmarks/cluster.py --out $OUT/cluster.json
    python benchmarks/cluster.py --model tiny-llama --device cpu --requests 16 --batches 8 \\
        --context 64 --out /tmp/cluster.json   # the same code path on CPU, as a dry run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from kunserve import EngineConfig, LLMEngine, SamplingParams
from kunserve.cluster.cluster import Cluster
from kunserve.executor.multiproc import MultiprocExecutor
from kunserve.sampling_params import RequestOutputKind

DECODE_STEPS = 40  # timed batch tokens per decode measurement


def engine_config(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    base = {"model": args.model, "load_format": "dummy", "dtype": "bfloat16", "device": args.device,
            "max_model_len": args.max_model_len, "max_num_batched_tokens": 8192, "skip_tokenizer_init": True}
    return EngineConfig(**{**base, **overrides})


def throughput(args: argparse.Namespace, replicas: int) -> dict:
    cluster = Cluster.launch(engine_config(args, distributed_executor_backend="mp"), replicas, "least_loaded")
    vocab = cluster.first.spec.vocab_size
    rng = np.random.default_rng(0)
    in_lens = rng.integers(args.min_len, args.max_len + 1, args.requests)
    out_lens = rng.integers(args.min_len, args.max_len + 1, args.requests)
    prompts = [rng.integers(0, vocab, n).tolist() for n in in_lens]

    async def run(count: int) -> float:
        streams = [
            cluster.add_requests(
                [f"{count}-{i}"], [prompts[i]],
                [SamplingParams(temperature=0.0, max_tokens=int(out_lens[i]), ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)],
            )
            for i in range(count)
        ]
        start = time.perf_counter()
        for stream in streams:
            async for _ in stream:
                pass
        return time.perf_counter() - start

    async def main() -> tuple[float, float]:
        cluster.start(asyncio.get_running_loop())
        await run(min(8, args.requests))  # warm-up
        return await run(args.requests), float(out_lens.sum())

    try:
        elapsed, tokens = asyncio.run(main())
    finally:
        cluster.shutdown()
    return {"replicas": replicas, "requests": args.requests, "output_tokens": tokens, "seconds": elapsed,
            "output_tok_s": tokens / elapsed}


def decode(args: argparse.Namespace, batch: int, stages: int) -> dict:
    """Per batch token: the time for all `batch` sequences to get one more token."""
    engine = LLMEngine(engine_config(args, pipeline_parallel_size=stages, distributed_executor_backend="mp",
                                     max_num_seqs=batch))
    executor = engine.executor
    assert isinstance(executor, MultiprocExecutor)
    try:
        rng = np.random.default_rng(batch)
        params = SamplingParams(temperature=0.0, max_tokens=args.max_model_len - args.context, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        for i in range(batch):
            engine.add_request(str(i), rng.integers(0, engine.spec.vocab_size, args.context).tolist(), params)
        running = engine.scheduler.running
        while engine.scheduler.waiting or any(s.num_computed_tokens < len(s) - 1 for s in running):
            engine.step()
        for _ in range(2 * stages):
            engine.step()  # warm-up decodes
        assert len(running) == batch, f"{len(running)} of {batch} requests are running"
        executor.take_busy_seconds()  # the clocks count from here
        start = time.perf_counter()
        for _ in range(DECODE_STEPS * stages):  # each step completes one micro-batch
            engine.step()
        decode_s = time.perf_counter() - start
        for seq in list(running):
            engine.abort_request(seq.request_id)
        while engine.num_in_flight:
            engine.step()
        wall = time.perf_counter() - start  # the busy clocks also count the micro-batches drained
        busy = executor.take_busy_seconds()
        return {"batch": batch, "stages": stages, "context": args.context,
                "ms_per_batch_token": decode_s / DECODE_STEPS * 1e3,
                "stage_busy_s": busy, "wall_s": wall, "bubble": [1 - b / wall for b in busy]}
    finally:
        engine.shutdown()


def check_tokens(args: argparse.Namespace) -> dict:
    from kunserve import LLM

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 500, n).tolist() for n in (3, 19, 70, 130, 45, 8)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outputs = {}
    for stages in (1, 2):
        llm = LLM("tiny-llama", device=args.device, max_model_len=256, max_num_batched_tokens=64, num_kv_blocks=512,
                  pipeline_parallel_size=stages)
        outputs[stages] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.engine.shutdown()
    same = outputs[1] == outputs[2]
    print(f"(k) g=2 pipeline tokens equal one device's: {same}")
    return {"pipeline_equals_single_device": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--requests", type=int, default=384)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--parts", default="kabc")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results: dict = {"model": args.model}
    if "k" in args.parts:
        results["check"] = check_tokens(args)
    if "a" in args.parts:
        results["throughput"] = [throughput(args, n) for n in (1, 2)]
        one, two = (r["output_tok_s"] for r in results["throughput"])
        results["throughput_scaling"] = two / one
        print(f"(a) output tok/s: 1 replica {one:.0f}, 2 replicas {two:.0f}: {two / one:.2f}x")
    if "b" in args.parts or "c" in args.parts:
        rows = []
        for batch in args.batches:
            replica, pipeline = decode(args, batch, 1), decode(args, batch, 2)
            rows.append({"batch": batch, "replica": replica, "pipeline": pipeline,
                         "pipeline_vs_replica": pipeline["ms_per_batch_token"] / replica["ms_per_batch_token"]})
            print(f"(b) batch {batch}: replica {replica['ms_per_batch_token']:.2f} ms, "
                  f"g=2 pipeline {pipeline['ms_per_batch_token']:.2f} ms per batch token "
                  f"({rows[-1]['pipeline_vs_replica']:.2f}x); (c) bubble per stage "
                  f"{', '.join(f'{b:.2f}' for b in pipeline['bubble'])}")
        results["decode"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
