"""Triton attention kernels against the torch reference backend, on realistic shapes (GPU).

Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128, bfloat16, KV block 16), one
layer's KV taken as a strided view of a block-major arena of several layers, shuffled block ids:

* decode batches of 1 .. 256 sequences with 1k context (and one with a sliding window),
* a 4k-token prefill (and one with a sliding window),
* a 2k-token chunk after 2k tokens of prior context,
* a mixed step: 64 decodes and a 1k-token chunk after 1k tokens of context.

For each case: the Triton KV write must equal the torch write bit for bit; the Triton output
(bf16) is compared with the torch reference run in float32 on the same bf16 inputs, and must
have no NaN and a relative error max|out - ref| / max|ref| < 1e-2. It also checks that
build_metadata + attend make no device-to-host sync (torch's sync debug mode). Times are the
median of triton.testing.do_bench (ms) for Triton attend, torch attend (bf16) and both KV writes;
"graph ms" replays Triton attend from a CUDA graph (GPU time without Python launch overhead). Decode
reports KV bytes read per second, prefill attention TFLOP/s (causal, exact counts), both from the
eager Triton time.

    python benchmarks/check_triton_attention.py --out results/check_triton_attention.json
    python benchmarks/check_triton_attention.py --tiny --out /tmp/tiny.json   # CPU, interpreter

Exit status 1 if any check fails (the JSON is written first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (smoke check)")
    p.add_argument("--layers", type=int, default=4, help="layers per arena block (the KV view is layer 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rel-tol", type=float, default=1e-2)
    return p.parse_args()


ARGS = parse_args()
if ARGS.tiny:
    # Must precede the first import of triton (torch may import it too).
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from attention_steps import random_layout

from kunserve.kernels.attention import TorchAttentionBackend
from kunserve.kernels.triton_attention import TritonAttentionBackend


@dataclass
class Shape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype


@dataclass
class Case:
    name: str
    kind: str  # decode | prefill | mixed
    seqs: list[tuple[int, int]]  # (query_len, context_len), decodes first
    window: int | None = None


def cases(tiny: bool) -> tuple[Shape, list[Case]]:
    if tiny:
        shape = Shape(num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.bfloat16)
        return shape, [
            Case("decode b=1 ctx=40", "decode", [(1, 40)]),
            Case("decode b=3 ctx=40", "decode", [(1, 40)] * 3),
            Case("decode b=3 ctx=40 win=9", "decode", [(1, 40)] * 3, 9),
            Case("prefill 48", "prefill", [(48, 48)]),
            Case("prefill 48 win=9", "prefill", [(48, 48)], 9),
            Case("chunk 24 after 24", "prefill", [(24, 48)]),
            Case("mixed 3 dec + chunk", "mixed", [(1, 30)] * 3 + [(16, 32)]),
        ]
    shape = Shape(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
    decodes = [Case(f"decode b={b} ctx=1k", "decode", [(1, 1024)] * b) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    return shape, decodes + [
        Case("decode b=64 ctx=1k win=256", "decode", [(1, 1024)] * 64, 256),
        Case("prefill 4k", "prefill", [(4096, 4096)]),
        Case("prefill 4k win=1k", "prefill", [(4096, 4096)], 1024),
        Case("chunk 2k after 2k", "prefill", [(2048, 4096)]),
        Case("mixed 64 dec + 1k chunk after 1k", "mixed", [(1, 1024)] * 64 + [(1024, 2048)]),
    ]


def make_step(case: Case, shape: Shape, layers: int, device: torch.device, rng: np.random.Generator):
    bs = shape.block_size
    batch, num_blocks = random_layout(case.seqs, bs, rng, spare_blocks=8, pad_columns=0)
    gen = torch.Generator(device=device).manual_seed(int(rng.integers(1 << 31)))
    arena = torch.randn(
        num_blocks, layers, 2, bs, shape.num_kv_heads, shape.head_dim, generator=gen, device=device, dtype=shape.dtype
    )
    tokens = int(batch.query_lens.sum())
    q = torch.randn(tokens, shape.num_heads, shape.head_dim, generator=gen, device=device, dtype=shape.dtype)
    k = torch.randn(tokens, shape.num_kv_heads, shape.head_dim, generator=gen, device=device, dtype=shape.dtype)
    v = torch.randn(tokens, shape.num_kv_heads, shape.head_dim, generator=gen, device=device, dtype=shape.dtype)
    return batch, arena, q, k, v


def visible_keys(case: Case) -> int:
    """Sum over queries of the keys each one attends to."""
    total = 0
    for q, ctx in case.seqs:
        pos = np.arange(ctx - q, ctx, dtype=np.int64)
        keys = pos + 1 if case.window is None else np.minimum(pos + 1, case.window)
        total += int(keys.sum())
    return total


def bench(fn, device: torch.device) -> float:
    """Median ms; on CPU (interpreter) a single timed run."""
    if device.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench_graph(fn, device: torch.device) -> float | None:
    """Median ms of fn replayed from a CUDA graph: GPU time without Python launch overhead
    (small decodes are launch-bound when timed eagerly). None where capture fails."""
    if device.type != "cuda":
        return None
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    except Exception as e:  # noqa: BLE001 - capture can fail (e.g. an allocator or driver restriction)
        print(f"  cuda graph timing failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def no_sync(fn) -> bool | None:
    """True if fn issues no synchronizing CUDA call (per torch's sync debug mode)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "set_sync_debug_mode"):
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError as e:
        print(f"  sync detected: {e}", file=sys.stderr)
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def run_case(case: Case, shape: Shape, layers: int, device: torch.device, rng: np.random.Generator, tol: float) -> dict:
    layer = 1 if layers > 1 else 0
    batch, arena, q, k, v = make_step(case, shape, layers, device, rng)
    tri, ref = TritonAttentionBackend(shape.block_size), TorchAttentionBackend(shape.block_size)
    tri_meta = tri.build_metadata(batch, device)
    ref_meta = ref.build_metadata(batch, device)

    # KV write: bit-exact against the torch write, other layers untouched.
    tri_arena, ref_arena = arena, arena.clone()
    kv_tri, kv_ref = tri_arena[:, layer], ref_arena[:, layer]
    assert kv_tri.stride(0) != 2 * shape.block_size * shape.num_kv_heads * shape.head_dim or layers == 1
    tri.write_kv(kv_tri, k, v, tri_meta)
    ref.write_kv(kv_ref, k, v, ref_meta)
    write_exact = bool(torch.equal(tri_arena, ref_arena))
    del ref_arena

    out = tri.attend(q, kv_tri, tri_meta, case.window)
    if device.type == "cuda":
        torch.cuda.synchronize()
    # Reference in float32 on the same bf16 values (a float32 copy of this layer's KV).
    kv32 = kv_tri.float()
    expected = ref.attend(q.float(), kv32, ref_meta, case.window)
    del kv32
    has_nan = bool(torch.isnan(out).any())
    abs_err = (out.float() - expected).abs().max().item()
    rel_err = abs_err / max(expected.abs().max().item(), 1e-30)
    del expected

    def build_and_attend() -> None:
        meta = tri.build_metadata(batch, device)
        tri.attend(q, kv_tri, meta, case.window)

    sync_free = no_sync(build_and_attend)

    t_tri = bench(lambda: tri.attend(q, kv_tri, tri_meta, case.window), device)
    t_tri_graph = bench_graph(lambda: tri.attend(q, kv_tri, tri_meta, case.window), device)
    t_ref = bench(lambda: ref.attend(q, kv_tri, ref_meta, case.window), device)
    t_write_tri = bench(lambda: tri.write_kv(kv_tri, k, v, tri_meta), device)
    t_write_ref = bench(lambda: ref.write_kv(kv_tri, k, v, ref_meta), device)
    reps = 20 if device.type == "cuda" else 1
    start = time.perf_counter()
    for _ in range(reps):
        tri.build_metadata(batch, device)
    t_meta_us = (time.perf_counter() - start) / reps * 1e6

    elem = torch.finfo(shape.dtype).bits // 8
    kv_bytes = 0
    for _, ctx in case.seqs:  # K and V of the visible keys of each sequence, read once per kv head
        keys = ctx if case.window is None else min(ctx, case.window)
        kv_bytes += 2 * keys * shape.num_kv_heads * shape.head_dim * elem
    flops = 4 * shape.num_heads * shape.head_dim * visible_keys(case)
    ok = write_exact and not has_nan and rel_err < tol and sync_free is not False
    return {
        "case": case.name,
        "kind": case.kind,
        "num_seqs": len(case.seqs),
        "num_tokens": int(batch.query_lens.sum()),
        "window": case.window,
        "decode_splits": {f"{k[0]}:{k[1]}": s for k, s in tri_meta.decode_splits.items()},
        "write_exact": write_exact,
        "has_nan": has_nan,
        "max_abs_err": abs_err,
        "rel_err": rel_err,
        "sync_free": sync_free,
        "triton_ms": t_tri,
        "triton_graph_ms": t_tri_graph,
        "torch_ms": t_ref,
        "write_triton_ms": t_write_tri,
        "write_torch_ms": t_write_ref,
        "build_metadata_us": t_meta_us,
        "kv_gbps": kv_bytes / (t_tri * 1e-3) / 1e9,
        "tflops": flops / (t_tri * 1e-3) / 1e12,
        "ok": ok,
    }


def main() -> int:
    device = torch.device("cpu" if ARGS.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --tiny for the CPU interpreter smoke check", file=sys.stderr)
        return 2
    shape, case_list = cases(ARGS.tiny)
    rng = np.random.default_rng(ARGS.seed)
    results = []
    header = (
        f"{'case':34} {'tok':>5} {'abs err':>9} {'rel err':>9} {'triton ms':>10} {'graph ms':>9} {'torch ms':>9} "
        f"{'KV GB/s':>8} {'TFLOP/s':>8} {'write ms':>9} {'meta us':>8} ok"
    )
    print(header)
    print("-" * len(header))
    for case in case_list:
        try:
            r = run_case(case, shape, ARGS.layers, device, rng, ARGS.rel_tol)
        except Exception as e:  # noqa: BLE001 - keep going: one broken case must not hide the others
            r = {"case": case.name, "kind": case.kind, "error": f"{type(e).__name__}: {e}", "ok": False}
            print(f"{case.name:34} ERROR {r['error']}")
        else:
            rate = f"{r['kv_gbps']:8.0f} {'':>8}" if case.kind == "decode" else f"{'':>8} {r['tflops']:8.1f}"
            graph = "" if r["triton_graph_ms"] is None else f"{r['triton_graph_ms']:.4f}"
            print(
                f"{case.name:34} {r['num_tokens']:5d} {r['max_abs_err']:9.2e} {r['rel_err']:9.2e} "
                f"{r['triton_ms']:10.4f} {graph:>9} {r['torch_ms']:9.4f} {rate} {r['write_triton_ms']:9.4f} "
                f"{r['build_metadata_us']:8.0f} {'yes' if r['ok'] else 'NO'}"
            )
        results.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    all_ok = all(r["ok"] for r in results)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {
            "num_heads": shape.num_heads,
            "num_kv_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
            "block_size": shape.block_size,
            "dtype": str(shape.dtype),
            "arena_layers": ARGS.layers,
        },
        "rel_tol": ARGS.rel_tol,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "cases": results,
        "all_ok": all_ok,
    }
    os.makedirs(os.path.dirname(os.path.abspath(ARGS.out)), exist_ok=True)
    with open(ARGS.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{'all checks passed' if all_ok else 'SOME CHECKS FAILED'}; wrote {ARGS.out}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
