"""Linear layers on CPU through oneDNN, each weight packed once into oneDNN's blocked layout
(`EngineConfig.linear_backend="onednn"`).

F.linear on CPU runs MKL's GEMM over the plain row-major weight every call; oneDNN's matmul
over a weight reordered once runs the model's GEMMs 1.2-1.4x faster at 64 and 2048 rows
(benchmarks/cpu_profile.py, float32; vLLM's CPU backend packs its weights the same way). The packed
copies live beside the arena, not in it: a worker then holds its decoder weights twice, and a
drop frees only the arena's copy, which is why it is not the default. Weights never change, so
a pack stays valid across drops and restores; it is keyed by the weight's place in the model
(global layer index and name), never by its address, which a drop hands to KV blocks.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

import torch
import torch.nn.functional as F


class Linear(Protocol):
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: Hashable) -> torch.Tensor:
        """x @ weight.T + bias; `key` names the weight in the model."""


def plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: Hashable) -> torch.Tensor:
    return F.linear(x, weight, bias)


class PackedLinear:
    """F.linear's result through oneDNN, packing each weight at its first use."""

    def __init__(self) -> None:
        self._packed: dict[Hashable, torch.Tensor] = {}
        self.packed_bytes = 0

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: Hashable) -> torch.Tensor:
        packed = self._packed.get(key)
        if packed is None:
            packed = self._packed[key] = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self.packed_bytes += weight.numel() * weight.element_size()
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def make_linear(backend: str, device: torch.device, dtype: torch.dtype) -> Linear:
    """`torch`: F.linear; `onednn`: packed oneDNN linears (float32 on CPU only)."""
    if backend == "torch":
        return plain_linear
    if backend != "onednn":
        raise ValueError(f"linear_backend: expected 'torch' or 'onednn', got {backend!r}")
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError(f"linear_backend 'onednn' runs float32 on CPU, not {dtype} on {device.type}")
    if not torch.backends.mkldnn.is_available():
        raise ValueError("linear_backend 'onednn': this torch build has no oneDNN")
    return PackedLinear()
