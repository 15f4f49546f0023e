"""Paged KV on CPU in C (kunserve/kernels/csrc/cpu_attention.c): decode attention that reads the
paged KV in place, and the KV write.

The torch reference gathers every decode's KV blocks into a contiguous copy and hands it to
scaled_dot_product_attention. On CPU the copy and SDPA's kernel (tuned for long queries, not a
decode's one row per head) cost several times the attention itself. The C kernel walks each
sequence's block table and reads each block's K and V once for all its heads, with an online
softmax, as vLLM's CPU paged-attention kernel does. Prefill chunks keep the reference path: SDPA
is efficient for their long queries. The KV write is one copy per token (torch's two indexed
assignments cost more to dispatch than to copy at a decode step's few rows).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from kunserve.kernels.attention import TorchAttentionBackend, TorchAttentionMetadata
from kunserve.kernels.native import DTYPE_CODES, NativeBuildError, load_library

logger = logging.getLogger(__name__)


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_DECODE_ARGTYPES = [
    _PTR, _I64, _I64,  # q, its strides (sequence, head)
    _PTR, _I64, _I64, _I64, _I64,  # one layer's KV, its strides (block, K/V, slot, head)
    _PTR, _I64, _PTR,  # block tables, their row stride, context lengths
    _PTR, _I64, _I64,  # out, its strides (sequence, head)
    _I64, _I64, _I64, _I64, _I64,  # sequences, heads, kv heads, head dim, block size
    _I64, ctypes.c_float, ctypes.c_int,  # window (0: none), softmax scale, dtype code
]  # fmt: skip
_WRITE_ARGTYPES = [
    _PTR, _I64, _PTR, _I64,  # k, its token stride, v, its token stride
    _PTR, _I64, _I64, _I64,  # one layer's KV, its strides (block, K/V, slot)
    _PTR, _PTR, _I64, _I64, ctypes.c_int,  # slot blocks, slot offsets, tokens, elements per row, dtype code
]  # fmt: skip


def load_kernels() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    """(decode attention, KV write) from the built library."""
    library = load_library("cpu_attention")
    decode, write = library.paged_decode_attention, library.write_kv
    decode.argtypes, decode.restype = _DECODE_ARGTYPES, None
    write.argtypes, write.restype = _WRITE_ARGTYPES, None
    return decode, write


def paged_decode_attention(
    kernel: ctypes._CFuncPtr, q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, window: int | None, out: torch.Tensor,
) -> None:
    """Writes into `out` [B, heads, D] the attention of q [B, heads, D] (one new token per
    sequence) over the first `context_lens` keys of each sequence's blocks (the last `window` of
    them when set). kv_layer: [blocks, 2, block_size, kv_heads, D]."""
    for name, tensor in (("q", q), ("kv_layer", kv_layer), ("out", out)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"paged_decode_attention: {name}'s last dimension must be contiguous")
    if block_tables.dtype != torch.int64 or context_lens.dtype != torch.int64 or block_tables.stride(1) != 1:
        raise ValueError("paged_decode_attention: block tables and context lengths must be int64, rows contiguous")
    lens = context_lens.contiguous()
    batch, heads, dim = q.shape
    _, _, block_size, kv_heads, _ = kv_layer.shape
    kernel(
        q.data_ptr(), q.stride(0), q.stride(1),
        kv_layer.data_ptr(), *kv_layer.stride()[:4],
        block_tables.data_ptr(), block_tables.stride(0), lens.data_ptr(),
        out.data_ptr(), out.stride(0), out.stride(1),
        batch, heads, kv_heads, dim, block_size,
        window or 0, dim**-0.5, DTYPE_CODES[q.dtype],
    )  # fmt: skip


def write_kv(
    kernel: ctypes._CFuncPtr, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    slot_blocks: torch.Tensor, slot_offsets: torch.Tensor,
) -> None:
    """kv_layer[slot_blocks[t], 0 (K) / 1 (V), slot_offsets[t]] = k[t] / v[t]."""
    tokens, kv_heads, dim = k.shape
    for name, tensor in (("k", k), ("v", v), ("kv_layer", kv_layer)):
        if tensor.stride(-1) != 1 or tensor.stride(-2) != dim:
            raise ValueError(f"write_kv: {name}'s rows of kv heads must be contiguous")
    for name, index in (("slot_blocks", slot_blocks), ("slot_offsets", slot_offsets)):
        if index.dtype != torch.int64 or not index.is_contiguous() or index.shape != (tokens,):
            raise ValueError(f"write_kv: {name} must be {tokens} contiguous int64")
    kernel(
        k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        kv_layer.data_ptr(), *kv_layer.stride()[:3],
        slot_blocks.data_ptr(), slot_offsets.data_ptr(), tokens, kv_heads * dim, DTYPE_CODES[k.dtype],
    )  # fmt: skip


class CpuAttentionBackend(TorchAttentionBackend):
    """The torch reference with decodes and the KV write in C. Falls back to the reference where
    the library cannot be built (no C compiler), or for a dtype it does not read (float16)."""

    def __init__(self, block_size: int) -> None:
        super().__init__(block_size)
        try:
            self._kernels: tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None = load_kernels()
        except NativeBuildError as error:
            logger.warning("CPU attention kernels unavailable (%s); using the torch reference", error)
            self._kernels = None

    @property
    def uses_kernel(self) -> bool:
        return self._kernels is not None

    def _reads(self, x: torch.Tensor, kv_layer: torch.Tensor) -> bool:
        return self._kernels is not None and x.dtype in DTYPE_CODES and kv_layer.dtype == x.dtype

    def write_kv(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TorchAttentionMetadata) -> None:
        if not self._reads(k, kv_layer) or v.dtype != k.dtype:
            return super().write_kv(kv_layer, k, v, meta)
        write_kv(self._kernels[1], kv_layer, k, v, meta.slot_blocks, meta.slot_offsets)

    def _attend_decodes(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: TorchAttentionMetadata, window: int | None
    ) -> torch.Tensor:
        if not self._reads(q, kv_layer):
            return super()._attend_decodes(q, kv_layer, meta, window)
        out = torch.empty_like(q)
        paged_decode_attention(
            self._kernels[0], q, kv_layer, meta.decode_block_tables, meta.decode_context_lens, window, out
        )
        return out
