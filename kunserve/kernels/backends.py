"""The attention backends by name (`EngineConfig.attention_backend`): the one place that knows
the concrete backends. Each sits behind kunserve/kernels/attention.py's interface and is
imported only when chosen, so a CPU-only install never imports Triton."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kunserve.kernels.attention import AttentionBackend, TorchAttentionBackend


def _torch_backend(block_size: int, device: torch.device) -> AttentionBackend:
    return TorchAttentionBackend(block_size)


def _triton_backend(block_size: int, device: torch.device) -> AttentionBackend:
    from kunserve.kernels.triton_attention import TritonAttentionBackend

    return TritonAttentionBackend(block_size)


def _cpu_backend(block_size: int, device: torch.device) -> AttentionBackend:
    if device.type != "cpu":
        raise ValueError(f"attention_backend 'cpu' runs on CPU devices, not {device.type}")
    from kunserve.kernels.cpu_attention import CpuAttentionBackend

    return CpuAttentionBackend(block_size)


# Name -> the backend for a block size on a device. kunserve/config.py's ATTENTION_BACKENDS is
# these names and "auto".
ATTENTION_BACKENDS: dict[str, Callable[[int, torch.device], AttentionBackend]] = {
    "torch": _torch_backend,
    "triton": _triton_backend,
    "cpu": _cpu_backend,
}


def make_attention_backend(name: str, block_size: int, device: torch.device) -> AttentionBackend:
    """`auto` picks the Triton kernels on CUDA and the C decode kernel on CPU
    (kunserve/kernels/cpu_attention.py); `torch` is the reference everywhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend: expected 'auto' or one of {sorted(ATTENTION_BACKENDS)}, got {name!r}")
    return ATTENTION_BACKENDS[name](block_size, device)
