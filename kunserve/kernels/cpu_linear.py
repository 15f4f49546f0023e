"""Linear layers on CPU through oneDNN (`EngineConfig.linear_backend`).

F.linear on CPU runs MKL's GEMM, which on the AMD cores measured here takes the slower of its
code paths. oneDNN's matmul runs the same product over the arena's row-major weight in place
("onednn", the float32 CPU default: no copy, so a drop frees the weight's bytes as on a GPU),
or over a copy of the weight reordered once into oneDNN's blocked layout ("onednn-packed",
faster still at a decode step's few rows; vLLM's CPU backend packs its weights the same way).
benchmarks/cpu_profile.py prints the three rates on the model's shapes.

The packed copies live beside the arena, not in it: a worker then holds its decoder weights
twice, and a drop frees only the arena's copy, which is why packing is opt-in. Weights never
change, so a pack stays valid across drops and restores; it is keyed by the weight's place in
the model (global layer index and name), never by its address, which a drop hands to KV blocks.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

import torch
import torch.nn.functional as F

from kunserve.config import LINEAR_BACKENDS


class Linear(Protocol):
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: Hashable) -> torch.Tensor:
        """x @ weight.T + bias; `key` names the weight in the model."""


def plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: Hashable) -> torch.Tensor:
    return F.linear(x, weight, bias)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: Hashable) -> torch.Tensor:
    """F.linear's result through oneDNN's matmul, reading the weight where it is."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


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
    """`auto`: oneDNN on float32 CPU workers, F.linear elsewhere; `torch`: F.linear; `onednn`:
    oneDNN over the weights in place; `onednn-packed`: oneDNN over packed copies. The oneDNN
    backends run float32 on CPU only."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"linear_backend: expected one of {LINEAR_BACKENDS}, got {backend!r}")
    runs_onednn = device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    if backend == "auto":
        backend = "onednn" if runs_onednn else "torch"
    if backend == "torch":
        return plain_linear
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError(f"linear_backend {backend!r} runs float32 on CPU, not {dtype} on {device.type}")
    if not runs_onednn:
        raise ValueError(f"linear_backend {backend!r}: this torch build has no oneDNN")
    return onednn_linear if backend == "onednn" else PackedLinear()
