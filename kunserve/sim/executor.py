"""Simulated devices behind the executor interface: a step takes the cost model's time on a
virtual clock, and nothing is computed. The engine above is the real one (scheduler, block
accounting, lookahead batching), and so are the coordinator, planner and transitions that
drive these executors through the same named calls as worker processes; the arena layout
is the same arithmetic as a real device's, so every block id agrees.

Timing. A replica's step costs the driver's host time (scheduling, sending, collecting;
`SimulatorConfig.host_*`), then each stage's compute in turn (cost_model.stage_time: its
layers, plus the activations' hop after the first stage); a stage starts a micro-batch when
it is free and the previous stage is done with it, so a pipeline's micro-batches overlap.
Swaps ride on the step over the host link. Named calls (become a stage, pull KV, refill
weights) occupy the device for their transfer time: calls posted to several devices run
side by side, and `result` waits for the one asked.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kunserve.engine.cost_model import CostModel, HostTime, StepShape
from kunserve.engine.staged_block_manager import StagedBlockManager
from kunserve.executor.base import Executor, FusedGroupExecutor, WorkerExecutor
from kunserve.layout import ArenaLayout, layers_outside_stage
from kunserve.step import StepInput

SIMULATED_TOKEN = 0  # what every simulated step samples (simulated requests ignore EOS)


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


class SimulatedExecutor(WorkerExecutor):
    """One replica on one simulated device (or a static pipeline of `num_stages` of them)."""

    def __init__(
        self,
        layout: ArenaLayout,
        cost: CostModel,
        clock: VirtualClock,
        settings: SimulatorConfig,
        num_layers: int,
        first_rank: int,
        num_stages: int = 1,
        num_swap_blocks: int = 0,
    ) -> None:
        self._layout = layout
        self.cost = cost
        self.clock = clock
        self.settings = settings
        self.model_layers = num_layers
        self._ranks = list(range(first_rank, first_rank + num_stages))
        self.max_in_flight = num_stages
        self._num_swap_blocks = num_swap_blocks
        self._steps = StepQueue(num_stages, clock, settings)
        self._device_free_at = 0.0  # named calls (transitions) run one after another per device
        self._posted: dict[int, deque[tuple[float, Any]]] = {rank: deque() for rank in range(num_stages)}
        self.released: set[int] = set()
        self.group: tuple[int, int] | None = None  # (stage, group size) while a stage of a drop's group

    # ---- the executor interface ------------------------------------------------------------

    @property
    def layout(self) -> ArenaLayout:
        return self._layout

    @property
    def num_swap_blocks(self) -> int:
        return self._num_swap_blocks

    def kv_block_ids(self) -> range:
        if self.num_stages == 1:
            return self._layout.initial_kv_blocks()
        return range(self._layout.num_initial_kv_blocks)

    def submit(self, step: StepInput) -> None:
        g = self.num_stages
        shape = step_shape(step)
        swap_s = swap_time(self, step)
        stages = [swap_s + self.cost.stage_time(shape, self.model_layers, g, s, self.settings.device_link)
                  for s in range(g)]
        self._steps.submit(step, stages)

    def collect(self) -> np.ndarray:
        return self._steps.collect()

    def take_busy_seconds(self) -> list[float]:
        return self._steps.pipeline.take_busy() if self.num_stages > 1 else []

    def stage_free_at(self) -> float:
        """When the (first) device finishes what it was given."""
        return self._steps.pipeline.free_at[0]

    def record_steps(self, end: float, compute_s: float) -> None:
        """Steps applied without `submit` (kunserve/sim/fast_forward.py) kept the device busy
        until `end`, computing for `compute_s`."""
        self._steps.pipeline.free_at[0] = end
        self._steps.pipeline.busy_s[0] += compute_s

    def release_layer(self, layer: int) -> range:
        if layer in self.released:
            raise ValueError(f"layer {layer} is already released")
        self.released.add(layer)
        return self._layout.released_blocks(layer)

    def reclaim_layer(self, layer: int) -> None:
        self.released.discard(layer)

    # ---- named calls (drops, restores, migrations) ---------------------------------------------

    @property
    def global_ranks(self) -> list[int]:
        return self._ranks

    @property
    def num_stages(self) -> int:
        return len(self._ranks)

    @property
    def hosts(self) -> list[str]:
        return [simulated_host(self.settings, rank) for rank in self._ranks]

    def link_to(self, peer: int) -> str:
        """The cost model's link between this (first) device and global rank `peer`."""
        same = simulated_host(self.settings, peer) == self.hosts[0]
        return self.settings.device_link if same else self.settings.network_link

    def post(self, rank: int, name: str, *args: Any) -> None:
        handler = DEVICE_CALLS.get(name)
        if handler is None:
            raise ValueError(f"a simulated device cannot {name!r}")
        value, busy_s = handler(self, *args)
        start = max(self.clock(), self._device_free_at)
        self._device_free_at = start + busy_s
        self._posted[rank].append((self._device_free_at, value))

    def result(self, rank: int) -> Any:
        done_at, value = self._posted[rank].popleft()
        self.clock.advance_to(done_at)
        return value

    @classmethod
    def form_group(cls, members: list[WorkerExecutor], blocks: StagedBlockManager) -> Executor:
        simulated = [m for m in members if isinstance(m, SimulatedExecutor)]
        if len(simulated) != len(members):
            raise TypeError("a simulated group's members must all be simulated")
        return SimulatedGroupExecutor(simulated, blocks)

    def sub_block_bytes(self) -> int:
        """Bytes of one (sub-)block as this device addresses its arena now."""
        return self._layout.block_bytes // (1 if self.group is None else self.group[1])


