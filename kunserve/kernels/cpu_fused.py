"""The fused elementwise steps of kunserve/kernels/fused.py on CPU tensors, in C
(kunserve/kernels/csrc/cpu_fused.c): one call per step instead of torch's chain of small ops.
Float32 and bfloat16; `available` says whether the library could be built here."""

from __future__ import annotations

import ctypes
import logging
from functools import cache

import torch

from kunserve.kernels.native import DTYPE_CODES, NativeBuildError, load_library

logger = logging.getLogger(__name__)


_I64, _PTR, _F32, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_ARGTYPES = {
    # x, its row stride, residual, its row stride, weight, out, its row stride, new residual, its
    # row stride, rows, hidden size, eps, dtype code
    "add_rms_norm": [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _F32, _INT],
    # q, its strides (token, head), k, its strides, cos_sin, its row stride, positions, tokens,
    # q heads, kv heads, half the head dim, dtype code
    "rotary_qk": [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _INT],
    # gate_up, its row stride, out, its row stride, rows, inner size, dtype code
    "silu_mul": [_PTR, _I64, _PTR, _I64, _I64, _I64, _INT],
}


@cache
def _kernels() -> dict[str, ctypes._CFuncPtr] | None:
    try:
        library = load_library("cpu_fused")
    except NativeBuildError as error:
        logger.warning("fused CPU kernels unavailable (%s); using the torch versions", error)
        return None
    kernels = {}
    for name, argtypes in _ARGTYPES.items():
        kernel = getattr(library, name)
        kernel.argtypes, kernel.restype = argtypes, None
        kernels[name] = kernel
    return kernels


def available() -> bool:
    return _kernels() is not None


def runs(x: torch.Tensor) -> bool:
    """Whether these kernels take `x`: a CPU tensor of a dtype they read, the library built."""
    return x.device.type == "cpu" and x.dtype in DTYPE_CODES and available()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] with a unit column stride (a view when it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight * rms_norm(h), h) with h = x + residual, or h = x (and None) without a residual."""
    n = x.shape[-1]
    if weight.shape != (n,) or weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight {weight.dtype}{tuple(weight.shape)} does not match x {x.dtype}[..., {n}]")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"add_rms_norm: residual {residual.dtype}{tuple(residual.shape)} != x {x.dtype}{tuple(x.shape)}")
    x2 = _rows(x)
    r2 = None if residual is None else _rows(residual)
    w = weight.contiguous()  # held until the call returns
    out = torch.empty(x.shape, dtype=x.dtype)
    new_residual = None if residual is None else torch.empty(x.shape, dtype=x.dtype)
    rows = x2.shape[0]
    _kernels()["add_rms_norm"](
        x2.data_ptr(), x2.stride(0), None if r2 is None else r2.data_ptr(), 0 if r2 is None else r2.stride(0),
        w.data_ptr(), out.data_ptr(), n, None if new_residual is None else new_residual.data_ptr(), n,
        rows, n, eps, DTYPE_CODES[x.dtype],
    )  # fmt: skip
    return out, new_residual


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place by the float32 cache rows at `positions`."""
    tokens, q_heads, head_dim = q.shape
    if k.dtype != q.dtype or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_qk: q and k must share a dtype and have contiguous head rows")
    if cos_sin.dtype != torch.float32 or cos_sin.stride(-1) != 1:
        raise ValueError("rotary_qk: cos_sin must be a float32 cache with contiguous rows")
    if positions.shape != (tokens,):
        raise ValueError(f"rotary_qk: positions {tuple(positions.shape)} for {tokens} tokens")
    pos = positions.to(torch.int64).contiguous()
    _kernels()["rotary_qk"](
        q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
        cos_sin.data_ptr(), cos_sin.stride(0), pos.data_ptr(), tokens, q_heads, k.shape[1], head_dim // 2,
        DTYPE_CODES[q.dtype],
    )  # fmt: skip


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> [..., I]: silu(gate) * up."""
    gu = _rows(gate_up)
    rows, width = gu.shape
    inner = width // 2
    out = torch.empty((*gate_up.shape[:-1], inner), dtype=gate_up.dtype)
    _kernels()["silu_mul"](gu.data_ptr(), gu.stride(0), out.data_ptr(), inner, rows, inner, DTYPE_CODES[gu.dtype])
    return out
