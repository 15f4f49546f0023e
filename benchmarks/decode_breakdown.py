"""Where a decode step's device time goes, and how the decode-attention kernel's tiles do.

1. Kernel times of eager decode steps of dummy Llama-3-8B (bf16) at batch 128 and 256 with
   1k-token contexts, from torch.profiler: per step, summed by kernel, the largest first.
2. The Triton decode-attention kernel on the same shapes (32 query / 8 KV heads, head_dim
   128, block 16, a block-major arena of 2 layers, shuffled blocks) over tile configurations
   (keys per tile, warps, pipeline stages), timed replayed from a CUDA graph, as KV bytes read
   per second.
3. The same kernel over key splits per sequence (the backend's plan, and 1..8 forced) on three
   context mixes: uniform in 100..2048 (as in the end-to-end workload of benchmarks/engine.py),
   all 1k, and uniform in 100..400; at batch 1..256. A step's long sequences hold the kernel
   up while the short ones are done unless they are split; splits cost a reduction.

    python benchmarks/decode_breakdown.py --out $OUT/decode_breakdown.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import triton.testing

from kunserve import LLM, SamplingParams
from kunserve.kernels.triton_attention import TritonAttentionBackend
from kunserve.sampling_params import RequestOutputKind
from kunserve.step import BatchLayout

BATCHES = (128, 256)
CONTEXT = 1024
PROFILED_STEPS = 5
TOP_KERNELS = 12
SHOWN_TILES = 8  # fastest tile configurations printed per batch (the JSON has all)
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
ARENA_LAYERS = 2
TILE_KEYS, TILE_WARPS, TILE_STAGES = (32, 64, 128), (2, 4, 8), (2, 3)
CONTEXT_MIXES = {"100..2048": (100, 2048), "1k": (CONTEXT, CONTEXT), "100..400": (100, 400)}
SPLIT_BATCHES = (1, 8, 16, 32, 64, 96, 128, 192, 256)
SPLIT_COUNTS = (None, 1, 2, 3, 4, 6, 8)  # None: the backend's plan


def profile_decode(batch: int) -> dict:
    llm = LLM("llama-3-8b", load_format="dummy", dtype="bfloat16", max_model_len=CONTEXT + 64, enforce_eager=True,
              max_num_batched_tokens=4096, max_num_seqs=batch, async_scheduling="off")
    engine = llm.engine
    rng = np.random.default_rng(batch)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    for i in range(batch):
        engine.add_request(str(i), rng.integers(0, engine.spec.vocab_size, CONTEXT).tolist(), params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < len(s) - 1 for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            engine.step()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time_total / PROFILED_STEPS / 1e3  # ms per step
    engine.shutdown()  # frees the device memory for the next batch's engine
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])
    profile = {"batch": batch, "device_ms": sum(per_kernel.values()),
               "kernels": [{"name": name[:90], "ms": ms} for name, ms in top[:TOP_KERNELS]]}
    print(f"\ndecode batch {batch}: {profile['device_ms']:.2f} ms of kernels per step", flush=True)
    for kernel in profile["kernels"]:
        print(f"  {kernel['ms']:>7.3f} ms  {kernel['name']}", flush=True)
    return profile


def decode_inputs(
    batch: int, rng: np.random.Generator, contexts: np.ndarray | None = None
) -> tuple[BatchLayout, torch.Tensor, torch.Tensor]:
    """A decode step over shuffled blocks; every context CONTEXT long unless given."""
    contexts = np.full(batch, CONTEXT, dtype=np.int64) if contexts is None else contexts
    per_seq = -(-int(contexts.max()) // BLOCK)
    num_blocks = batch * per_seq + 8
    tables = rng.permutation(num_blocks)[: batch * per_seq].reshape(batch, per_seq)
    positions = contexts - 1
    layout = BatchLayout(
        query_lens=np.ones(batch, dtype=np.int64), context_lens=contexts,
        block_tables=tables, slot_mapping=tables[np.arange(batch), positions // BLOCK] * BLOCK + positions % BLOCK,
        num_decodes=batch,
    )
    arena = torch.randn(num_blocks, ARENA_LAYERS, 2, BLOCK, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return layout, arena[:, 1], q


def sweep_tiles(batch: int) -> list[dict]:
    layout, kv_layer, q = decode_inputs(batch, np.random.default_rng(batch))
    kv_bytes = batch * CONTEXT * 2 * NUM_KV_HEADS * HEAD_DIM * kv_layer.element_size()
    rows = []
    for keys, warps, stages in itertools.product(TILE_KEYS, TILE_WARPS, TILE_STAGES):
        tile = dataclasses.replace(TritonAttentionBackend.tuned_tiles(HEAD_DIM, torch.bfloat16),
                                   decode_block_n=keys, decode_warps=warps, decode_stages=stages)
        backend = TritonAttentionBackend(BLOCK, tiles=tile)
        meta = backend.build_metadata(layout, q.device)
        torch.cuda.synchronize()  # the metadata is copied on this stream; do_bench_cudagraph runs on another
        try:
            ms = float(triton.testing.do_bench_cudagraph(lambda b=backend, m=meta: b.attend(q, kv_layer, m, None), rep=30,
                                                         return_mode="median"))
        except Exception as e:  # noqa: BLE001 - reported; a device error leaves the context unusable
            rows.append({"batch": batch, "keys": keys, "warps": warps, "stages": stages,
                         "error": f"{type(e).__name__}: {str(e)[:120]}"})
            print(f"batch {batch}, keys {keys}, warps {warps}, stages {stages}: {rows[-1]['error']}")
            if isinstance(e, torch.AcceleratorError):
                break
            continue
        rows.append({"batch": batch, "keys": keys, "warps": warps, "stages": stages, "ms": ms,
                     "TBps": kv_bytes / ms / 1e9})
    return rows


def sweep_splits(mix: str, batch: int) -> list[dict]:
    """One context mix at one batch size, the default tile, each split count."""
    low, high = CONTEXT_MIXES[mix]
    rng = np.random.default_rng(batch + 1)
    contexts = rng.integers(low, high + 1, batch)
    layout, kv_layer, q = decode_inputs(batch, rng, contexts)
    kv_bytes = int(contexts.sum()) * 2 * NUM_KV_HEADS * HEAD_DIM * kv_layer.element_size()
    rows = []
    for forced in SPLIT_COUNTS:
        backend = TritonAttentionBackend(BLOCK, decode_splits=forced)
        meta = backend.build_metadata(layout, q.device)
        torch.cuda.synchronize()  # the metadata is copied on this stream; do_bench_cudagraph runs on another
        ms = float(triton.testing.do_bench_cudagraph(lambda b=backend, m=meta: b.attend(q, kv_layer, m, None), rep=30,
                                                     return_mode="median"))
        rows.append({"mix": mix, "batch": batch, "forced_splits": forced,
                     "splits": next(iter(meta.decode_splits.values())), "ms": ms, "TBps": kv_bytes / ms / 1e9})
    return rows


def print_splits(rows: list[dict]) -> None:
    """Per mix and batch: TB/s of KV read with the plan and with each forced split count."""
    forced = [n for n in SPLIT_COUNTS if n is not None]
    print("\nTB/s of KV read by key splits per sequence (plan: the backend's choice)")
    print(f"{'mix':>9} {'batch':>5} {'plan':>10} " + " ".join(f"{n:>5}" for n in forced))
    for mix in CONTEXT_MIXES:
        for batch in SPLIT_BATCHES:
            by_count = {r["forced_splits"]: r for r in rows if r["mix"] == mix and r["batch"] == batch}
            if not by_count:
                continue
            plan = by_count[None]
            print(f"{mix:>9} {batch:>5} {plan['TBps']:>5.2f} ({plan['splits']}) "
                  + " ".join(f"{by_count[n]['TBps']:>5.2f}" for n in forced))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/decode_breakdown.json")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--skip-tiles", action="store_true")
    args = parser.parse_args()
    report: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.skip_profile:
        report["profiles"] = [profile_decode(batch) for batch in BATCHES]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report["tiles"] = []
    for batch in () if args.skip_tiles else BATCHES:
        report["tiles"] += sweep_tiles(batch)
        Path(args.out).write_text(json.dumps(report, indent=2))

    report["splits"] = [row for mix in CONTEXT_MIXES for batch in SPLIT_BATCHES for row in sweep_splits(mix, batch)]
    Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"\n{report['device']}: Triton decode attention, ctx {CONTEXT}, graph-replayed")
    print(f"{'batch':>5} {'keys':>5} {'warps':>5} {'stages':>6} {'ms':>8} {'TB/s':>6}")
    shown = [r for batch in BATCHES for r in sorted((r for r in report["tiles"] if r["batch"] == batch and "ms" in r),
                                                    key=lambda r: r["ms"])[:SHOWN_TILES]]
    for row in shown:
        print(f"{row['batch']:>5} {row['keys']:>5} {row['warps']:>5} {row['stages']:>6} "
              f"{row['ms']:>8.3f} {row['TBps']:>6.2f}")
    print_splits(report["splits"])

if __name__ == "__main__":
    main()
