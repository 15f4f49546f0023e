"""A simulation's clock and its settings: what the cost model's steps do not cover."""

from __future__ import annotations

from dataclasses import dataclass


class VirtualClock:
    """Simulated seconds. The simulator sets it to each event's time; devices move it on
    while a step or a transfer runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, t)


@dataclass(frozen=True)
class SimulatorConfig:
    """What the cost model's steps do not cover: the host time of live steps (None: the cost
    profile's, measured with benchmarks/host_overhead.py; else the Llama-3-8B H200 figures)
    and the transitions' fixed costs (measured on 2x H200, docs/benchmarks.md)."""

    host_step_s: float | None = None  # the driver's time per step, beside the device's
    host_seq_s: float | None = None  # and per sequence in the step (building, sending, updating)
    host_token_s: float | None = None  # and per token computed
    stage_switch_s: float = 0.1  # a device becoming a stage or a replica again (drop/restore), beside transfers
    link_open_s: float = 1.08  # opening two replicas' links (arenas mapped, NCCL pair), once per pair
    hbm_copy_bytes_s: float = 4.3e12  # a copy within one device (read + write)
    devices_per_host: int = 8  # simulated GPUs of one host: device i is on host i // devices_per_host
    device_link: str = "device"  # the cost model's link between devices of one host (NVLink)
    network_link: str = "network"  # and between hosts
    host_link: str = "host"  # pinned host memory <-> device, for swaps
    idle_step_s: float = 1e-3  # a loop with requests but nothing to run looks again after this


def simulated_host(settings: SimulatorConfig, rank: int) -> str:
    return f"host{rank // settings.devices_per_host}"