class SimulatedGroupExecutor(FusedGroupExecutor):
    """A drop's pipeline group of simulated replicas: stage r is member r, holding L/g layers."""

    def __init__(self, members: list[SimulatedExecutor], blocks: StagedBlockManager) -> None:
        super().__init__(list(members), blocks)
        first = members[0]
        self.cost, self.clock, self.settings = first.cost, first.clock, first.settings
        self.model_layers = first.model_layers
        self._steps = StepQueue(len(members), first.clock, first.settings)
        # Stage s receives its activations over this link (a group may span hosts).
        self._hop_links = [self.settings.device_link] + [
            members[s].link_to(members[s - 1].global_ranks[0]) for s in range(1, len(members))]

    def submit(self, step: StepInput) -> None:
        self.refuse_swaps(step)
        g = len(self.members)
        shape = step_shape(step)
        stages = [self.cost.stage_time(shape, self.model_layers, g, s, self._hop_links[s]) for s in range(g)]
        self._steps.submit(step, stages)

    def collect(self) -> np.ndarray:
        return self._steps.collect()

    def take_busy_seconds(self) -> list[float]:
        return self._steps.pipeline.take_busy()


class StepQueue:
    """A replica's or group's steps in flight: each starts after the driver's host time for it
    (the driver builds and sends it), runs stage by stage, and is collected in order."""

    def __init__(self, num_stages: int, clock: VirtualClock, settings: SimulatorConfig) -> None:
        self.pipeline = StagePipeline(num_stages, clock)
        self.clock = clock
        self.settings = settings
        self._results: deque[tuple[float, np.ndarray]] = deque()  # (done at, sampled) per step in flight

    def submit(self, step: StepInput, stage_s: list[float]) -> None:
        self.clock.advance_to(self.clock() + host_time(self.settings, step))
        sampled = np.full(len(step.sample_rows), SIMULATED_TOKEN, dtype=np.int64)
        self._results.append((self.pipeline.run(self.clock(), stage_s), sampled))

    def collect(self) -> np.ndarray:
        done_at, sampled = self._results.popleft()
        self.clock.advance_to(done_at)
        return sampled


class StagePipeline:
    """When each stage of a pipeline is free: a micro-batch runs on stage s once stage s is
    free and stage s-1 has finished it."""

    def __init__(self, num_stages: int, clock: VirtualClock) -> None:
        self.free_at = [0.0] * num_stages
        self.busy_s = [0.0] * num_stages
        self.clock = clock

    def run(self, start: float, stage_s: list[float]) -> float:
        """Run a micro-batch taking `stage_s[s]` on stage s, ready at `start`; returns when
        the last stage finishes it."""
        ready = start
        for s, seconds in enumerate(stage_s):
            begin = max(ready, self.free_at[s])
            self.free_at[s] = ready = begin + seconds
            self.busy_s[s] += seconds
        return ready

    def take_busy(self) -> list[float]:
        taken, self.busy_s = self.busy_s, [0.0] * len(self.busy_s)
        return taken


def simulated_host(settings: SimulatorConfig, rank: int) -> str:
    return f"host{rank // settings.devices_per_host}"


