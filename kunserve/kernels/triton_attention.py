"""Paged attention in Triton, behind the AttentionBackend interface of kunserve/kernels/attention.py.

Three kernels share one per-step metadata object:

* `_write_kv_kernel`: one program per new token copies its K and V ([kv_heads, head_dim]) into the
  paged cache at `slot_mapping[t]` (block = slot // block_size, offset = slot % block_size).
* `_decode_kernel` (+ `_decode_reduce_kernel`): one program per (sequence, kv head, split). The
  program attends the whole GQA group of query heads at once, so each K/V element is read once
  per group; with splits > 1 (flash-decoding) each program covers a contiguous slice of the
  visible keys and writes an un-normalized partial result that the reduce kernel merges.
* `_prefill_kernel`: one program per (query tile, kv head, prefill sequence). A tile is a run of
  BLOCK_M rows of the flattened (token, head-in-group) index of one sequence, so the group's query
  heads again share every K/V tile; keys stream through an online softmax, causal with an optional
  sliding window, gathered page by page through the block table.

Every kernel takes the strides of its tensors: the per-layer KV cache is a strided view of the
block-major arena (kunserve/layout.py), whose block stride spans all layers of a block. Block ids
are widened to int64 before they are multiplied by that stride.

Softmax runs in float32 in the exp2 domain (scores are pre-multiplied by log2(e) / sqrt(D)).
Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) the matrix products run in float32:
the interpreter's `tl.dot` mishandles bfloat16 operands.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl

from kunserve.kernels.attention import AttentionBackend, DecodeGraphBuffers
from kunserve.kernels.staging import PinnedRing, to_device
from kunserve.step import BatchLayout

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.0 / math.log(2.0)
# Running max before any key is seen: finite, so exp2(m_old - m_new) never computes inf - inf.
_NEG_BIG = tl.constexpr(-1.0e30)
# Decode programs (sequence x kv head x key split) to launch per SM: key splits are added until
# a batch has about this many. From benchmarks/decode_breakdown.py's split sweep on an H200:
# fewer leave a step waiting on its longest sequences at batch 8-64; more only add reductions.
_DECODE_PROGRAMS_PER_SM = 8
_MAX_DECODE_SPLITS = 32


def _patch_interpreter_scalar_index() -> None:
    """Triton <= 3.6's interpreter turns a scalar into a Python int with `int(array)`, which
    numpy >= 2.4 refuses for its 1-element arrays; loop bounds read from memory need it."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_kunserve_patched", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._kunserve_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if _INTERPRET:
    _patch_interpreter_scalar_index()


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    kv_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cb,
    stride_ckv,
    stride_cs,
    stride_ch,
    stride_cd,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token (e.g. a graph-captured batch): nothing to write
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_DIM)
    mask = (h < num_kv_heads)[:, None]
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask)
    dst = kv_ptr + block * stride_cb + offset * stride_cs + h[:, None] * stride_ch + d[None, :] * stride_cd
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(kv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _attend_keys(
    q,  # [M, HEAD_DIM], already in the cache dtype
    q_pos,  # [M] int32 query positions (rows that are padding have any value)
    m_i,
    l_i,
    acc,
    kv_ptr,
    bt_row_ptr,  # block-table row of this sequence
    kv_head,
    key_start,
    key_end,  # keys in [key_start, key_end) are read; the rest of the tile is masked
    window,
    scale_log2,
    stride_cb,
    stride_ckv,
    stride_cs,
    stride_ch,
    stride_cd,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,  # mask by query position (prefill); decode ranges are exact already
    USE_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online-softmax accumulation of the keys in [key_start, key_end) for the rows of q."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    head_off = kv_head.to(tl.int64) * stride_ch
    for start in range(key_start, key_end, BLOCK_N):
        n = start + offs_n
        n_ok = n < key_end
        page = tl.load(bt_row_ptr + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        row_off = page * stride_cb + (n % BLOCK_SIZE).to(tl.int64) * stride_cs + head_off  # [N]
        kv_off = row_off[:, None] + offs_d[None, :] * stride_cd  # [N, D]
        k = tl.load(kv_ptr + kv_off, mask=n_ok[:, None], other=0.0)
        s = _mma(q, tl.trans(k), tl.full([q.shape[0], BLOCK_N], 0.0, tl.float32), PRECISION, UPCAST)
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (n[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                visible = visible & (n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(kv_ptr + stride_ckv + kv_off, mask=n_ok[:, None], other=0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
    return m_i, l_i, acc


# Arguments that change from step to step are not specialized on (value 1, divisibility by 16),
# so a new batch shape never triggers a recompile in the middle of serving.
@triton.jit(do_not_specialize=["window", "stride_bt"])
def _decode_kernel(
    q_ptr,
    kv_ptr,
    out_ptr,
    part_m_ptr,  # [num_decodes, num_heads, SPLITS] float32 (used when SPLITS > 1)
    part_l_ptr,
    part_acc_ptr,  # [num_decodes, num_heads, SPLITS, HEAD_DIM] float32
    block_tables_ptr,
    context_lens_ptr,
    window,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_bt,
    stride_cb,
    stride_ckv,
    stride_cs,
    stride_ch,
    stride_cd,
    num_heads,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # >= 16 and a power of two (a tl.dot operand needs 16 rows)
    SPLITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    # Visible keys: [lo, ctx), the last `window` positions with a window.
    lo = ctx * 0
    if USE_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    per_split = tl.cdiv(tl.cdiv(ctx - lo, SPLITS), BLOCK_N) * BLOCK_N
    key_start = lo + split * per_split
    key_end = tl.minimum(key_start + per_split, ctx)

    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    heads = kv_head * GROUP + g
    offs_d = tl.arange(0, HEAD_DIM)
    seq64 = seq.to(tl.int64)
    q = tl.load(
        q_ptr + seq64 * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_ok[:, None],
        other=0.0,
    ).to(kv_ptr.dtype.element_ty)
    m_i = tl.full([GROUP_PAD], _NEG_BIG, tl.float32)
    l_i = tl.full([GROUP_PAD], 0.0, tl.float32)
    acc = tl.full([GROUP_PAD, HEAD_DIM], 0.0, tl.float32)
    m_i, l_i, acc = _attend_keys(
        q, g, m_i, l_i, acc, kv_ptr, block_tables_ptr + seq64 * stride_bt, kv_head,
        key_start, key_end, window, scale_log2,
        stride_cb, stride_ckv, stride_cs, stride_ch, stride_cd,
        BLOCK_SIZE, BLOCK_N, HEAD_DIM, False, USE_WINDOW, PRECISION, UPCAST,
    )  # fmt: skip
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + seq64 * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=g_ok[:, None],
        )
    else:
        part = (seq64 * num_heads + heads) * SPLITS + split  # [GROUP_PAD]
        tl.store(part_m_ptr + part, m_i, mask=g_ok)
        tl.store(part_l_ptr + part, l_i, mask=g_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    stride_ot,
    stride_oh,
    stride_od,
    num_heads,
    SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < SPLITS
    offs_d = tl.arange(0, HEAD_DIM)
    part = (seq * num_heads + head) * SPLITS + s
    m = tl.load(part_m_ptr + part, mask=s_ok, other=_NEG_BIG)
    l = tl.load(part_l_ptr + part, mask=s_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    # Splits that saw no key hold m = _NEG_BIG and l = 0: their weight is exp2(-huge) = 0.
    w = tl.math.exp2(m - tl.max(m, 0))
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d * stride_od, out.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["first_seq", "window", "stride_bt"])
def _prefill_kernel(
    q_ptr,
    kv_ptr,
    out_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_ptr,  # [num_seqs + 1] cumulative query lengths (cu_seqlens)
    first_seq,  # index of the first prefill sequence (= number of decodes)
    window,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_bt,
    stride_cb,
    stride_ckv,
    stride_cs,
    stride_ch,
    stride_cd,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    kv_head = tl.program_id(1)
    seq = first_seq + tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    num_tiles = tl.cdiv(q_len * GROUP, BLOCK_M)
    if tl.program_id(0) >= num_tiles:
        return
    # Last tiles first: they see the most keys, so the long programs start early.
    tile = num_tiles - 1 - tl.program_id(0)
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - q_len  # keys before this chunk's first query

    # Rows of the tile: flattened (token, head-in-group), token-major.
    row = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = row // GROUP
    heads = kv_head * GROUP + row % GROUP
    row_ok = tok < q_len
    q_pos = prefix + tok
    offs_d = tl.arange(0, HEAD_DIM)
    q_row = (q_start + tok).to(tl.int64) * stride_qt + heads * stride_qh
    q = tl.load(q_ptr + q_row[:, None] + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    q = q.to(kv_ptr.dtype.element_ty)

    first_tok = (tile * BLOCK_M) // GROUP
    last_tok = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
    key_end = prefix + last_tok + 1
    key_start = key_end * 0
    if USE_WINDOW:
        key_start = tl.maximum(prefix + first_tok - window + 1, 0)

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    m_i, l_i, acc = _attend_keys(
        q, q_pos, m_i, l_i, acc, kv_ptr, block_tables_ptr + seq.to(tl.int64) * stride_bt, kv_head,
        key_start, key_end, window, scale_log2,
        stride_cb, stride_ckv, stride_cs, stride_ch, stride_cd,
        BLOCK_SIZE, BLOCK_N, HEAD_DIM, True, USE_WINDOW, PRECISION, UPCAST,
    )  # fmt: skip
    l_i = tl.where(row_ok, l_i, 1.0)
    out = acc / l_i[:, None]
    o_row = (q_start + tok).to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(
        out_ptr + o_row[:, None] + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None]
    )


# --------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------


@dataclass
class TritonAttentionMetadata:
    """Device tensors (all int32, views of one buffer copied host-to-device once per step) and
    the host-side sizes that pick grids and splits, so no launch reads device memory."""

    slot_mapping: torch.Tensor  # [T]
    context_lens: torch.Tensor  # [B]
    query_start_loc: torch.Tensor  # [B + 1] cu_seqlens
    block_tables: torch.Tensor  # [B, max_blocks]
    num_tokens: int
    num_decodes: int
    num_prefills: int
    max_prefill_query_len: int
    decode_splits: dict[tuple[int, int | None], int] = field(default_factory=dict)


@dataclass(frozen=True)
class KernelConfig:
    """Tiles of the kernels: prefill query rows and keys per tile, warps and pipeline stages;
    decode keys per tile, warps and stages."""

    prefill_block_m: int
    prefill_block_n: int
    prefill_warps: int
    prefill_stages: int
    decode_block_n: int
    decode_warps: int
    decode_stages: int


class TritonAttentionBackend(AttentionBackend):
    """Paged attention on Triton kernels. CUDA tensors run compiled kernels; CPU tensors run
    under Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported).

    `decode_splits` forces the number of key splits per decode sequence (None: chosen from the
    batch size and the number of SMs); `tiles` forces the kernels' tiles on CUDA (None: the
    tuned ones of `tuned_tiles`), for tile sweeps."""

    def __init__(self, block_size: int, decode_splits: int | None = None, tiles: KernelConfig | None = None) -> None:
        super().__init__(block_size)
        self.forced_decode_splits = decode_splits
        self.forced_tiles = tiles
        self._num_sms: dict[int, int] = {}

    # ---- metadata ---------------------------------------------------------------------------

    def build_metadata(self, batch: BatchLayout, device: torch.device) -> TritonAttentionMetadata:
        query_lens = np.asarray(batch.query_lens, dtype=np.int64)
        context_lens = np.asarray(batch.context_lens, dtype=np.int64)
        block_tables = np.asarray(batch.block_tables)
        slots = np.asarray(batch.slot_mapping)
        num_seqs, nd = len(query_lens), batch.num_decodes
        if block_tables.ndim != 2 or block_tables.shape[0] != num_seqs:
            raise ValueError(f"block_tables: expected [{num_seqs}, max_blocks], got {block_tables.shape}")
        max_blocks = block_tables.shape[1]
        num_tokens = len(slots)
        host, parts_bounds = _pack_int32((num_tokens, num_seqs, num_seqs + 1, num_seqs * max_blocks))
        host[slice(*parts_bounds[0])] = slots
        host[slice(*parts_bounds[1])] = context_lens
        host[slice(*parts_bounds[2])][1:] = np.cumsum(query_lens)
        host[slice(*parts_bounds[3])] = block_tables.reshape(-1)
        buf = to_device(host, torch.device(device))
        parts = [buf[a:b] for a, b in parts_bounds]
        return TritonAttentionMetadata(
            slot_mapping=parts[0],
            context_lens=parts[1],
            query_start_loc=parts[2],
            block_tables=parts[3].view(num_seqs, max_blocks),
            num_tokens=num_tokens,
            num_decodes=nd,
            num_prefills=num_seqs - nd,
            max_prefill_query_len=int(query_lens[nd:].max()) if num_seqs > nd else 0,
        )

    # ---- KV write ---------------------------------------------------------------------------

    def write_kv(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TritonAttentionMetadata) -> None:
        num_tokens, num_kv_heads, head_dim = k.shape
        _check_cache(kv_layer, self.block_size, num_kv_heads, head_dim)
        if v.shape != k.shape:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
        if num_tokens != meta.num_tokens:
            raise ValueError(f"write_kv: {num_tokens} tokens, the step has {meta.num_tokens}")
        if num_tokens == 0:
            return
        _write_kv_kernel[(num_tokens,)](
            k, v, kv_layer, meta.slot_mapping,
            *k.stride(), *v.stride(), *kv_layer.stride(),
            num_kv_heads,
            BLOCK_SIZE=self.block_size,
            HEADS_PAD=triton.next_power_of_2(num_kv_heads),
            HEAD_DIM=head_dim,
            num_warps=1 if _INTERPRET else 4,
        )  # fmt: skip

    # ---- attention --------------------------------------------------------------------------

    def attend(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: TritonAttentionMetadata, sliding_window: int | None
    ) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = kv_layer.shape[3]
        _check_cache(kv_layer, self.block_size, num_kv_heads, head_dim)
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
        if num_tokens != meta.num_tokens:
            raise ValueError(f"attend: {num_tokens} tokens, the step has {meta.num_tokens}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding window must be >= 1, got {sliding_window}")
        group = num_heads // num_kv_heads
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
        if num_tokens == 0:
            return out
        cfg = self._config(q.device, head_dim, kv_layer.dtype)
        use_window = sliding_window is not None
        window = sliding_window if use_window else 0
        scale_log2 = _LOG2E / math.sqrt(head_dim)
        precision = "ieee" if kv_layer.dtype == torch.float32 else "tf32"  # ignored for 16-bit operands
        common = {
            "USE_WINDOW": use_window, "PRECISION": precision, "UPCAST": _INTERPRET,
            "BLOCK_SIZE": self.block_size, "HEAD_DIM": head_dim,
        }  # fmt: skip
        cache_strides = kv_layer.stride()
        nd = meta.num_decodes
        if nd:
            splits = self._decode_splits(meta, q.device, num_kv_heads, sliding_window, cfg)
            if splits > 1:
                part_m = torch.empty((nd, num_heads, splits), dtype=torch.float32, device=q.device)
                part_l = torch.empty_like(part_m)
                part_acc = torch.empty((nd, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
            else:
                part_m = part_l = part_acc = out  # unused
            _decode_kernel[(nd, num_kv_heads, splits)](
                q, kv_layer, out, part_m, part_l, part_acc,
                meta.block_tables, meta.context_lens, window, scale_log2,
                *q.stride(), *out.stride(), meta.block_tables.stride(0), *cache_strides,
                num_heads,
                GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), SPLITS=splits,
                BLOCK_N=cfg.decode_block_n,
                num_warps=cfg.decode_warps, num_stages=cfg.decode_stages,
                **common,
            )  # fmt: skip
            if splits > 1:
                _decode_reduce_kernel[(nd, num_heads)](
                    out, part_m, part_l, part_acc, *out.stride(), num_heads,
                    SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
                    num_warps=1 if _INTERPRET else 4,
                )  # fmt: skip
        if meta.num_prefills:
            tiles = triton.cdiv(meta.max_prefill_query_len * group, cfg.prefill_block_m)
            _prefill_kernel[(tiles, num_kv_heads, meta.num_prefills)](
                q, kv_layer, out, meta.block_tables, meta.context_lens, meta.query_start_loc,
                nd, window, scale_log2,
                *q.stride(), *out.stride(), meta.block_tables.stride(0), *cache_strides,
                GROUP=group, BLOCK_M=cfg.prefill_block_m, BLOCK_N=cfg.prefill_block_n,
                num_warps=cfg.prefill_warps, num_stages=cfg.prefill_stages,
                **common,
            )  # fmt: skip
        return out

    def decode_graph_buffers(self, max_batch: int, max_blocks: int, device: torch.device) -> TritonDecodeGraphBuffers:
        return TritonDecodeGraphBuffers(max_batch, max_blocks, device)

    # ---- launch parameters --------------------------------------------------------------------

    def _config(self, device: torch.device, head_dim: int, dtype: torch.dtype) -> KernelConfig:
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported KV dtype {dtype}")
        if self.forced_tiles is not None:
            return self.forced_tiles
        if device.type != "cuda":
            # Interpreter: every op is a numpy call, so fewer, larger tiles run faster.
            return KernelConfig(32, 32, 1, 1, 32, 1, 1)
        return self.tuned_tiles(head_dim, dtype)

    @staticmethod
    def tuned_tiles(head_dim: int, dtype: torch.dtype) -> KernelConfig:
        """The tiles CUDA kernels run with for this head size and KV dtype."""
        if dtype == torch.float32:  # twice the bytes per tile: smaller tiles to fit shared memory
            return KernelConfig(64, 32, 4, 2, 32, 4, 2)
        if head_dim <= 64:
            return KernelConfig(128, 64, 4, 3, 64, 4, 3)
        # Decode tiles: the fastest of benchmarks/decode_breakdown.py's sweep on an H200
        # (4.2-4.3 TB/s of KV read at batch 128-256, 1k contexts; 64 keys x 4 warps: 3.9-4.0).
        # Prefill tiles: within 7% of the fastest of benchmarks/prefill_tiles.py's sweep on an
        # H200 in each of its steps (a fresh 4k prompt, a step of short prompts, a chunk after
        # context); 128 rows x 8 warps was 11-15% slower.
        return KernelConfig(64, 64, 4, 2, 32, 2, 2)

    def _decode_splits(
        self,
        meta: TritonAttentionMetadata,
        device: torch.device,
        num_kv_heads: int,
        window: int | None,
        cfg: KernelConfig,
    ) -> int:
        """Key splits per decode sequence, from the batch size rounded up to a power of two
        alone: a graph captured for a batch's bucket (kunserve/worker/cuda_graphs.py captures
        every power of two) and an eager step of the batch then split alike and give the same
        bits, whatever the contexts (a split past a sequence's keys sees none, weighs nothing)."""
        key = (num_kv_heads, window)
        splits = meta.decode_splits.get(key)
        if splits is not None:
            return splits
        if self.forced_decode_splits is not None:
            splits = max(1, self.forced_decode_splits)
        else:
            programs = triton.next_power_of_2(meta.num_decodes) * num_kv_heads
            splits = max(1, min(_DECODE_PROGRAMS_PER_SM * self._sm_count(device) // programs, _MAX_DECODE_SPLITS))
            if window is not None:  # each split at least two key tiles of the window
                splits = min(splits, max(1, window // (2 * cfg.decode_block_n)))
        meta.decode_splits[key] = splits
        return splits

    def _sm_count(self, device: torch.device) -> int:
        if device.type != "cuda":
            return 1
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._num_sms:
            self._num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._num_sms[index]


def _pack_int32(sizes: tuple[int, ...]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A zeroed int32 host buffer holding parts of these sizes, each starting at a 16-byte
    boundary (kernels are specialized on pointer alignment), and each part's bounds."""
    starts = np.cumsum((0,) + tuple(-(-n // 4) * 4 for n in sizes))
    bounds = [(int(starts[i]), int(starts[i]) + n) for i, n in enumerate(sizes)]
    return np.zeros(int(starts[-1]), dtype=np.int32), bounds


class TritonDecodeGraphBuffers(DecodeGraphBuffers):
    """Static [slots | context lens | cu_seqlens | block tables] for graph-replayed decodes,
    staged in pinned host memory (a ring: see kunserve/kernels/staging.py) and copied to the
    device in one transfer per step."""

    def __init__(self, max_batch: int, max_blocks: int, device: torch.device) -> None:
        self.max_batch, self.max_blocks = max_batch, max_blocks
        sizes = (max_batch, max_batch, max_batch + 1, max_batch * max_blocks)
        _, self._bounds = _pack_int32(sizes)
        self._staging = PinnedRing(lambda: self._padding_rows(sizes), device)
        self.device_buffer = self._staging.buffers[0].to(device)
        self._parts = [self.device_buffer[a:b] for a, b in self._bounds]

    def _padding_rows(self, sizes: tuple[int, ...]) -> torch.Tensor:
        """A host buffer whose every row is padding."""
        host, _ = _pack_int32(sizes)
        slots, ctx, starts, _ = (host[a:b] for a, b in self._bounds)
        slots[:] = -1  # padding rows write nothing ...
        ctx[:] = 1  # ... and attend to one key of block 0, a valid block
        starts[:] = np.arange(self.max_batch + 1)  # one query token per row
        return torch.from_numpy(host)

    def metadata(self, batch_size: int) -> TritonAttentionMetadata:
        slots, ctx, starts, tables = self._parts
        return TritonAttentionMetadata(
            slot_mapping=slots[:batch_size],
            context_lens=ctx[:batch_size],
            query_start_loc=starts[: batch_size + 1],
            block_tables=tables.view(self.max_batch, self.max_blocks)[:batch_size],
            num_tokens=batch_size,
            num_decodes=batch_size,
            num_prefills=0,
            max_prefill_query_len=0,
        )

    def fill(self, batch: BatchLayout) -> None:
        n, width = batch.num_seqs, batch.block_tables.shape[1]
        buffer = self._staging.acquire()
        host = buffer.numpy()
        slots, ctx, _, tables = (host[a:b] for a, b in self._bounds)
        slots[:n] = batch.slot_mapping
        slots[n:] = -1
        ctx[:n] = batch.context_lens
        ctx[n:] = 1
        tables.reshape(self.max_batch, self.max_blocks)[:n, :width] = batch.block_tables
        self.device_buffer.copy_(buffer, non_blocking=True)
        self._staging.copied()


def _check_cache(kv_layer: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int) -> None:
    if kv_layer.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            "TritonAttentionBackend needs CUDA tensors, or TRITON_INTERPRET=1 set before triton and "
            "kunserve.kernels.triton_attention are imported to run its kernels on CPU tensors"
        )
    if kv_layer.dim() != 5 or tuple(kv_layer.shape[1:]) != (2, block_size, num_kv_heads, head_dim):
        raise ValueError(
            f"kv_layer: expected [num_blocks, 2, {block_size}, {num_kv_heads}, {head_dim}], got {tuple(kv_layer.shape)}"
        )
