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
    profile's, measured with benchmarks/host_overhead.py; else the Llama-3-8B H200 figures),
    how a pipeline group's stages run against the cost model (None: the measured profile in
    kunserve/sim/profiles/), the links devices share, and the transitions' fixed costs
    (measured on 2x H200, docs/benchmarks.md)."""

    host_step_s: float | None = None  # the driver's time per step, beside the device's
    host_seq_s: float | None = None  # and per sequence in the step (building, sending, updating)
    host_token_s: float | None = None  # and per token computed
    # A group stage's compute time over the cost model's for its layers and micro-batch.
    group_stage_factor: float | None = None
    # Replicas and pipelines schedule a step while the previous one runs (asynchronous
    # scheduling, as GPU executors do), except those that swap and under memory pressure
    # (kunserve/engine/scheduler.py): part of the step's host time then hides behind the
    # previous step's device time. That part, fitted to replicas' decode steps measured with it
    # off and on (docs/results/engine_mp_async_{off,on}_h200.json: 0.51-2.37 ms saved at batch
    # 1-256), is a pipeline's too (the same driver code; not measured on pipelines):
    schedule_ahead: bool = True
    ahead_hidden_step_s: float = 6.5e-4  # per step
    ahead_hidden_seq_s: float = 7.2e-6  # and per sequence in it
    stage_switch_s: float = 0.1  # a device becoming a stage or a replica again (drop/restore), beside transfers
    link_open_s: float = 1.08  # opening two replicas' links (arenas mapped, NCCL pair), once per pair
    hbm_copy_bytes_s: float = 4.3e12  # a copy within one device (read + write)
    # A device's NVLink port, which its copies in and out share: the KV exchange measured both
    # ways at once, 17.5 GB in 54.8 ms (docs/results/drop_restore_h200x2.json; one way alone
    # reached ~370 GB/s).
    device_port_bytes_s: float = 3.19e11
    # Devices whose swaps share one host link (two GPUs behind a PCIe switch: an assumption,
    # not measured; the link's rate is the cost model's "host" link, measured for one GPU).
    devices_per_host_link: int = 2
    devices_per_host: int = 8  # simulated GPUs of one host: device i is on host i // devices_per_host
    device_link: str = "device"  # the cost model's link between devices of one host (NVLink)
    network_link: str = "network"  # and between hosts
    host_link: str = "host"  # pinned host memory <-> device, for swaps
    idle_step_s: float = 1e-3  # a loop with requests but nothing to run looks again after this

    def __post_init__(self) -> None:
        if self.group_stage_factor is not None and not self.group_stage_factor > 0:
            raise ValueError(f"group_stage_factor: must be > 0, got {self.group_stage_factor}")
        if self.devices_per_host_link < 1 or self.devices_per_host < 1:
            raise ValueError("devices_per_host_link, devices_per_host: must be >= 1")


def simulated_host(settings: SimulatorConfig, rank: int) -> str:
    return f"host{rank // settings.devices_per_host}"


class Fabric:
    """The links simulated devices share, each carrying one transfer at a time: every
    device's NVLink port (a copy between two devices of a host holds both ends) and every
    host link (pinned host memory to and from its devices, each direction its own). A
    transfer starts when it is ready and all its links are free."""

    def __init__(self) -> None:
        self._free_at: dict[str, float] = {}

    def occupy(self, links: list[str], ready: float, seconds: float) -> float:
        """Run a transfer of `seconds` over `links` from `ready` on; returns when it ends."""
        start = max([ready, *(self._free_at.get(link, 0.0) for link in links)])
        for link in links:
            self._free_at[link] = start + seconds
        return start + seconds


def device_port(rank: int) -> str:
    return f"port{rank}"


def host_link(settings: SimulatorConfig, rank: int, direction: str) -> str:
    """The host link device `rank`'s swaps in `direction` ("out" or "in") go over."""
    return f"host-link{rank // settings.devices_per_host_link}-{direction}"
