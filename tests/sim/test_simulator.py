"""The simulator runs the real control plane on simulated devices (kunserve/sim/).

Specified: driven through the same rounds of arrivals, steps and coordinator checks, a real
CPU cluster (worker processes, real tensors) and a simulated one make the same decisions:
the same requests dispatched, admitted, preempted, fused into a group and split back, in the
same order. Fast-forwarding steady decode steps changes no result of a simulation. A step
takes the driver's host time and the cost model's time; a pipeline's stages overlap."""

from __future__ import annotations

from pathlib import Path

import pytest

from kunserve import EngineConfig, SamplingParams
from kunserve.bench.in_process import request_params
from kunserve.bench.workload import load_trace
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.exchange import OverlappedExchange
from kunserve.cluster.runner import TransitionConflict
from kunserve.cluster.transitions import fuse
from kunserve.engine.block_manager import BlockManager
from kunserve.engine.cost_model import StepShape
from kunserve.engine.sequence import Sequence
from kunserve.engine.step_builder import build_step_input
from kunserve.sampling_params import RequestOutputKind
from kunserve.sim.cluster import SimulatedCluster
from kunserve.sim.executor import SimulatedGroupExecutor, StagePipeline, host_step_time
from kunserve.sim.settings import SimulatorConfig, VirtualClock

# The first 45 s of data/traces/azure_llm_conv_2023.csv: a small excerpt the tests replay quickly.
TRACE = Path(__file__).resolve().parents[1] / "data" / "azure_llm_conv_2023_first_45s.csv"
MAX_MODEL_LEN = 256
# A trace window that overloads the KV memory of two replicas of dummy Llama-3-8B with 24 GiB each (8 GiB of
# KV) long enough for a drop.
FF_TRACE_S, FF_RATE_SCALE, FF_BUDGET = 40.0, 16.0, 24 << 30
ROUND_S = 0.01  # the coordinator's clock advances this much per round of the lock-step driver
MAX_ROUNDS = 400
# Sixteen requests over the first rounds: far more KV than two replicas of 12 blocks hold.
ARRIVALS = [(i // 4, [(17 * j + 7 * i) % 500 for j in range(40)], 40 if i % 2 == 0 else 8) for i in range(16)]


def lock_step(cluster: Cluster | SimulatedCluster) -> list[tuple]:
    """Rounds of: this round's arrivals (dispatched), one step of every replica not merged
    into a group, one coordinator check. Returns, per round, what each replica runs and
    waits for, and the transitions so far."""
    log = []
    params = {i: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY) for i, (_, _, n) in enumerate(ARRIVALS)}
    for round_ in range(MAX_ROUNDS):
        for i, (at, prompt, _) in enumerate(ARRIVALS):
            if at == round_:
                index = cluster.dispatcher.choose([replica.kv_load() for replica in cluster.replicas])
                cluster.replicas[index].engine.add_request(f"r{i}", prompt, params[i])
        for replica in cluster.replicas:
            if replica.forward_to is None and replica.engine.has_unfinished_requests():
                replica.engine.step()
        cluster.coordinator.check(round_ * ROUND_S)
        engines = [cluster.coordinator.runner.engine_of(i) for i in range(len(cluster.replicas))]
        log.append((tuple((tuple(s.request_id for s in e.scheduler.running),
                           tuple(s.request_id for s in e.scheduler.waiting)) for e in engines),
                     tuple((t.kind, tuple(t.members)) for t in cluster.coordinator.runner.history)))
        if round_ > ARRIVALS[-1][0] and not any(e.has_unfinished_requests() for e in engines) \
                and not cluster.coordinator.runner.groups:
            break
    return log


@pytest.mark.slow  # a real cluster of worker processes beside the simulated one
@pytest.mark.parametrize("policy", ["kunserve", "migrate"])
def test_a_simulated_cluster_makes_the_real_clusters_decisions(llama_dir: Path, policy: str) -> None:
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=12, max_num_seqs=16,
                          max_num_batched_tokens=64, worker_threads=1)
    coordinator = CoordinatorConfig(policy, drop_after_s=2 * ROUND_S, restore_after_s=10 * ROUND_S)
    real = Cluster.launch(config, num_replicas=2, coordinator=coordinator)
    try:
        real.open_links()
        expected = lock_step(real)
    finally:
        real.shutdown()
    simulated = lock_step(SimulatedCluster(config, 2, coordinator))
    kinds = {kind for kind, _ in expected[-1][1]}
    assert kinds >= ({"drop", "restore"} if policy == "kunserve" else {"migrate"})
    assert simulated == expected