def step_shape(step: StepInput) -> StepShape:
    return StepShape.of_batch(step.batch.query_lens, step.batch.context_lens, len(step.sample_rows))


# Llama-3-8B on an H200 (kunserve/engine/profiles/llama-3-8b.json): for profiles without their own.
FALLBACK_HOST_TIME = HostTime(step_s=4.23e-4, seq_s=1.402e-5, token_s=2.418e-6)


def resolve_host_time(settings: SimulatorConfig, cost: CostModel) -> SimulatorConfig:
    """`settings` with every host_* that is None taken from the cost profile (or the fallback)."""
    measured = cost.host or FALLBACK_HOST_TIME
    return dataclasses.replace(
        settings,
        host_step_s=measured.step_s if settings.host_step_s is None else settings.host_step_s,
        host_seq_s=measured.seq_s if settings.host_seq_s is None else settings.host_seq_s,
        host_token_s=measured.token_s if settings.host_token_s is None else settings.host_token_s,
    )


def host_time(settings: SimulatorConfig, step: StepInput) -> float:
    return host_step_time(settings, len(step.batch.query_lens), step.num_tokens)


def host_step_time(settings: SimulatorConfig, num_seqs: int, num_tokens: int) -> float:
    """The driver's time for a step of `num_seqs` sequences computing `num_tokens` tokens
    (`settings` resolved: resolve_host_time)."""
    assert settings.host_step_s is not None and settings.host_seq_s is not None and settings.host_token_s is not None
    return settings.host_step_s + settings.host_seq_s * num_seqs + settings.host_token_s * num_tokens


def swap_time(executor: SimulatedExecutor, step: StepInput) -> float:
    """The step's swaps: the two directions overlap (separate copy streams)."""
    block = executor.layout.block_bytes
    link = executor.settings.host_link
    times = [executor.cost.transfer_time(len(pairs) * block, link) for pairs in (step.swap_out, step.swap_in)
             if len(pairs)]
    return max(times, default=0.0)


# ---- what a simulated device does for each named call: (returned value, busy seconds) ----------

def _become_stage(device: SimulatedExecutor, stage: int, num_stages: int, *_: Any) -> tuple[list[int], float]:
    layout = device.layout
    device.released.update(layers_outside_stage(layout.num_layers, stage, num_stages))
    released = layout.released_sub_blocks_of_stage(stage, num_stages)
    device.group = (stage, num_stages)
    return released, device.settings.stage_switch_s


def _become_replica(
    device: SimulatedExecutor, refill_from: dict[int, int] | None, _over_network: list[int] | None = None
) -> tuple[None, float]:
    """Each dropped layer comes from the stage that kept it, over the link to that device
    (from the weight source, here timed as the device link, when none is named)."""
    layer_bytes = device.layout.layer_bytes
    links = [device.link_to(refill_from[layer]) if refill_from else device.settings.device_link
             for layer in sorted(device.released)]
    refill = sum(device.cost.transfer_time(layer_bytes * links.count(link), link) for link in set(links))
    device.released.clear()
    device.group = None
    return None, device.settings.stage_switch_s + refill


def _pull_kv(device: SimulatedExecutor, peer: int, src_ids: list[int], _dst_ids: list[int]) -> tuple[None, float]:
    return None, device.cost.transfer_time(len(src_ids) * device.sub_block_bytes(), device.link_to(peer))


def _send_or_receive_kv(device: SimulatedExecutor, peer: int, ids: list[int]) -> tuple[None, float]:
    """Either end of a copy across hosts: both devices are busy for the transfer."""
    return None, device.cost.transfer_time(len(ids) * device.sub_block_bytes(), device.link_to(peer))


def _move_kv(device: SimulatedExecutor, src_ids: list[int], _dst_ids: list[int]) -> tuple[None, float]:
    return None, len(src_ids) * device.sub_block_bytes() * 2 / device.settings.hbm_copy_bytes_s


def _no_state(_device: SimulatedExecutor, *_: Any) -> tuple[dict, float]:
    """Sampler states: a simulation samples nothing."""
    return {}, 0.0


DEVICE_CALLS: dict[str, Callable[..., tuple[Any, float]]] = {
    "become_stage": _become_stage,
    "become_replica": _become_replica,
    "pull_kv": _pull_kv,
    "send_kv": _send_or_receive_kv,
    "recv_kv": _send_or_receive_kv,
    "move_kv": _move_kv,
    "take_sampler_states": _no_state,
    "give_sampler_states": _no_state,
}
