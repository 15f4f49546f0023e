"""The Triton prefill-attention kernel over tile configurations, beside torch's reference.

Llama-3-8B attention shapes (32 query / 8 KV heads, head_dim 128, bf16, block 16, shuffled
blocks of a 2-layer block-major arena), three prefill steps: one fresh 4k prompt; the prompts
of a 4096-token step of benchmarks/engine.py's workload (c) (fresh prompts of 100..1024
tokens); a 2k chunk after 2k of context. For each tile configuration (query rows per tile,
keys per tile, warps, pipeline stages) the kernel is timed replayed from a CUDA graph, as
causal attention TFLOP/s; the torch reference backend is timed eagerly for comparison.

    python benchmarks/prefill_tiles.py --out $OUT/prefill_tiles.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
import triton.testing

from kunserve.kernels.attention import TorchAttentionBackend
from kunserve.kernels.triton_attention import TritonAttentionBackend
from kunserve.step import BatchLayout

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
ARENA_LAYERS = 2
STEP_TOKENS = 4096
E2E_MIN_LEN, E2E_MAX_LEN = 100, 1024
TILE_ROWS, TILE_KEYS, TILE_WARPS, TILE_STAGES = (64, 128), (32, 64, 128), (4, 8), (2, 3, 4)
SHOWN_TILES = 6  # fastest configurations printed per step (the JSON has all)
REPEAT_MS = 30


def e2e_prompt_lens(rng: np.random.Generator) -> list[int]:
    """Fresh prompts of workload (c) filling one step's token budget, the last one cut."""
    lens: list[int] = []
    while sum(lens) < STEP_TOKENS:
        lens.append(min(int(rng.integers(E2E_MIN_LEN, E2E_MAX_LEN + 1)), STEP_TOKENS - sum(lens)))
    return lens


def prefill_step(query_lens: list[int], context_lens: list[int], rng: np.random.Generator) -> BatchLayout:
    """A prefill-only step over shuffled blocks."""
    per_seq = -(-max(context_lens) // BLOCK)
    num_blocks = len(query_lens) * per_seq + 8
    tables = rng.permutation(num_blocks)[: len(query_lens) * per_seq].reshape(len(query_lens), per_seq)
    slots = [tables[i, pos // BLOCK] * BLOCK + pos % BLOCK
             for i, (q, ctx) in enumerate(zip(query_lens, context_lens))
             for pos in [np.arange(ctx - q, ctx)]]
    return BatchLayout(query_lens=np.array(query_lens), context_lens=np.array(context_lens), block_tables=tables,
                       slot_mapping=np.concatenate(slots), num_decodes=0)


def causal_flops(query_lens: list[int], context_lens: list[int]) -> float:
    """QK^T and PV over the visible keys of every query row."""
    visible = sum(q * (ctx - q) + q * (q + 1) / 2 for q, ctx in zip(query_lens, context_lens))
    return 4.0 * NUM_HEADS * HEAD_DIM * visible


def sweep(name: str, query_lens: list[int], context_lens: list[int], rng: np.random.Generator) -> dict:
    layout = prefill_step(query_lens, context_lens, rng)
    num_blocks = layout.block_tables.size + 8
    arena = torch.randn(num_blocks, ARENA_LAYERS, 2, BLOCK, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    kv_layer = arena[:, 1]
    q = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    flops = causal_flops(query_lens, context_lens)
    reference = TorchAttentionBackend(BLOCK)
    ref_meta = reference.build_metadata(layout, q.device)
    torch_ms = float(triton.testing.do_bench(lambda: reference.attend(q, kv_layer, ref_meta, None), rep=REPEAT_MS,
                                             return_mode="median"))
    tiles = []
    for rows, keys, warps, stages in itertools.product(TILE_ROWS, TILE_KEYS, TILE_WARPS, TILE_STAGES):
        tile = dataclasses.replace(TritonAttentionBackend.tuned_tiles(HEAD_DIM, torch.bfloat16), prefill_block_m=rows,
                                   prefill_block_n=keys, prefill_warps=warps, prefill_stages=stages)
        backend = TritonAttentionBackend(BLOCK, tiles=tile)
        meta = backend.build_metadata(layout, q.device)
        torch.cuda.synchronize()  # the metadata is copied on this stream; do_bench_cudagraph runs on another
        try:
            ms = float(triton.testing.do_bench_cudagraph(lambda b=backend, m=meta: b.attend(q, kv_layer, m, None),
                                                         rep=REPEAT_MS, return_mode="median"))
        except Exception as e:  # noqa: BLE001 - reported; a device error leaves the context unusable
            tiles.append({"rows": rows, "keys": keys, "warps": warps, "stages": stages,
                          "error": f"{type(e).__name__}: {str(e)[:120]}"})
            if isinstance(e, torch.AcceleratorError):
                break
            continue
        tiles.append({"rows": rows, "keys": keys, "warps": warps, "stages": stages, "ms": ms, "TFLOPs": flops / ms / 1e9})
    return {"step": name, "prompts": len(query_lens), "tokens": sum(query_lens), "torch_ms": torch_ms,
            "torch_TFLOPs": flops / torch_ms / 1e9, "tiles": tiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/prefill_tiles.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    e2e_lens = e2e_prompt_lens(rng)
    steps = {"fresh 4k": ([4096], [4096]), "step of (c)": (e2e_lens, e2e_lens), "2k after 2k": ([2048], [4096])}
    default = TritonAttentionBackend.tuned_tiles(HEAD_DIM, torch.bfloat16)
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "default_tile": [default.prefill_block_m, default.prefill_block_n, default.prefill_warps,
                               default.prefill_stages],
              "steps": [sweep(name, q, ctx, rng) for name, (q, ctx) in steps.items()]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"\n{report['device']}: Triton prefill attention by tile (rows, keys, warps, stages); "
          f"default {tuple(report['default_tile'])}")
    for step in report["steps"]:
        timed = sorted((t for t in step["tiles"] if "ms" in t), key=lambda t: t["ms"])
        current = next(t for t in timed if [t["rows"], t["keys"], t["warps"], t["stages"]] == report["default_tile"])
        print(f"{step['step']} ({step['prompts']} prompts, {step['tokens']} tokens): torch {step['torch_ms']:.3f} ms "
              f"({step['torch_TFLOPs']:.0f} TFLOP/s), default tile {current['ms']:.3f} ms ({current['TFLOPs']:.0f})")
        for t in timed[:SHOWN_TILES]:
            print(f"  {t['rows']:>4} {t['keys']:>4} {t['warps']:>2} {t['stages']:>2}  {t['ms']:.3f} ms  {t['TFLOPs']:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
