"""Simulated devices behind the executor interface: a step takes the cost model's time on a
virtual clock, and nothing is computed. The engine above is the real one (scheduler, block
accounting, lookahead batching), and so are the coordinator, planner and transitions that
drive these executors through the same device calls as worker processes
(kunserve/sim/device.py answers them); the arena layout is the same arithmetic as a real
device's, so every block id agrees.

Timing. A replica's step costs the driver's host time (scheduling, sending, collecting;
`SimulatorConfig.host_*`), then each stage's compute in turn (cost_model.stage_time: its
layers, plus the activations' hop after the first stage); a stage starts a micro-batch when
it is free and the previous stage is done with it, so a pipeline's micro-batches overlap.
A step scheduled ahead (replicas, static pipelines and groups alike, as on GPUs) hides part
of its host time behind the step collected before it (overlapped_host_time).
Swaps ride on the step over the host link. Device calls (become a stage, pull KV, refill
weights) occupy the device for their transfer time: calls posted to several devices run
side by side, and waiting for one moves the clock to its end.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from kunserve.engine.cost_model import CostModel, HostTime, StepShape
from kunserve.executor.base import Executor, FusedGroupExecutor, StageBlockMap, WorkerExecutor
from kunserve.layout import ArenaLayout
from kunserve.sim.device import SimulatedDevice
from kunserve.sim.settings import Fabric, SimulatorConfig, VirtualClock, host_link
from kunserve.step import StepInput

SIMULATED_TOKEN = 0  # what every simulated step samples (simulated requests ignore EOS)


class SimulatedExecutor(WorkerExecutor):
    """One replica on one simulated device (or a static pipeline of `num_stages` of them). A
    tensor-parallel stage of `tp_size` GPUs is one simulated device: its ranks hold equal
    shards and run every call side by side (each over its own link), so the device prices a
    rank's share (its arena `layout` is a rank's) and the cost model a rank's step."""

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
        fabric: Fabric | None = None,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self._layout = layout
        self.cost = cost
        self.clock = clock
        self.settings = settings
        self.model_layers = num_layers
        self.fabric = fabric or Fabric()
        # Stage s's GPUs are global ranks first_rank + s·t + [0, t); it goes by the first.
        self.devices = [SimulatedDevice(layout, cost, settings, first_rank + stage * tp_size, self.fabric)
                        for stage in range(num_stages)]
        self.max_in_flight = num_stages
        self._num_swap_blocks = num_swap_blocks
        self._steps = StepQueue(num_stages, clock, settings)
        self._calls: dict[int, deque[tuple[float, Any]]] = {rank: deque() for rank in range(num_stages)}
        # Whether the replica's next step is scheduled while the one before runs (set before
        # each step: kunserve/sim/cluster.py).
        self.overlaps_host = False
        # While this replica is stage s of a group: the group's pipeline and s. A device call
        # then runs between the stage's micro-batches, as on a worker (a drop's overlapped
        # exchange, kunserve/cluster/exchange.py): after those submitted, before the next.
        self.pipeline_stage: tuple[StagePipeline, int] | None = None

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
        host = self._steps.host_time(step, self.overlaps_host)
        ready = self.clock() + host
        swap_wait = self.swaps_done_at(step, ready, self.layout.block_bytes) - ready  # computes once they are done
        stages = [swap_wait + self.cost.stage_time(shape, self.model_layers, g, s, self.settings.device_link)
                  for s in range(g)]
        self._steps.submit(step, stages, host)

    def swaps_done_at(self, step: StepInput, ready: float, block: int) -> float:
        """The step's KV copies to and from host memory, blocks of `block` bytes (a group's
        stage swaps sub-blocks of its layers), from `ready` on, each direction over the host
        link this device shares (settings.py Fabric); returns when both are done."""
        rank = self.devices[0].rank
        ends = [ready]
        for pairs, direction in ((step.swap_out, "out"), (step.swap_in, "in")):
            if len(pairs):
                seconds = self.cost.transfer_time(len(pairs) * block, self.settings.host_link)
                ends.append(self.fabric.occupy([host_link(self.settings, rank, direction)], ready, seconds))
        return max(ends)

    def collect(self) -> np.ndarray:
        return self._steps.collect()

    def take_busy_seconds(self) -> list[float]:
        return self._steps.pipeline.take_busy() if self.num_stages > 1 else []

    def stage_free_at(self) -> float:
        """When the (first) device finishes what it was given."""
        return self._steps.pipeline.free_at[0]

    @property
    def last_step(self) -> tuple[float, float]:
        """The last collected step's end and device seconds."""
        return self._steps.last_collected

    @property
    def last_step_decode_only(self) -> bool:
        """Whether every sequence of the last collected step computed one token."""
        return self._steps.last_decode_only

    def record_steps(self, end: float, compute_s: float, last_compute_s: float) -> None:
        """Steps applied without `submit` (kunserve/sim/fast_forward.py) kept the device busy
        until `end`, computing for `compute_s`, the last of them for `last_compute_s`."""
        self._steps.pipeline.free_at[0] = end
        self._steps.pipeline.busy_s[0] += compute_s
        self._steps.last_collected = (end, last_compute_s)
        self._steps.last_decode_only = True

    def release_layer(self, layer: int) -> range:
        return self.devices[0].release_layer(layer)

    def reclaim_layer(self, layer: int) -> None:
        self.devices[0].reclaim_layer(layer)

    # ---- device calls (drops, restores, migrations) ---------------------------------------------

    @property
    def global_ranks(self) -> list[int]:
        return [device.rank for device in self.devices]

    @property
    def num_stages(self) -> int:
        return len(self.devices)

    @property
    def hosts(self) -> list[str]:
        return [device.host for device in self.devices]

    def _start_call(self, rank: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The call runs at once on the simulated device; it completes once the device has
        been busy for its cost, after the calls given to it before."""
        device = self.devices[rank]
        value = getattr(device, name)(*args, **kwargs)
        begin = max(self.clock(), device.free_at)
        if self.pipeline_stage is not None:
            pipeline, stage = self.pipeline_stage
            begin = max(begin, pipeline.free_at[stage])
        device.free_at = device.run_call(begin)
        if self.pipeline_stage is not None:
            pipeline.free_at[stage] = device.free_at
        self._calls[rank].append((device.free_at, value))

    def _finish_call(self, rank: int) -> Any:
        done_at, value = self._calls[rank].popleft()
        self.clock.advance_to(done_at)
        return value

    def form_group(self, members: list[WorkerExecutor], blocks: StageBlockMap) -> Executor:
        simulated = [m for m in members if isinstance(m, SimulatedExecutor)]
        if len(simulated) != len(members):
            raise TypeError("a simulated group's members must all be simulated")
        return SimulatedGroupExecutor(simulated, blocks)


class SimulatedGroupExecutor(FusedGroupExecutor):
    """A drop's pipeline group of simulated replicas: stage r is member r, holding L/g layers."""

    def __init__(self, members: list[SimulatedExecutor], blocks: StageBlockMap) -> None:
        super().__init__(list(members), blocks)
        first = members[0]
        self.cost, self.clock, self.settings = first.cost, first.clock, first.settings
        self.model_layers = first.model_layers
        self._steps = StepQueue(len(members), first.clock, first.settings)
        self.overlaps_host = False  # as SimulatedExecutor's
        for stage, member in enumerate(members):
            member.pipeline_stage = (self._steps.pipeline, stage)
        # Stage s receives its activations over this link (a group may span hosts).
        self._hop_links = [self.settings.device_link] + [
            members[s].devices[0].link_to(members[s - 1].global_ranks[0]) for s in range(1, len(members))]

    @property
    def pipeline(self) -> StagePipeline:
        """When each of the group's stages is free (its micro-batches and device calls)."""
        return self._steps.pipeline

    def submit(self, step: StepInput) -> None:
        g = len(self.members)
        shape = step_shape(step)
        factor = self.settings.group_stage_factor
        assert factor is not None  # resolved: resolve_group_stage_factor
        stages = [self.cost.stage_time(shape, self.model_layers, g, s, self._hop_links[s], factor) for s in range(g)]
        host = self._steps.host_time(step, self.overlaps_host)
        ready = self.clock() + host
        sub_block = self.layout.block_bytes // g
        # Each stage swaps its layers' sub-blocks over its own host link, and computes once they are done.
        swapped = [member.swaps_done_at(step, ready, sub_block) for member in self.members]
        self._steps.submit(step, stages, host, swapped)

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
        # (done at, device seconds, sampled, decode only) per step in flight; the last collected's
        # end and device seconds, and whether every sequence in it computed one token.
        self._results: deque[tuple[float, float, np.ndarray, bool]] = deque()
        self.last_collected = (0.0, 0.0)
        self.last_decode_only = True

    def host_time(self, step: StepInput, overlaps: bool) -> float:
        """The driver's time for `step`, scheduled ahead (`overlaps`) or not."""
        return overlapped_host_time(self.settings, len(step.batch.query_lens), step.num_tokens, self.clock(),
                                    self.last_collected, overlaps)

    def submit(self, step: StepInput, stage_s: list[float], host_s: float, not_before: list[float] | None = None
               ) -> float:
        """Queue the step after `host_s` of the driver's time (stage s not before
        `not_before[s]`: its swaps); returns when it ends."""
        self.clock.advance_to(self.clock() + host_s)
        sampled = np.full(len(step.sample_rows), SIMULATED_TOKEN, dtype=np.int64)
        end = self.pipeline.run(self.clock(), stage_s, not_before)
        self._results.append((end, sum(stage_s), sampled, step.decodes_only))
        return end

    def collect(self) -> np.ndarray:
        done_at, device_s, sampled, decode_only = self._results.popleft()
        self.clock.advance_to(done_at)
        self.last_collected = (done_at, device_s)
        self.last_decode_only = decode_only
        return sampled


class StagePipeline:
    """When each stage of a pipeline is free: a micro-batch runs on stage s once stage s is
    free and stage s-1 has finished it."""

    def __init__(self, num_stages: int, clock: VirtualClock) -> None:
        self.free_at = [0.0] * num_stages
        self.busy_s = [0.0] * num_stages
        self.clock = clock

    def run(self, start: float, stage_s: list[float], not_before: list[float] | None = None) -> float:
        """Run a micro-batch taking `stage_s[s]` on stage s, ready at `start` (on stage s not
        before `not_before[s]`); returns when the last stage finishes it."""
        ready = start
        for s, seconds in enumerate(stage_s):
            begin = max(ready, self.free_at[s], not_before[s] if not_before else 0.0)
            self.free_at[s] = ready = begin + seconds
            self.busy_s[s] += seconds
        return ready

    def take_busy(self) -> list[float]:
        taken, self.busy_s = self.busy_s, [0.0] * len(self.busy_s)
        return taken


def step_shape(step: StepInput) -> StepShape:
    return StepShape.of_batch(step.batch.query_lens, step.batch.context_lens, len(step.sample_rows))


# Llama-3-8B on an H200, measured 2026-12-01 (before the cost model had the decode straggler;
# kunserve/engine/profiles/llama-3-8b.json now has its own, refitted): for profiles without their own.
FALLBACK_HOST_TIME = HostTime(step_s=4.23e-4, seq_s=1.402e-5, token_s=2.418e-6)


# The measured group stage factor (benchmarks/group_step_factor.py writes it).
GROUP_STAGE_PROFILE = Path(__file__).with_name("profiles") / "group_stage.json"


def resolve_group_stage_factor(settings: SimulatorConfig) -> SimulatorConfig:
    """`settings` with group_stage_factor taken from GROUP_STAGE_PROFILE when it is None."""
    if settings.group_stage_factor is not None:
        return settings
    factor = json.loads(GROUP_STAGE_PROFILE.read_text())["group_stage_factor"]
    return dataclasses.replace(settings, group_stage_factor=float(factor))


def resolve_host_time(settings: SimulatorConfig, cost: CostModel) -> SimulatorConfig:
    """`settings` with every host_* that is None taken from the cost profile (or the fallback)."""
    measured = cost.host or FALLBACK_HOST_TIME
    return dataclasses.replace(
        settings,
        host_step_s=measured.step_s if settings.host_step_s is None else settings.host_step_s,
        host_seq_s=measured.seq_s if settings.host_seq_s is None else settings.host_seq_s,
        host_token_s=measured.token_s if settings.host_token_s is None else settings.host_token_s,
    )


def host_step_time(settings: SimulatorConfig, num_seqs: int, num_tokens: int) -> float:
    """The driver's time for a step of `num_seqs` sequences computing `num_tokens` tokens
    (`settings` resolved: resolve_host_time)."""
    assert settings.host_step_s is not None and settings.host_seq_s is not None and settings.host_token_s is not None
    return settings.host_step_s + settings.host_seq_s * num_seqs + settings.host_token_s * num_tokens


def overlapped_host_time(settings: SimulatorConfig, num_seqs: int, num_tokens: int, now: float,
                         last_step: tuple[float, float], overlaps: bool) -> float:
    """The driver's time a step of `num_seqs` sequences computing `num_tokens` tokens adds:
    all of it, or, scheduled while the step before ran (`overlaps`, and submitted as that
    step ended: `last_step` is its end and device seconds), less the part scheduling ahead
    hides (settings.ahead_hidden_*), as far as that step's device time covers it."""
    host_s = host_step_time(settings, num_seqs, num_tokens)
    end, device_s = last_step
    if not (overlaps and now == end):
        return host_s
    return host_s - min(ahead_form_time(settings, num_seqs), device_s, host_s)


def ahead_form_time(settings: SimulatorConfig, num_seqs: int) -> float:
    """The driver's time to form and send a step of `num_seqs` sequences scheduled ahead: the
    part of its host time that scheduling ahead hides."""
    return settings.ahead_hidden_step_s + settings.ahead_hidden_seq_s * num_seqs
