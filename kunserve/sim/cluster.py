"""A simulated cluster: the real control plane (dispatcher, coordinator, planner, engines
with their schedulers and block accounting) on simulated devices, driven by discrete
events on a virtual clock instead of threads.

Events: request arrivals, replica steps and coordinator checks, in time order. A replica's
step runs whole when its event comes (the engine's `step()`, whose executor moves the clock
to the step's end) and the replica's next step is due then; a request arriving meanwhile
waits in the engine's queue for that step, as it waits in a live replica's inbox. A replica
that schedules ahead (as GPU replicas do: fast_forward.schedules_ahead) formed its next step
while this one ran (a replica as a request arrived, else just before this one's end:
kunserve/engine/ahead_timer.py; a pipeline as it started), so a request arriving after that
is held for the step after the next (it counts toward the replica's load meanwhile). A
coordinator check sees the replicas as of their last completed steps; a transition waits for
its members' running steps to end (as a live one pauses their loops) and holds them for
its simulated duration.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from kunserve.arch.spec import parse_dtype
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.coordinator import Coordinator
from kunserve.cluster.dispatcher import Dispatcher
from kunserve.cluster.links import Links
from kunserve.cluster.policies.registry import policy_class
from kunserve.config import EngineConfig
from kunserve.engine.ahead_timer import lead_s
from kunserve.engine.cost_model import CostModel, resolve_cost_model
from kunserve.engine.llm_engine import LLMEngine
from kunserve.engine.sequence import Sequence
from kunserve.layout import arena_layout, stage_ranges
from kunserve.model.presets import resolve_model
from kunserve.outputs import RequestOutput
from kunserve.sampling_params import SamplingParams
from kunserve.sim.executor import (
    SimulatedExecutor,
    SimulatedGroupExecutor,
    ahead_form_time,
    resolve_group_stage_factor,
    resolve_host_time,
)
from kunserve.sim.fast_forward import decode_ahead, schedules_ahead
from kunserve.sim.settings import Fabric, SimulatorConfig, VirtualClock

STEP = 1  # the heap holds replica steps; arrivals (first at equal times, as into an inbox) and checks are kept apart


@dataclass
class SimulatedReplica:
    """A replica's loop as the coordinator sees it (pause, resume, merge, the engine it runs)."""

    clock: VirtualClock
    engine: LLMEngine
    finished: dict[str, RequestOutput]  # the cluster's finished requests (shared, as a live cluster's streams)
    refused: dict[str, str]  # the cluster's refused requests and why (shared)
    busy_until: float = 0.0  # its current step (or transition) ends then
    # Requests that arrived while a step ran with the next one already scheduled (the module's
    # docstring): they join the engine's queue when its next step is scheduled.
    held: list[Sequence] = dataclasses.field(default_factory=list)
    schedules_ahead: bool = False  # whether its running step had the next one scheduled ahead
    step_started: float = 0.0  # when its running (or last) step was scheduled
    forward_to: SimulatedReplica | None = None  # merged into a group run by that replica
    step_due: bool = False  # a step event is queued
    is_alive: bool = True

    def kv_demand_blocks(self) -> int | None:
        if self.forward_to is not None:
            return None
        blocks = self.engine.block_manager
        return self.engine.kv_demand_blocks() + sum(blocks.blocks_for(seq.num_prompt_tokens) for seq in self.held)

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        """Into the engine's queue, or held (arrived, validated) while a step runs with the
        next scheduled ahead."""
        try:
            seq = self.engine.make_sequence(request_id, prompt, params)
        except ValueError as error:  # refused, as a server answers 400
            self.refused[request_id] = f"ValueError: {error}"
            return
        if self.schedules_ahead and self.clock() < self.busy_until:
            self.held.append(seq)
        else:
            self.engine.add_sequence(seq)

    def release_held(self, arrived_by: float = math.inf) -> None:
        """The held requests that arrived by `arrived_by` join the engine's queue."""
        released = [seq for seq in self.held if seq.metrics.arrival_time <= arrived_by]
        self.held = [seq for seq in self.held if seq.metrics.arrival_time > arrived_by]
        for seq in released:
            self.engine.add_sequence(seq)

    def kv_load(self) -> float | None:
        demand = self.kv_demand_blocks()
        return None if demand is None else demand / self.engine.block_manager.num_total_blocks

    def pause(self) -> None:
        """Wait for the running step to end; its held requests join the engine's queue."""
        self.clock.advance_to(self.busy_until)
        self.release_held()

    def resume(self) -> None:
        self.busy_until = max(self.busy_until, self.clock())

    def run_engine(self, engine: LLMEngine) -> None:
        self.engine = engine

    def merge_into(self, owner: SimulatedReplica) -> None:
        self.forward_to = owner

    def unmerge(self) -> None:
        self.forward_to = None

    def fail(self, error: BaseException) -> None:
        """A transition failed halfway: in a simulation that is a bug, not a fault to serve through."""
        raise RuntimeError("a simulated transition failed") from error

    def deliver_from_thread(self, outputs: list[RequestOutput]) -> None:
        self.finished.update((out.request_id, out) for out in outputs if out.finished)


