"""What the simulator charges beyond the cost model's steps (kunserve/sim/), each from a
measured or stated source: copies between devices of a host share both devices' NVLink ports
(the KV exchange's measured both-ways rate); swaps share a host link; the first drop of a
pair opens its links when a simulation does not open them at start; replicas and groups that
schedule ahead hide their host time behind the step before, and hold a request arriving after the
next step was formed (a replica: just before the running one's end) for the step after it;
a group's stages run `group_stage_factor` times the cost model."""

from __future__ import annotations

import pytest

from kunserve import EngineConfig
from kunserve.bench.in_process import request_params
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.transitions import fuse
from kunserve.engine.cost_model import StepShape
from kunserve.engine.step_builder import build_step_input
from kunserve.sim.cluster import SimulatedCluster
from kunserve.sim.executor import GROUP_STAGE_PROFILE, resolve_group_stage_factor
from kunserve.sim.fast_forward import schedules_ahead
from kunserve.sim.settings import Fabric, SimulatorConfig
from kunserve.worker.protocol import DeviceCalls

MODEL = "llama-3-8b"
BLOCKS = 1000


def cluster_of(num: int, settings: SimulatorConfig | None = None, **config: object) -> SimulatedCluster:
    return SimulatedCluster(EngineConfig(model=MODEL, num_kv_blocks=BLOCKS, **config), num,
                            CoordinatorConfig("kunserve"), settings=settings)


def test_two_copies_between_two_devices_share_their_ports_at_the_measured_rate() -> None:
    cluster = cluster_of(2)
    a, b = (engine.executor for engine in cluster.engines)
    block_bytes = a.layout.block_bytes
    start = cluster.clock()
    one = b.post(0, DeviceCalls.pull_kv, a.global_ranks[0], list(range(100)), list(range(100)))
    other = a.post(0, DeviceCalls.pull_kv, b.global_ranks[0], list(range(100)), list(range(100)))
    one.wait()
    other.wait()
    rate = cluster.settings.device_port_bytes_s
    latency = cluster.cost.transfer_time(0, "device")
    assert cluster.clock() - start == pytest.approx(2 * (latency + 100 * block_bytes / rate))


def test_a_fabric_link_carries_one_transfer_at_a_time() -> None:
    fabric = Fabric()
    assert fabric.occupy(["a", "b"], 0.0, 1.0) == 1.0
    assert fabric.occupy(["b"], 0.5, 1.0) == 2.0  # waits for b
    assert fabric.occupy(["c"], 0.5, 1.0) == 1.5  # another link: at once


def swap_out_seconds(devices_per_host_link: int) -> float:
    """Two replicas each swapping 50 blocks out at once: when the later is done."""
    cluster = cluster_of(2, SimulatorConfig(devices_per_host_link=devices_per_host_link), preemption_mode="swap")
    step = build_step_input([], cluster.engines[0].config.block_size, [], [(i, i) for i in range(50)], [])
    block = cluster.engines[0].executor.layout.block_bytes
    return max(engine.executor.swaps_done_at(step, 0.0, block) for engine in cluster.engines)


def test_swaps_of_devices_behind_one_host_link_take_turns() -> None:
    assert swap_out_seconds(2) == pytest.approx(2 * swap_out_seconds(1))


def test_the_first_drop_of_a_pair_opens_its_links_and_the_next_does_not() -> None:
    cluster = cluster_of(2)
    open_s = cluster.settings.link_open_s
    runner = cluster.coordinator.runner
    first = runner.drop([0, 1])
    runner.restore_group(runner.groups[0], "test")
    second = runner.drop([0, 1])
    assert first.pause_s >= open_s > second.pause_s


def decode_step_seconds(schedule_ahead: bool) -> tuple[float, float, float]:
    """A replica decoding 8 requests, step after step: (the last step's time, its host time,
    its compute time)."""
    cluster = cluster_of(1, SimulatorConfig(schedule_ahead=schedule_ahead), device="cuda", async_scheduling="on")
    engine = cluster.engines[0]
    for i in range(8):
        engine.add_request(f"r{i}", [0] * 64, request_params(200))
    for _ in range(20):
        engine.executor.overlaps_host = schedule_ahead
        engine.step()
    start = cluster.clock()
    engine.executor.overlaps_host = schedule_ahead
    engine.step()
    shape = StepShape(8, sum(s.num_computed_tokens - 1 for s in engine.scheduler.running), 0, 8)
    settings = cluster.settings
    host = settings.host_step_s + 8 * (settings.host_seq_s + settings.host_token_s)
    return cluster.clock() - start, host, engine.cost_model.step_time(shape, engine.spec.num_layers)