@pytest.mark.parametrize("async_scheduling", ["off", "on"])  # on: host time hidden behind the step before
def test_fast_forwarding_steady_decodes_changes_no_result(async_scheduling: str) -> None:
    specs = load_trace(TRACE, duration_s=FF_TRACE_S, rate_scale=FF_RATE_SCALE, seed=0)
    runs = []
    for fast in (True, False):
        config = EngineConfig(model="llama-3-8b", memory_budget_bytes=FF_BUDGET, device="cuda",
                              async_scheduling=async_scheduling)
        cluster = SimulatedCluster(config, 2, CoordinatorConfig("kunserve"))
        outputs = cluster.run([s.arrival_s for s in specs], [[0] * s.prompt_len for s in specs],
                              [request_params(s.output_len) for s in specs], fast_forward=fast)
        runs.append(({rid: (o.metrics.first_token_time, o.metrics.finished_time, o.metrics.num_preemptions)
                      for rid, o in outputs.items()}, [(t.kind, t.at) for t in cluster.coordinator.runner.history]))
    assert runs[0][1], "the workload should overload the replicas into a drop"
    assert runs[0] == runs[1]


def test_a_step_takes_the_host_time_and_the_cost_models_time() -> None:
    cluster = SimulatedCluster(EngineConfig(model="llama-3-8b", num_kv_blocks=64), 1, settings=SimulatorConfig())
    engine = cluster.engines[0]
    engine.add_request("r", [0] * 100, request_params(1))
    engine.step()
    settings = cluster.settings
    expected = settings.host_step_s + settings.host_seq_s + 100 * settings.host_token_s + engine.cost_model.step_time(
        StepShape.of_chunk(0, 100, True), engine.spec.num_layers)
    assert cluster.clock() == pytest.approx(expected)


def test_a_pipelines_stages_overlap_successive_micro_batches() -> None:
    pipeline = StagePipeline(2, VirtualClock())
    assert pipeline.run(0.0, [1.0, 2.0]) == 3.0
    assert pipeline.run(0.0, [1.0, 2.0]) == 5.0  # stage 0 ran it at [1, 2), stage 1 was free at 3
    assert pipeline.take_busy() == [2.0, 4.0]


def test_the_step_shape_of_a_batch_is_the_sum_of_its_chunks() -> None:
    blocks = BlockManager(16, range(64))
    decode = Sequence("d", [1] * 30, SamplingParams(), 64)
    decode.num_computed_tokens = 29
    prefill = Sequence("p", [1] * 50, SamplingParams(), 64)
    prefill.num_computed_tokens = 10
    scheduled = [(decode, 1), (prefill, 40)]
    for seq, n in scheduled:
        blocks.allocate(seq, seq.num_computed_tokens + n)
    step = build_step_input(scheduled, 16, [])
    assert StepShape.of_batch(step.batch.query_lens, step.batch.context_lens, len(step.sample_rows)) == \
        StepShape.of_step(scheduled)


