"""CPU kernels in isolation, on benchmarks/cpu_offline.py's shapes (tiny Llama: 4 query / 2 KV
heads of 64, hidden 256, a block-major arena of 4 layers, block 16, batch 64):

1. decode attention: the torch reference (gather the blocks, SDPA) against the C kernel
   (kunserve/kernels/cpu_attention.py), warm and with the caches flushed before each call (as
   in a step, where the GEMMs evict the KV), the kernel's KV read rate, and what loading the
   kernel costs (a build into an empty cache, then a load from the cache);
2. elementwise ops (RMSNorm, SiLU-mul): torch eager, compiled one by one by TorchInductor, and
   the C kernels (kunserve/kernels/cpu_fused.py), and what a call of a compiled function costs
   beyond its kernel (`x + 1`).

Best of several timed batches of calls.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/cpu_kernels.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch

from kunserve.kernels import cpu_fused, native
from kunserve.kernels.attention import TorchAttentionBackend
from kunserve.kernels.cpu_attention import CpuAttentionBackend
from kunserve.kernels.fused import rms_norm_torch, silu_mul_torch
from kunserve.step import BatchLayout

NUM_BLOCKS, LAYERS, BLOCK, KV_HEADS, GROUP, HEAD_DIM, BATCH = 1204, 4, 16, 2, 2, 64, 64
HIDDEN, INTERMEDIATE = 256, 688
CONTEXTS = (129, 160, 192)
FLUSH_BYTES = 64 << 20  # more than the machine's last-level cache share


def best_us(fn: Callable[[], object], calls: int, flush: torch.Tensor | None = None) -> float:
    """Best mean over 5 batches of `calls` calls, in µs; with `flush`, the caches are flushed
    (untimed) before every call."""
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(5):
        total = 0.0
        for _ in range(calls):
            if flush is not None:
                flush.mul_(1.0)
            start = time.perf_counter()
            fn()
            total += time.perf_counter() - start
        best = min(best, total / calls)
    return best * 1e6


def decode_step(context: int, generator: torch.Generator) -> tuple[BatchLayout, torch.Tensor, torch.Tensor]:
    blocks = -(-context // BLOCK)
    tables = torch.randperm(NUM_BLOCKS, generator=generator)[: BATCH * blocks].view(BATCH, blocks).numpy()
    layout = BatchLayout(
        query_lens=torch.ones(BATCH, dtype=torch.int64).numpy(),
        context_lens=torch.full((BATCH,), context, dtype=torch.int64).numpy(),
        block_tables=tables, slot_mapping=tables[:, -1] * BLOCK + (context - 1) % BLOCK, num_decodes=BATCH,
    )
    arena = torch.randn(NUM_BLOCKS, LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM, generator=generator)
    return layout, arena[:, 1], torch.randn(BATCH, KV_HEADS * GROUP, HEAD_DIM, generator=generator)


def kernel_load_seconds() -> tuple[float, float]:
    """(build into an empty cache, load from the cache) of the C kernel library, in seconds."""
    timings = []
    previous = os.environ.get("KUNSERVE_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KUNSERVE_CACHE_DIR"] = cache
        try:
            for _ in range(2):
                native.load_library.cache_clear()
                start = time.perf_counter()
                native.load_library("cpu_attention")
                timings.append(time.perf_counter() - start)
        finally:
            if previous is None:
                del os.environ["KUNSERVE_CACHE_DIR"]
            else:
                os.environ["KUNSERVE_CACHE_DIR"] = previous
    native.load_library.cache_clear()
    return timings[0], timings[1]


def bench_attention(calls: int) -> None:
    generator = torch.Generator().manual_seed(0)
    flush = torch.randn(FLUSH_BYTES // 4)
    build, load = kernel_load_seconds()
    print(f"the C kernel: built in {build:.2f} s, loaded from the cache in {load * 1e3:.1f} ms")
    reference, kernel = TorchAttentionBackend(BLOCK), CpuAttentionBackend(BLOCK)
    if not kernel.uses_kernel:
        raise SystemExit("the C decode kernel could not be built here")
    print(f"decode attention, batch {BATCH}: µs per call (reference = gather + SDPA)")
    print(f"{'keys':>5} {'reference':>10} {'C kernel':>9} {'speedup':>8} {'ref cold':>9} {'C cold':>7} "
          f"{'KV MB':>6} {'GB/s cold':>10}")
    for context in CONTEXTS:
        layout, kv_layer, q = decode_step(context, generator)
        ref_meta, kernel_meta = reference.build_metadata(layout, q.device), kernel.build_metadata(layout, q.device)
        got, expected = kernel.attend(q, kv_layer, kernel_meta, None), reference.attend(q, kv_layer, ref_meta, None)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        timings = [best_us(partial(b.attend, q, kv_layer, m, None), calls, f)
                   for f in (None, flush) for b, m in ((reference, ref_meta), (kernel, kernel_meta))]
        kv_mb = BATCH * context * 2 * KV_HEADS * HEAD_DIM * 4 / 1e6
        print(f"{context:>5} {timings[0]:>10.0f} {timings[1]:>9.0f} {timings[0] / timings[1]:>7.2f}x "
              f"{timings[2]:>9.0f} {timings[3]:>7.0f} {kv_mb:>6.1f} {kv_mb * 1e3 / timings[3]:>10.1f}")


def bench_elementwise(calls: int) -> None:
    norm, silu_mul, plus_one = (torch.compile(fn, options={"compile_threads": 1})
                                for fn in (rms_norm_torch, silu_mul_torch, torch.Tensor.__add__))
    c_norm = partial(cpu_fused.add_rms_norm, residual=None)
    print("\nelementwise ops, µs per call: torch eager / compiled one by one / C kernel")
    for rows in (BATCH, 2048):
        x, weight, gate_up = torch.randn(rows, HIDDEN), torch.randn(HIDDEN), torch.randn(rows, 2 * INTERMEDIATE)
        for tensor in (x, gate_up):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        cases = {  # name: (eager, compiled, C kernel or None, arguments)
            "rms_norm": (rms_norm_torch, norm, lambda x, w, eps: c_norm(x, weight=w, eps=eps), (x, weight, 1e-5)),
            "silu_mul": (silu_mul_torch, silu_mul, cpu_fused.silu_mul, (gate_up,)),
            "x + 1": (torch.Tensor.__add__, plus_one, None, (x, 1)),
        }
        for name, (eager, compiled, kernel, arguments) in cases.items():
            c_us = f"{best_us(partial(kernel, *arguments), calls):7.1f}" if kernel is not None else "      -"
            print(f"{rows:>5} rows {name:>9}: {best_us(partial(eager, *arguments), calls):7.1f} / "
                  f"{best_us(partial(compiled, *arguments), calls):7.1f} / {c_us}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_attention(args.calls)
    bench_elementwise(args.calls * 4)


if __name__ == "__main__":
    main()