def test_a_replica_scheduling_ahead_hides_the_measured_part_of_its_host_time() -> None:
    serial, host, compute = decode_step_seconds(schedule_ahead=False)
    ahead, _, _ = decode_step_seconds(schedule_ahead=True)
    assert serial == pytest.approx(host + compute)
    settings = SimulatorConfig()
    hidden = min(settings.ahead_hidden_step_s + 8 * settings.ahead_hidden_seq_s, compute, host)
    assert ahead == pytest.approx(host - hidden + compute) and ahead < serial


def group_decode_seconds(settings: SimulatorConfig) -> float:
    """A pair's group decoding 8 requests in two micro-batches: how long its last two steps
    (one step of each micro-batch) take, the group scheduling ahead as the cluster lets it."""
    cluster = cluster_of(2, settings, device="cuda", async_scheduling="on", lookahead_batching=False)
    group, _ = fuse(cluster.engines)
    for i in range(8):
        group.add_request(f"r{i}", [0] * 64, request_params(200))
    for _ in range(20):
        group.executor.overlaps_host = settings.schedule_ahead and schedules_ahead(group)  # as the cluster does
        group.step()
    start = cluster.clock()
    for _ in range(2):
        group.executor.overlaps_host = settings.schedule_ahead and schedules_ahead(group)
        group.step()
    return cluster.clock() - start


def test_a_group_scheduling_ahead_hides_part_of_its_host_time_as_a_replica_does() -> None:
    serial = group_decode_seconds(SimulatorConfig(schedule_ahead=False))
    none_hidden = group_decode_seconds(SimulatorConfig(ahead_hidden_step_s=0.0, ahead_hidden_seq_s=0.0))
    ahead = group_decode_seconds(SimulatorConfig())
    assert none_hidden == pytest.approx(serial)
    assert ahead < serial


def test_a_groups_stages_run_the_measured_factor_times_the_cost_model() -> None:
    times = {}
    for factor in (1.0, 2.0):
        cluster = cluster_of(2, SimulatorConfig(group_stage_factor=factor), lookahead_batching=False)
        group, _ = fuse(cluster.engines)
        group.add_request("r", [0] * 512, request_params(1))
        start = cluster.clock()
        group.step()
        times[factor] = cluster.clock() - start
    compute = cluster.cost.step_time(StepShape.of_chunk(0, 512, True), 16, samples=False) + \
        cluster.cost.step_time(StepShape.of_chunk(0, 512, True), 16)
    assert times[2.0] - times[1.0] == pytest.approx(compute)


def test_the_default_group_stage_factor_is_the_measured_profiles() -> None:
    import json
    measured = json.loads(GROUP_STAGE_PROFILE.read_text())
    assert resolve_group_stage_factor(SimulatorConfig()).group_stage_factor == measured["group_stage_factor"] > 1
    assert "drop_restore" in measured["source"]


def swap_step_seconds(num_blocks: int, group: bool) -> float:
    """A step swapping `num_blocks` blocks out and nothing else, each device behind its own
    host link, on a replica or a pair's group: how long it takes."""
    cluster = cluster_of(2, SimulatorConfig(devices_per_host_link=1), preemption_mode="swap")
    executor = fuse(cluster.engines)[0].executor if group else cluster.engines[0].executor
    step = build_step_input([], cluster.engines[0].config.block_size, [], [(i, i) for i in range(num_blocks)], [])
    start = cluster.clock()
    executor.submit(step)
    executor.collect()
    return cluster.clock() - start


def test_a_groups_stages_swap_their_own_layers_each_over_its_host_link() -> None:
    latency = cluster_of(1).cost.transfer_time(0, SimulatorConfig().host_link)
    replica = swap_step_seconds(64, group=False) - swap_step_seconds(0, group=False) - latency
    pair = swap_step_seconds(64, group=True) - swap_step_seconds(0, group=True) - latency
    assert replica > 0 and pair == pytest.approx(replica / 2)  # each stage moves half the bytes, side by side