def test_a_group_spanning_hosts_pays_the_network_for_its_activations() -> None:
    step_s = {}
    for devices_per_host in (2, 1):  # both replicas on one host; one replica per host
        # By sequence count: the one prompt goes whole into the first micro-batch.
        config = EngineConfig(model="llama-3-8b", num_kv_blocks=256, lookahead_batching=False)
        cluster = SimulatedCluster(config, 2, settings=SimulatorConfig(devices_per_host=devices_per_host))
        group, _ = fuse(cluster.engines)
        group.add_request("r", [0] * 512, request_params(1))
        start = cluster.clock()
        group.step()
        step_s[devices_per_host] = cluster.clock() - start
    hop = cluster.cost.transfer_time(512 * cluster.cost.activation_bytes_per_token, "network") - \
        cluster.cost.transfer_time(512 * cluster.cost.activation_bytes_per_token, "device")
    assert step_s[1] - step_s[2] == pytest.approx(hop)


def test_drops_of_disjoint_replicas_due_at_one_check_run_side_by_side() -> None:
    # Four replicas overloaded at once: two pairs fuse at the same check, and the second
    # pair's drop starts when the first's does instead of after it.
    config = EngineConfig(model="llama-3-8b", num_kv_blocks=12, max_num_seqs=16, max_num_batched_tokens=64,
                          max_model_len=MAX_MODEL_LEN)
    cluster = SimulatedCluster(config, 4, CoordinatorConfig("kunserve", max_group_size=2, drop_after_s=2 * ROUND_S))
    cluster.open_all_links()
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    for i in range(24):  # six per replica: two wait for blocks from the start
        cluster.replicas[i % 4].engine.add_request(f"r{i}", [(17 * j + 7 * i) % 500 for j in range(40)], params)
    for round_ in range(10):
        for replica in cluster.replicas:
            if replica.forward_to is None and replica.engine.has_unfinished_requests():
                replica.engine.step()
        cluster.coordinator.check(round_ * ROUND_S)
    drops = [t for t in cluster.coordinator.runner.history if t.kind == "drop"]
    assert len(drops) == 2 and not set(drops[0].members) & set(drops[1].members)
    starts = [t.at - t.duration_s for t in drops]
    assert starts[1] == pytest.approx(starts[0], abs=1e-9) and drops[0].duration_s > 0


def test_a_transition_is_refused_on_a_replica_another_transition_holds() -> None:
    cluster = SimulatedCluster(EngineConfig(model="llama-3-8b", num_kv_blocks=12), 3, CoordinatorConfig("kunserve"))
    with cluster.coordinator.runner.holding([1]), pytest.raises(TransitionConflict, match="in another transition"):
        cluster.coordinator.runner.drop([0, 1])
    assert not cluster.coordinator.runner.groups


def test_a_chunk_of_an_overlapped_exchange_occupies_its_stage_before_the_next_micro_batch() -> None:
    config = EngineConfig(model="llama-3-8b", num_kv_blocks=256, lookahead_batching=False)
    # One replica per host: the KV crosses the network, so a chunk outlasts the driver's step.
    cluster = SimulatedCluster(config, 2, settings=SimulatorConfig(devices_per_host=1))
    for i, engine in enumerate(cluster.engines):
        engine.add_request(f"r{i}", [0] * 512, request_params(64))
        engine.step()  # prefilled: KV to exchange
    group, stats = fuse(cluster.engines, overlap_chunk=16)
    assert stats.exchange_s == 0  # the drop does not wait for the exchange
    executor = group.executor
    assert isinstance(executor, SimulatedGroupExecutor) and isinstance(group.between_steps, OverlappedExchange)
    group.add_request("queued", [0] * 64, request_params(1))
    start = cluster.clock()
    group.step()  # posts the first chunk (r1's stage-0 KV, received by stage 0), then the micro-batch
    chunk_end = executor.members[0].devices[0].free_at
    ready = start + host_step_time(executor.settings, 1, 64)
    assert chunk_end > ready  # so the micro-batch waits for the chunk
    stage_0_s = cluster.cost.stage_time(StepShape.of_chunk(0, 64, True), 32, 2, 0, "device",
                                        executor.settings.group_stage_factor or 1.0)  # a group stage's measured factor
    assert executor.pipeline.free_at[0] == pytest.approx(chunk_end + stage_0_s)
