"""Fused elementwise kernels of the decoder layer: (add +) RMSNorm, rotary on q and k, SiLU-mul.

Written in torch, each of these is a chain of small kernels (RMSNorm alone is seven: cast, pow,
mean, rsqrt, mul, cast, mul); in a decode step those launches, not the bytes, dominate. Here each
is one Triton kernel that reads its inputs once and writes its outputs once.

Every function has a torch version, which is the reference and what runs on CPU, and a Triton
version, which runs on CUDA tensors. The Triton versions reproduce the torch versions' roundings
(each intermediate that torch stores in the input dtype is rounded to it here too), so they differ
only where float32 summation order or a transcendental's last bit differs:

* `add_rms_norm`: the residual sum is rounded to the input dtype before it is normalized; the norm
  is computed in float32, rounded to the input dtype, then multiplied by the weight.
* `rotary_qk`: float32 `x1 * cos - x2 * sin` with every product rounded (FMA contraction is turned
  off), so in float32 it is bit-identical to `apply_rotary`, the torch version.
* `silu_mul`: silu in float32, rounded to the input dtype, then the product, as `F.silu(g) * u`.

On CPU tensors the same steps run in C (kunserve/kernels/cpu_fused.py), with the same roundings.

`BACKEND` picks the implementation: "auto" (Triton on CUDA tensors, C on CPU tensors where the C
library could be built and reads the dtype, torch elsewhere), "torch", "triton" or "cpu" (C only).
"triton" on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1 set before triton is
imported): that is how the tests run the kernels without a GPU.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kunserve.kernels import cpu_fused

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch versions only
    triton = tl = None

BACKEND = "auto"

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _jit(fn):  # type: ignore[no-untyped-def]
    """triton.jit where Triton is installed; without it the kernels are never launched."""
    return fn if triton is None else triton.jit(fn)


def _use_cpu(*tensors: torch.Tensor) -> bool:
    """C kernels: asked for ("cpu", where they must run), or "auto" on CPU tensors they read."""
    if BACKEND not in ("auto", "cpu"):
        return False
    takes = all(cpu_fused.runs(t) and t.dtype == tensors[0].dtype for t in tensors)
    if BACKEND == "cpu" and not takes:
        raise RuntimeError(
            "kunserve.kernels.fused: BACKEND is 'cpu' but the C kernels do not take these tensors "
            f"({', '.join(f'{t.device.type} {t.dtype}' for t in tensors)}; library built: {cpu_fused.available()})"
        )
    return takes


def _use_triton(x: torch.Tensor) -> bool:
    if BACKEND == "torch" or (BACKEND == "auto" and not x.is_cuda):
        return False
    if BACKEND not in ("auto", "triton", "cpu"):
        raise ValueError(f"kunserve.kernels.fused.BACKEND must be 'auto', 'torch', 'triton' or 'cpu', got {BACKEND!r}")
    if BACKEND == "cpu":
        return False
    if triton is None:
        if BACKEND == "triton":
            raise RuntimeError("kunserve.kernels.fused: BACKEND is 'triton' but triton is not installed")
        return False
    if not x.is_cuda and not _INTERPRET:
        raise RuntimeError(
            "the fused Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton and "
            "kunserve.kernels.fused are imported to run them on CPU tensors"
        )
    return True


def _warps(elements: int, per_thread: int, most: int) -> int:
    """Enough warps that each thread holds about `per_thread` elements (a 16-byte vector of
    16-bit values at 8), as a power of two in [1, most]; one under the interpreter."""
    if _INTERPRET:
        return 1
    return max(1, min(most, triton.next_power_of_2(max(1, elements // (32 * per_thread)))))


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x normalized in float32, rounded to x's dtype), over the last dimension."""
    if _use_triton(x):
        return _norm_triton(x, None, weight, eps)[0]
    if _use_cpu(x, weight):
        return cpu_fused.add_rms_norm(x, None, weight, eps)[0]
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add of a pre-norm layer fused with the
    norm that follows it. Both outputs are new tensors."""
    if _use_triton(x):
        normed, new_residual = _norm_triton(x, residual, weight, eps)
        return normed, new_residual
    if _use_cpu(x, residual, weight):
        normed, new_residual = cpu_fused.add_rms_norm(x, residual, weight, eps)
        return normed, new_residual
    return add_rms_norm_torch(x, residual, weight, eps)


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] (rotate-half layout) IN PLACE by the rows of the
    [max_pos, D] float32 cache `cos_sin` (cos in the first half, sin in the second) at `positions`
    [T]; returns (q, k). q and k may be strided views, e.g. column slices of a fused qkv output."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rotary_qk: q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, heads, D] alike")
    if q.shape[2] % 2 or cos_sin.shape[-1] != q.shape[2]:
        raise ValueError(f"rotary_qk: head_dim {q.shape[2]} must be even and match cos_sin {tuple(cos_sin.shape)}")
    if _use_triton(q):
        _rotary_triton(q, k, cos_sin, positions)
        return q, k
    if _use_cpu(q, k):
        cpu_fused.rotary_qk(q, k, cos_sin, positions)
        return q, k
    return rotary_qk_torch(q, k, cos_sin, positions)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: silu(gate) * up, gate the first half of the columns and up the second."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: odd last dimension {gate_up.shape[-1]}")
    if _use_triton(gate_up):
        return _silu_mul_triton(gate_up)
    if _use_cpu(gate_up):
        return cpu_fused.silu_mul(gate_up)
    return silu_mul_torch(gate_up)


# --------------------------------------------------------------------------------------------
# Torch versions (the reference)
# --------------------------------------------------------------------------------------------


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In float32, then back, as the reference checkpoints were trained.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return rms_norm_torch(h, weight, eps), h


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim // 2] float32."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rotary_qk_torch(
    q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    half = q.shape[-1] // 2
    cs = cos_sin[positions]
    cos, sin = cs[:, :half], cs[:, half:]
    q.copy_(apply_rotary(q, cos, sin))
    k.copy_(apply_rotary(k, cos, sin))
    return q, k


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------
# Triton versions
# --------------------------------------------------------------------------------------------


def _norm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match hidden size {n}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"add_rms_norm: residual {residual.dtype}{tuple(residual.shape)} != x {x.dtype}{tuple(x.shape)}"
        )
    x2 = _rows(x)
    r2 = None if residual is None else _rows(residual)
    normed = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_residual = None if residual is None else torch.empty_like(x)
    rows = x2.shape[0]
    if rows:
        n2 = normed.view(rows, n)
        nr2 = n2 if new_residual is None else new_residual.view(rows, n)
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(rows,)](
            x2, x2 if r2 is None else r2, weight.contiguous(), n2, nr2,
            x2.stride(0), x2.stride(0) if r2 is None else r2.stride(0), n2.stride(0), nr2.stride(0),
            eps,
            N=n, BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=_warps(block, 8, 16),
        )  # fmt: skip
    return normed, new_residual


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, hidden] with unit column stride (a view when it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@_jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    """One program per row, the whole row in registers."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Added in float32 and rounded once, as torch adds 16-bit tensors.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_res_ptr + row * stride_nr + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, 0) / N
    normed = (xf * tl.rsqrt(mean_sq + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    # Products of two 16-bit floats are exact in float32: one rounding, as torch's.
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rotary_triton(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor) -> None:
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if k.dtype != q.dtype:
        raise ValueError(f"rotary_qk: q is {q.dtype}, k is {k.dtype}")
    if cos_sin.dtype != torch.float32 or cos_sin.stride(-1) != 1:
        raise ValueError("rotary_qk: cos_sin must be a float32 cache with contiguous rows")
    if positions.shape != (tokens,):
        raise ValueError(f"rotary_qk: positions {tuple(positions.shape)} for {tokens} tokens")
    if tokens == 0:
        return
    half = head_dim // 2
    half_pad = triton.next_power_of_2(half)
    q_pad, kv_pad = triton.next_power_of_2(q_heads), triton.next_power_of_2(kv_heads)
    _rotary_qk_kernel[(tokens,)](
        q, k, cos_sin, positions,
        *q.stride(), *k.stride(), cos_sin.stride(0), positions.stride(0),
        q_heads, kv_heads,
        HALF=half, HALF_PAD=half_pad, Q_HEADS_PAD=q_pad, KV_HEADS_PAD=kv_pad,
        num_warps=_warps(q_pad * half_pad * 2, 8, 8),
        # Round each product, as torch's separate multiplies do: bit-equal in float32.
        enable_fp_fusion=False,
    )  # fmt: skip


@_jit
def _rotate_heads(
    x_ptr,  # this token's first element
    heads,
    stride_h,
    stride_d,
    cos,  # [1, HALF_PAD] float32
    sin,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr,
):
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HALF_PAD)
    mask = (h < heads)[:, None] & (d < HALF)[None, :]
    p1 = x_ptr + h[:, None] * stride_h + d[None, :] * stride_d
    p2 = p1 + HALF * stride_d
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p2, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(p1, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(p2, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@_jit
def _rotary_qk_kernel(
    q_ptr,
    k_ptr,
    cs_ptr,
    pos_ptr,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_cs,
    stride_pos,
    q_heads,
    kv_heads,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
):
    """One program per token: its cos/sin row is read once for all its q and k heads."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t * stride_pos).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    d_ok = d < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + d, mask=d_ok, other=0.0)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + d, mask=d_ok, other=0.0)[None, :]
    _rotate_heads(q_ptr + t * stride_qt, q_heads, stride_qh, stride_qd, cos, sin, HALF, HALF_PAD, Q_HEADS_PAD)
    _rotate_heads(k_ptr + t * stride_kt, kv_heads, stride_kh, stride_kd, cos, sin, HALF, HALF_PAD, KV_HEADS_PAD)


_SILU_BLOCK = 1024


def _silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    gu = _rows(gate_up)
    rows, width = gu.shape
    inner = width // 2
    out = torch.empty((*gate_up.shape[:-1], inner), dtype=gate_up.dtype, device=gate_up.device)
    if rows and inner:
        block = min(_SILU_BLOCK, triton.next_power_of_2(inner))
        out2 = out.view(rows, inner)
        _silu_mul_kernel[(rows, triton.cdiv(inner, block))](
            gu, out2, gu.stride(0), out2.stride(0), inner,
            BLOCK=block, num_warps=_warps(block, 8, 4),
        )  # fmt: skip
    return out


@_jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_g, stride_o, inner, BLOCK: tl.constexpr):
    """One program per (row, BLOCK columns of the output)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    g = tl.load(gu_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_g + inner + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    # silu rounded to the input dtype before the product, as F.silu(g) * u rounds it.
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    out = act.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(g.dtype), mask=mask)