def recorded_step_starts(cluster: SimulatedCluster) -> list[float]:
    """The times at which the cluster's first engine's steps start, filled as it runs."""
    starts: list[float] = []
    step = cluster.engines[0].step

    def recorded() -> list:
        starts.append(cluster.clock())
        return step()

    cluster.engines[0].step = recorded  # type: ignore[method-assign]
    return starts


def decode_step_starts(**config: object) -> list[float]:
    """When the steps of eight requests decoding on one replica scheduling ahead start."""
    cluster = cluster_of(1, device="cuda", async_scheduling="on", **config)
    starts = recorded_step_starts(cluster)
    cluster.run([0.0] * 8, [[0] * 64] * 8, [request_params(40)] * 8, fast_forward=False)
    return starts


def steps_before_scheduled(arrival: float, schedule_ahead: bool = True, **config: object) -> int:
    """The eight requests of `decode_step_starts`, a ninth arriving at `arrival`: how many
    steps start after it arrives and before it is first scheduled."""
    return late_requests_steps([arrival], schedule_ahead, **config)[0]


def late_requests_steps(arrivals: list[float], schedule_ahead: bool = True, **config: object) -> list[int]:
    """`steps_before_scheduled` of requests arriving at `arrivals`, all in one run."""
    cluster = cluster_of(1, SimulatorConfig(schedule_ahead=schedule_ahead), device="cuda", async_scheduling="on",
                         **config)
    starts = recorded_step_starts(cluster)
    count = 8 + len(arrivals)
    outputs = cluster.run([0.0] * 8 + arrivals, [[0] * 64] * count, [request_params(40)] * count, fast_forward=False)
    steps = []
    for i in range(8, count):
        metrics = outputs[str(i)].metrics
        assert metrics is not None and metrics.first_scheduled_time is not None
        steps.append(sum(metrics.arrival_time < t < metrics.first_scheduled_time for t in starts))
    return steps


def test_a_request_arriving_early_in_a_replicas_step_joins_the_step_formed_just_before_its_end() -> None:
    starts = decode_step_starts()
    assert steps_before_scheduled(starts[10] + 0.1 * (starts[11] - starts[10])) == 0


def test_a_request_arriving_just_before_a_replicas_step_ends_waits_for_the_step_after_the_next() -> None:
    starts = decode_step_starts()
    assert steps_before_scheduled(starts[11] - 0.01 * (starts[11] - starts[10])) == 1


def test_an_arrival_forms_the_replicas_step_ahead_at_once_and_a_second_one_waits_for_the_next() -> None:
    starts = decode_step_starts()
    step_s = starts[11] - starts[10]
    assert late_requests_steps([starts[10] + 0.1 * step_s, starts[10] + 0.2 * step_s]) == [0, 1]


def test_a_request_arriving_early_in_a_replicas_prompt_step_waits_for_the_step_after_the_next() -> None:
    starts = decode_step_starts()  # the first step computes the eight prompts; the step ahead is formed as it starts
    assert steps_before_scheduled(starts[0] + 0.1 * (starts[1] - starts[0])) == 1


def test_a_replica_forming_its_step_ahead_as_the_one_before_starts_makes_every_arrival_wait_a_step() -> None:
    starts = decode_step_starts(ahead_slack=1.0)
    assert steps_before_scheduled(starts[10] + 0.1 * (starts[11] - starts[10]), ahead_slack=1.0) == 1


def test_a_replica_not_scheduling_ahead_schedules_an_arrival_in_its_next_step() -> None:
    starts = decode_step_starts()
    assert steps_before_scheduled(starts[11] - 0.01 * (starts[11] - starts[10]), schedule_ahead=False) == 0


def test_a_held_request_counts_toward_its_replicas_load() -> None:
    cluster = cluster_of(1, device="cuda", async_scheduling="on")
    replica = cluster.replicas[0]
    replica.schedules_ahead, replica.busy_until = True, cluster.clock() + 1.0  # a step runs, the next scheduled
    before = replica.kv_demand_blocks()
    replica.add_request("late", [0] * 64, request_params(8))
    assert not cluster.engines[0].has_request("late")
    assert replica.kv_demand_blocks() == before + cluster.engines[0].block_manager.blocks_for(64)
