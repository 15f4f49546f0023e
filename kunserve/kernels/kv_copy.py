"""Copy whole KV (sub-)blocks between arenas: the data path of the KV exchange and of
evacuations within one arena.

A KV exchange moves thousands of scattered sub-blocks (one per block and stage, ~1 MiB each
at 8B sizes) from a peer's arena, mapped into this process through CUDA IPC, into this
device's. Across devices the copy is torch's: a gather in the peer's memory, one copy over
NVLink, a scatter here, in bounded chunks of staging (measured at ~390 GB/s each way on
2xH200, docs/benchmarks.md). A Triton kernel that loads straight from the peer would save
the staging pass, but Triton refuses pointers into IPC-mapped peer memory, so it serves
copies within one GPU (evacuations: one pass, no staging). On CPU tensors the Triton
kernel runs under its interpreter in tests.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch version only
    triton = tl = None

# Bytes each kernel program moves: 64 KiB of loads in flight per program keeps NVLink busy
# with a few programs per SM.
COPY_TILE_BYTES = 64 << 10
# Staging the torch path gathers at a time: bounded, so an exchange fits beside a full cache.
TORCH_STAGING_BYTES = 256 << 20


def copy_sub_blocks(
    src: torch.Tensor,
    src_ids: torch.Tensor,
    dst: torch.Tensor,
    dst_ids: torch.Tensor,
    backend: str = "auto",
    run_on: torch.device | None = None,
    staging_bytes: int = TORCH_STAGING_BYTES,
) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for every i, where src and dst are [n, ...] views of
    arenas with equal row shapes; either may live on another device (a mapped peer arena).
    The Triton kernel runs on `run_on` (default: dst's device); the torch path gathers at
    most `staging_bytes` at a time."""
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(f"rows differ: {tuple(src.shape[1:])} {src.dtype} vs {tuple(dst.shape[1:])} {dst.dtype}")
    if src_ids.shape != dst_ids.shape:
        raise ValueError(f"ids differ in length: {src_ids.numel()} vs {dst_ids.numel()}")
    if src_ids.numel() == 0:
        return
    run_on = dst.device if run_on is None else run_on
    # Across devices, "auto" takes torch's copy engines: Triton can only address a peer's
    # memory where this process enabled peer access to it, which torch does not expose.
    same_device = src.device == dst.device == run_on
    use_triton = backend == "triton" or (backend == "auto" and same_device and run_on.type == "cuda"
                                         and triton is not None)
    if not use_triton:
        src_ids, dst_ids = src_ids.to(src.device), dst_ids.to(dst.device)
        per_chunk = max(1, staging_bytes // (src[0].numel() * src.element_size()))
        for start in range(0, src_ids.numel(), per_chunk):
            gathered = src.index_select(0, src_ids[start : start + per_chunk]).to(dst.device)
            dst.index_copy_(0, dst_ids[start : start + per_chunk], gathered)
        return
    _copy_with_triton(src, src_ids.to(run_on), dst, dst_ids.to(run_on), run_on)


def _copy_with_triton(
    src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor, run_on: torch.device
) -> None:
    row_bytes = src[0].numel() * src.element_size()
    word = torch.int64 if row_bytes % 8 == 0 else torch.uint8  # 8-byte loads where rows allow
    src_words = src.reshape(src.shape[0], -1).view(word)
    dst_words = dst.reshape(dst.shape[0], -1).view(word)
    row_words = src_words.shape[1]
    tile = min(triton.next_power_of_2(row_words), COPY_TILE_BYTES // src_words.element_size())
    grid = (src_ids.numel(), triton.cdiv(row_words, tile))
    with torch.cuda.device(run_on) if run_on.type == "cuda" else contextlib.nullcontext():
        _copy_rows_kernel[grid](src_words, dst_words, src_ids, dst_ids, row_words, TILE=tile)


if triton is not None:

    @triton.jit
    def _copy_rows_kernel(src, dst, src_ids, dst_ids, row_words, TILE: tl.constexpr):
        pair = tl.program_id(0)
        offsets = tl.program_id(1) * TILE + tl.arange(0, TILE)
        mask = offsets < row_words
        src_row = tl.load(src_ids + pair).to(tl.int64)
        dst_row = tl.load(dst_ids + pair).to(tl.int64)
        words = tl.load(src + src_row * row_words + offsets, mask=mask)
        tl.store(dst + dst_row * row_words + offsets, words, mask=mask)
