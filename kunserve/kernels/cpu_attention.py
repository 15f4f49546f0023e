"""Decode attention on CPU: a C kernel (kunserve/kernels/csrc/cpu_attention.c) that reads the
paged KV in place.

The torch reference gathers every decode's KV blocks into a contiguous copy and hands it to
scaled_dot_product_attention. On CPU the copy and SDPA's kernel (tuned for long queries, not a
decode's one row per head) cost several times the attention itself. The C kernel walks each
sequence's block table and reads each block's K and V once for all its heads, with an online
softmax, as vLLM's CPU paged-attention kernel does. Prefill chunks keep the reference path: SDPA
is efficient for their long queries.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from kunserve.kernels.attention import TorchAttentionBackend, TorchAttentionMetadata
from kunserve.kernels.native import NativeBuildError, load_library

logger = logging.getLogger(__name__)

KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's DTYPE_* codes

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [
    _PTR, _I64, _I64,  # q, its strides (sequence, head)
    _PTR, _I64, _I64, _I64, _I64,  # one layer's KV, its strides (block, K/V, slot, head)
    _PTR, _I64, _PTR,  # block tables, their row stride, context lengths
    _PTR, _I64, _I64,  # out, its strides (sequence, head)
    _I64, _I64, _I64, _I64, _I64,  # sequences, heads, kv heads, head dim, block size
    _I64, ctypes.c_float, ctypes.c_int,  # window (0: none), softmax scale, dtype code
]  # fmt: skip


def load_decode_kernel() -> ctypes._CFuncPtr:
    kernel = load_library("cpu_attention").paged_decode_attention
    kernel.argtypes, kernel.restype = _ARGTYPES, None
    return kernel


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
        window or 0, dim**-0.5, KERNEL_DTYPES[q.dtype],
    )  # fmt: skip


class CpuAttentionBackend(TorchAttentionBackend):
    """The torch reference with decodes in the C kernel. Falls back to the reference where the
    kernel cannot be built (no C compiler), or for a dtype it does not read (float16)."""

    def __init__(self, block_size: int) -> None:
        super().__init__(block_size)
        try:
            self._kernel: ctypes._CFuncPtr | None = load_decode_kernel()
        except NativeBuildError as error:
            logger.warning("CPU decode attention kernel unavailable (%s); using the torch reference", error)
            self._kernel = None

    @property
    def uses_kernel(self) -> bool:
        return self._kernel is not None

    def _attend_decodes(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: TorchAttentionMetadata, window: int | None
    ) -> torch.Tensor:
        if self._kernel is None or q.dtype not in KERNEL_DTYPES or kv_layer.dtype != q.dtype:
            return super()._attend_decodes(q, kv_layer, meta, window)
        out = torch.empty_like(q)
        paged_decode_attention(
            self._kernel, q, kv_layer, meta.decode_block_tables, meta.decode_context_lens, window, out
        )
        return out
