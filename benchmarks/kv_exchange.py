"""KV exchange between two GPUs, method by method (nvidia-h200-x2).

Two worker processes, one per GPU, each with an arena of `--arena-gib`; each maps the other's
arena (CUDA IPC, as kunserve's workers do) and both move `--gib` of 1 MiB sub-blocks (a drop's
exchange at Llama-3-8B sizes: a 16-token block of 32 layers is 2 MiB, half of it per stage)
at the same time, in opposite directions. Methods:

  * torch_chunked: gather on the peer GPU, device-to-device copy, scatter here, 256 MiB
    chunks, index tensors built per chunk (what `pull_kv` did);
  * torch_queued: the same with all index tensors uploaded first, nothing waiting on the host
    (what `pull_kv` does now, through kunserve/kernels/kv_copy.py).

A Triton kernel loading the peer's memory directly is not among them: Triton refuses the
IPC-mapped pointer ("cannot be accessed from Triton") even after cudaDeviceEnablePeerAccess
between the two devices succeeded (tried on 2x H200, 2026-11-22).

Bandwidth = bytes moved in both directions / wall time of the slower process. Every method's
result is checked bit for bit against the source.

    python benchmarks/kv_exchange.py --out $OUT/kv_exchange.json
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import torch
import torch.multiprocessing as mp

from kunserve.kernels.kv_copy import copy_sub_blocks

SUB_BLOCK_BYTES = 1 << 20
CHUNK_BYTES = 256 << 20
METHODS = ("torch_chunked", "torch_queued")
REPEATS = 3


def torch_chunked(peer: torch.Tensor, src: list[int], here: torch.Tensor, dst: list[int]) -> None:
    per_chunk = CHUNK_BYTES // SUB_BLOCK_BYTES
    for start in range(0, len(src), per_chunk):
        sources = torch.tensor(src[start : start + per_chunk], device=peer.device)
        gathered = peer.index_select(0, sources).to(here.device, non_blocking=True)
        here.index_copy_(0, torch.tensor(dst[start : start + per_chunk], device=here.device), gathered)


def sources_of(rank: int, moved: int) -> list[int]:
    """Every other sub-block of the first 2*moved: one stage's half of each block."""
    return list(range(1 - rank, 2 * moved, 2))[:moved]


def targets_of(rank: int, moved: int, rows: int) -> list[int]:
    """The upper part of the arena (where released layers would be), shuffled."""
    generator = torch.Generator().manual_seed(rank)
    return torch.randperm(rows - 2 * moved, generator=generator)[:moved].add(2 * moved).tolist()


def run_method(method: str, peer: torch.Tensor, arena: torch.Tensor, src: list[int], dst: list[int]) -> None:
    if method == "torch_chunked":
        torch_chunked(peer, src, arena, dst)
    else:
        copy_sub_blocks(peer, torch.tensor(src), arena, torch.tensor(dst))


def rows_equal(a: torch.Tensor, a_ids: list[int], b: torch.Tensor, b_ids: list[int]) -> bool:
    """Bit for bit (random bits include NaNs, which torch.equal on bfloat16 would reject)."""
    step = 256
    a, b = a.view(torch.int16), b.view(torch.int16)
    return all(
        torch.equal(a.index_select(0, torch.tensor(a_ids[i : i + step], device=a.device)),
                    b.index_select(0, torch.tensor(b_ids[i : i + step], device=b.device)).to(a.device))
        for i in range(0, len(a_ids), step)
    )


def worker(rank: int, args: argparse.Namespace, handles: list, results: mp.Queue, barrier) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    rows = int(args.arena_gib * (1 << 30)) // SUB_BLOCK_BYTES
    arena = torch.empty(rows, SUB_BLOCK_BYTES // 2, dtype=torch.bfloat16, device=device)
    arena.view(torch.int16).copy_(torch.randint(-(1 << 15), 1 << 15, arena.shape, dtype=torch.int16, device=device))
    handles[1 - rank].put(bytes(ForkingPickler.dumps(arena)))
    peer = pickle.loads(handles[rank].get(timeout=300))
    moved = int(args.gib * (1 << 30)) // SUB_BLOCK_BYTES
    out = {}
    for method in METHODS:
        src, dst = sources_of(rank, moved), targets_of(rank, moved, rows)
        times, error = [], None
        for _ in range(REPEATS):
            barrier.wait()
            start = time.perf_counter()
            try:
                run_method(method, peer, arena, src, dst)
                torch.cuda.synchronize(device)
                torch.cuda.synchronize(peer.device)
            except (RuntimeError, ValueError, TypeError) as exc:  # a method the driver refuses is reported
                error = f"{type(exc).__name__}: {exc}"
            times.append(time.perf_counter() - start)
            if error:
                break
        barrier.wait()  # both directions done before checking
        identical = error is None and rows_equal(
            arena, targets_of(rank, moved, rows), peer, sources_of(rank, moved))
        out[method] = {"times_s": times, "error": error, "identical": identical}
        barrier.wait()
    results.put((rank, out, moved * SUB_BLOCK_BYTES))
    barrier.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arena-gib", type=float, default=24.0)
    parser.add_argument("--gib", type=float, default=8.0, help="moved per direction")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs")
    ctx = mp.get_context("spawn")
    handles, results, barrier = [ctx.Queue(), ctx.Queue()], ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=worker, args=(r, args, handles, results, barrier)) for r in range(2)]
    for p in procs:
        p.start()
    outs: dict[int, dict] = {}
    per_direction = 0
    for _ in range(2):
        rank, out, nbytes = results.get(timeout=900)
        outs[rank] = out
        per_direction = nbytes
    for p in procs:
        p.join()
    rows = []
    print(f"{'method':<15} {'best ms':>9} {'GB/s (both dirs)':>17} identical")
    for method in METHODS:
        errors = [outs[r][method]["error"] for r in range(2) if outs[r][method]["error"]]
        if errors:
            print(f"{method:<15} failed: {errors[0]}")
            rows.append({"method": method, "error": errors[0]})
            continue
        walls = [max(a, b) for a, b in zip(outs[0][method]["times_s"], outs[1][method]["times_s"])]
        best = min(walls)
        gbps = 2 * per_direction / best / 1e9
        identical = outs[0][method]["identical"] and outs[1][method]["identical"]
        print(f"{method:<15} {best * 1e3:>9.1f} {gbps:>17.1f} {identical}")
        rows.append({"method": method, "walls_s": walls, "gb_per_s": gbps, "identical": identical})
    result = {"device": torch.cuda.get_device_name(0), "bytes_per_direction": per_direction, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
