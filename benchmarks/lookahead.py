"""Lookahead batch formulation on vs off: the bubble of a 2-stage pipeline (nvidia-h200-x2).

One engine with `--stages` pipeline stages (dummy Llama-3-8B in bf16, one GPU each) serves
a seeded open-loop stream of mixed-length requests: most prompts short, some long (chunked
prefill), outputs of varied length, arrivals Poisson at each of `--rates` (a steady load
and a burst). The same stream runs with micro-batches balanced by the cost model
(lookahead) and split by sequence count (off).
Measured per mode: the pipeline bubble (1 - stage busy time / (stages x time with steps in
flight), from the stages' CUDA-event clocks), output throughput, TTFT and TPOT.

    python benchmarks/lookahead.py --cost-profile kunserve/engine/profiles/llama-3-8b.json \\
        --out $OUT/lookahead.json
    python benchmarks/lookahead.py --model tiny-llama --device cpu --requests 24 --rate 20 \\
        --max-prompt 256 --out /tmp/lookahead.json   # the same code path on CPU, as a dry run
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kunserve import EngineConfig, LLMEngine, SamplingParams
from kunserve.sampling_params import RequestOutputKind

LONG_FRACTION = 0.3  # of prompts drawn from the long range
WARM_UP_FRACTIONS = (0.0, 0.125, 0.25, 0.5, 1.0)  # of the longest prompt: warm-up prompt lengths


@dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt: list[int]
    output_len: int


def make_workload(args: argparse.Namespace, rate: float, vocab_size: int) -> list[Request]:
    rng = np.random.default_rng(args.seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, args.requests))
    short = rng.integers(args.min_prompt, args.max_prompt // 8 + 1, args.requests)
    long = rng.integers(args.max_prompt // 4, args.max_prompt + 1, args.requests)
    lengths = np.where(rng.random(args.requests) < LONG_FRACTION, long, short)
    outputs = rng.integers(args.min_output, args.max_output + 1, args.requests)
    return [Request(float(a), rng.integers(0, vocab_size, n).tolist(), int(o))
            for a, n, o in zip(arrivals, lengths, outputs, strict=True)]


def params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                          output_kind=RequestOutputKind.FINAL_ONLY)


def serve(engine: LLMEngine, workload: list[Request]) -> dict:
    """Replay the stream in real time; latencies from the engine's request metrics."""
    longest = max(workload, key=lambda r: len(r.prompt)).prompt
    for i, fraction in enumerate(WARM_UP_FRACTIONS):  # NCCL links, kernels of every prompt size
        engine.add_request(f"warm{i}", longest[: max(1, int(fraction * len(longest)))], params(8))
        while engine.has_unfinished_requests():
            engine.step()
    engine.measure_pipeline()
    finished = []
    start = time.perf_counter()
    next_request = 0
    while next_request < len(workload) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while next_request < len(workload) and workload[next_request].arrival_s <= now:
            request = workload[next_request]
            engine.add_request(str(next_request), request.prompt, params(request.output_len))
            next_request += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, workload[next_request].arrival_s - now))  # idle until the next arrival
            continue
        finished += [out for out in engine.step() if out.finished]
    wall = time.perf_counter() - start
    pipeline = engine.measure_pipeline()
    metrics = [out.metrics for out in finished]
    ttft = np.asarray([m.first_token_time - m.arrival_time for m in metrics])
    tpot = np.asarray([(m.finished_time - m.first_token_time) / (len(out.outputs[0].token_ids) - 1)
                       for m, out in zip(metrics, finished, strict=True) if len(out.outputs[0].token_ids) > 1])
    generated = sum(len(out.outputs[0].token_ids) for out in finished)
    return {"bubble_fraction": pipeline.bubble_fraction, "stage_busy_s": pipeline.busy_s,
            "stage_available_s": pipeline.stage_s, "wall_s": wall, "output_tok_s": generated / wall,
            "ttft_mean_s": float(ttft.mean()), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "tpot_mean_s": float(tpot.mean()), "finished": len(finished)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--cost-profile", default=None, help="cost-model file (default: packaged or estimated)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--rates", type=float, nargs="+", default=[8.0, 32.0], help="arrivals per second (Poisson)")
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=4096)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    rows = []
    for lookahead in (True, False):
        config = EngineConfig(model=args.model, load_format="dummy", device=args.device, skip_tokenizer_init=True,
                              pipeline_parallel_size=args.stages, max_model_len=args.max_prompt + args.max_output,
                              max_num_batched_tokens=args.max_num_batched_tokens, lookahead_batching=lookahead,
                              cost_profile=args.cost_profile)
        engine = LLMEngine(config)
        try:
            cost_model = engine.cost_model.device
            for rate in args.rates:
                workload = make_workload(args, rate, engine.spec.vocab_size)
                row = serve(engine, workload)
                rows.append({"rate": rate, "mode": "lookahead" if lookahead else "by_count", **row})
                print(f"rate {rate}/s, {rows[-1]['mode']}: bubble {row['bubble_fraction']:.3f}", flush=True)
        finally:
            engine.shutdown()

    print(f"\n{'rate/s':>6} {'micro-batches':<14} {'bubble':>7} {'out tok/s':>10} {'TTFT mean':>10} {'TTFT p99':>9} "
          f"{'TPOT mean':>10}")
    for row in sorted(rows, key=lambda r: (r["rate"], r["mode"] != "lookahead")):
        print(f"{row['rate']:>6.1f} {row['mode']:<14} {row['bubble_fraction']:>7.3f} {row['output_tok_s']:>10.1f} "
              f"{row['ttft_mean_s'] * 1e3:>8.1f}ms {row['ttft_p99_s'] * 1e3:>7.1f}ms {row['tpot_mean_s'] * 1e3:>8.2f}ms")
    print(f"\n{args.model}, {args.stages} stages, cost model: {cost_model}, {args.requests} requests per rate")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cost_model": cost_model,
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