class SimulatedCluster:
    def __init__(
        self,
        config: EngineConfig,
        num_replicas: int,
        coordinator: CoordinatorConfig | None = None,
        dispatch_policy: str = "least_loaded",
        settings: SimulatorConfig | None = None,
        device_budget_bytes: int | None = None,
    ) -> None:
        """`device_budget_bytes`: each device's memory for the engine when `config` names
        neither `num_kv_blocks` nor `memory_budget_bytes` (a GPU's total x utilization, less
        what is used before the arena)."""
        coordinator = coordinator or CoordinatorConfig()
        preemption_mode = policy_class(coordinator.overload_policy).preemption_mode
        config = dataclasses.replace(config, preemption_mode=preemption_mode, skip_tokenizer_init=True)
        self.clock = VirtualClock()
        self.wall_clock = self.clock
        self.settings = settings or SimulatorConfig()
        model = resolve_model(config.model)
        spec = model.spec
        dtype = spec.dtype if config.dtype == "auto" else parse_dtype(config.dtype)
        elem_bytes = dtype.itemsize
        t = config.tensor_parallel_size
        spec.check_tensor_parallel(t)
        self.cost: CostModel = resolve_cost_model(config.cost_profile, spec, model.name, elem_bytes, t)
        self.settings = resolve_group_stage_factor(resolve_host_time(self.settings, self.cost))
        self.fabric = Fabric()  # the links the cluster's devices share
        g = config.pipeline_parallel_size
        budget = config.memory_budget_bytes or device_budget_bytes
        if config.num_kv_blocks is None and budget is None:
            raise ValueError("num_kv_blocks, memory_budget_bytes or device_budget_bytes: a simulated device needs one")
        self.engines = []
        for i in range(num_replicas):
            layouts = [arena_layout(spec, config, layers, elem_bytes, budget) for layers in stage_ranges(spec.num_layers, g)]
            swap_blocks = (min(layout.swap_blocks(config.swap_space_bytes) for layout in layouts)
                           if config.can_swap else 0)
            executor = SimulatedExecutor(layouts[0], self.cost, self.clock, self.settings, spec.num_layers,
                                         i * config.devices_per_replica, g, swap_blocks, self.fabric, t)
            self.engines.append(LLMEngine(config, executor=executor, clock=self.clock))
        self.finished: dict[str, RequestOutput] = {}
        self.refused: dict[str, str] = {}
        self.replicas = [SimulatedReplica(self.clock, engine, self.finished, self.refused) for engine in self.engines]
        self.dispatcher = Dispatcher(dispatch_policy)
        self.links = Links()
        self.coordinator = Coordinator(self, coordinator)
        self._events: list[tuple[float, int, int, SimulatedReplica]] = []
        self._order = itertools.count()

    # ---- what the coordinator asks of a cluster ------------------------------------------------

    def open_links(self, members: list[int] | None = None) -> None:
        """Open the links between these replicas' devices (all when None), at their simulated cost."""
        indices = range(len(self.engines)) if members is None else members
        self.links.open({i: self.engines[i].executor for i in indices})

    def open_all_links(self) -> None:
        """Every pair's links, opened before serving (as `bench --launch` opens a live
        cluster's), so no drop or migration pays for them."""
        for a, b in itertools.combinations(range(len(self.replicas)), 2):
            self.links.mark_open(a, b)

    def run_together(self, transitions: list[Callable[[], object]]) -> None:
        """Transitions of disjoint replicas, each from now on its members' own time (a live
        cluster runs them side by side): each holds only its members busy."""
        start = self.clock()
        for transition in transitions:
            self.clock.now = start
            transition()
        self.clock.now = start

    # ---- the simulation -------------------------------------------------------------------------

    def run(
        self,
        arrivals: Seq[float],
        prompts: Seq[list[int]],
        params: Seq[SamplingParams],
        sample_every_s: float | None = None,
        sample: Callable[[float], None] | None = None,
        fast_forward: bool = True,
    ) -> dict[str, RequestOutput]:
        """Replay requests "0", "1", ... arriving at `arrivals` (seconds, non-decreasing);
        returns the final output of each that finished (a refused one's error is in
        `refused`). The coordinator checks every `check_interval_s`, on the grid k·interval;
        checks that could change nothing (`Coordinator.is_idle`) are skipped. Every
        `sample_every_s`, `sample(t)` looks at the cluster. `fast_forward`: steady decode
        steps between events run at once (kunserve/sim/fast_forward.py; the same results)."""
        if any(b < a for a, b in itertools.pairwise(arrivals)):
            raise ValueError("arrivals: must be non-decreasing")
        interval = self.coordinator.config.check_interval_s
        sampling = sample is not None and sample_every_s is not None
        next_arrival, tick, next_sample = 0, 0, 0.0
        while len(self.finished) + len(self.refused) < len(arrivals):
            t_arrival = arrivals[next_arrival] if next_arrival < len(arrivals) else math.inf
            t_step = self._events[0][0] if self._events else math.inf
            t_event = min(t_arrival, t_step)
            idle = self.coordinator.is_idle()  # nothing changes it before the next event
            while idle and not (sampling and tick * interval >= next_sample) and tick * interval < t_event:
                tick = max(tick + 1, math.ceil(t_event / interval))
            t_tick = tick * interval
            if math.isinf(t_event) and idle:
                raise RuntimeError("simulation stalled: requests unfinished, nothing left to run")
            if t_arrival <= t_step and t_arrival <= t_tick:
                self.clock.now = t_arrival
                self._arrive(f"{next_arrival}", prompts[next_arrival], params[next_arrival])
                next_arrival += 1
            elif t_step <= t_tick:
                t, _, _, replica = heapq.heappop(self._events)
                self.clock.now = t
                # The next look at the cluster: an arrival, or a check unless checks are idle.
                until = min(t_arrival, t_tick if not idle or sampling else math.inf)
                self._step(replica, until if fast_forward else t)
            else:
                self.clock.now = t_tick
                self.coordinator.check(t_tick)
                if sampling and t_tick >= next_sample:
                    assert sample is not None and sample_every_s is not None
                    sample(t_tick)
                    next_sample = t_tick + sample_every_s
                tick += 1
            self._schedule_steps()
        return self.finished

    def _push(self, t: float, replica: SimulatedReplica) -> None:
        heapq.heappush(self._events, (t, STEP, next(self._order), replica))

    def _arrive(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        index = self.dispatcher.choose([replica.kv_load() for replica in self.replicas])
        self.replicas[index].add_request(request_id, prompt, params)

    def _step(self, replica: SimulatedReplica, until: float) -> None:
        """Run the replica's next step, or its steady decode steps that start before `until`."""
        replica.step_due = False
        if replica.forward_to is not None or self.clock() < replica.busy_until:
            return
        engine = replica.engine
        before = self.clock()
        ahead = False
        if isinstance(engine.executor, SimulatedExecutor | SimulatedGroupExecutor):
            ahead = engine.executor.overlaps_host = self.settings.schedule_ahead and schedules_ahead(engine)
        # Scheduled ahead, this step was formed while the one before ran: it takes the held
        # requests that had arrived by then, the others wait for the next.
        replica.release_held(self._ahead_formed_at(replica, before) if ahead else math.inf)
        replica.schedules_ahead, replica.step_started = ahead, before
        if replica.held:
            until = before  # no steady decodes past the held requests' step
        if decode_ahead(engine, until):
            replica.busy_until = self.clock()
            return
        outputs = engine.step()
        if self.clock() == before:  # nothing could run: look again a little later
            replica.schedules_ahead = False  # no step runs that the next was scheduled beside
            self.clock.advance_to(before + self.settings.idle_step_s)
        replica.busy_until = self.clock()
        replica.deliver_from_thread(outputs)

    def _ahead_formed_at(self, replica: SimulatedReplica, start: float) -> float:
        """When a live engine formed the step scheduled ahead that starts at `start`: a
        replica when the first request arrived after the step before it began, or else just
        before that step ended (kunserve/engine/ahead_timer.py; its prediction taken as exact
        here), if that step was a decode step; else, and in a pipeline, as it started."""
        executor = replica.engine.executor
        if not isinstance(executor, SimulatedExecutor) or executor.num_stages > 1 or not executor.last_step_decode_only:
            return replica.step_started
        _, device_s = executor.last_step
        form_s = ahead_form_time(self.settings, len(replica.engine.scheduler.running))
        due = max(replica.step_started, start - lead_s(device_s, form_s, replica.engine.config.ahead_slack))
        arrivals = [seq.metrics.arrival_time for seq in replica.held if seq.metrics.arrival_time > replica.step_started]
        return min([due, *arrivals])

    def _schedule_steps(self) -> None:
        for replica in self.replicas:
            if not replica.step_due and replica.forward_to is None and (replica.engine.has_unfinished_requests()
                                                                        or replica.held):
                replica.step_due = True
                self._push(max(replica.busy_until, self.clock()), replica)
