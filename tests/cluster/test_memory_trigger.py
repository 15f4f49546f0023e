"""When kunserve drops: only when requests wait because of memory (KV blocks or sequence
slots), never when they wait for the token budget (a compute-bound queue, which freeing
memory would not admit sooner); and each drop says why (kunserve/cluster/policies/kunserve.py).

Specified on simulated clusters (the real control plane: schedulers, coordinator, planner,
transitions) and on the scheduler alone."""

from __future__ import annotations

from kunserve import EngineConfig, SamplingParams
from kunserve.bench.in_process import request_params
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.policies.base import deficit
from kunserve.cluster.status import describe
from kunserve.engine.block_manager import BlockManager
from kunserve.engine.scheduler import KV_BLOCKS, SEQ_SLOTS, TOKEN_BUDGET, Scheduler
from kunserve.engine.sequence import Sequence
from kunserve.sim.cluster import SimulatedCluster

BLOCK_SIZE = 16
MODEL = "llama-3-8b"


def sequence(name: str, prompt_len: int) -> Sequence:
    return Sequence(name, [1] * prompt_len, SamplingParams(max_tokens=8), prompt_len + 8)


def test_a_queue_behind_a_spent_token_budget_waits_for_compute() -> None:
    scheduler = Scheduler(BlockManager(BLOCK_SIZE, range(1000)), max_num_seqs=64, max_num_batched_tokens=256)
    for i in range(4):
        scheduler.add(sequence(f"s{i}", 200))
    scheduler.schedule()
    assert scheduler.last_stall == TOKEN_BUDGET and scheduler.stalls[TOKEN_BUDGET] == 1


def test_a_queue_whose_head_fits_the_budget_but_not_the_blocks_waits_for_memory() -> None:
    scheduler = Scheduler(BlockManager(BLOCK_SIZE, range(20)), max_num_seqs=64, max_num_batched_tokens=4096)
    for i in range(3):
        scheduler.add(sequence(f"s{i}", 200))  # 13 blocks each: the second does not fit beside the first
    scheduler.schedule()
    assert scheduler.last_stall == KV_BLOCKS


def test_a_head_that_neither_the_budget_nor_the_blocks_can_take_waits_for_compute() -> None:
    # A prefill backlog in a full cache: the cache is full of prompts being prefilled, and
    # more memory would only spread the same budget over more of them.
    scheduler = Scheduler(BlockManager(BLOCK_SIZE, range(20)), max_num_seqs=64, max_num_batched_tokens=256)
    for i in range(3):
        scheduler.add(sequence(f"s{i}", 200))
    scheduler.schedule()
    assert scheduler.block_manager.num_free_blocks < 13 and scheduler.last_stall == TOKEN_BUDGET


def test_a_queue_behind_full_sequence_slots_waits_for_memory() -> None:
    scheduler = Scheduler(BlockManager(BLOCK_SIZE, range(1000)), max_num_seqs=2, max_num_batched_tokens=4096)
    for i in range(3):
        scheduler.add(sequence(f"s{i}", 20))
    scheduler.schedule()
    assert scheduler.last_stall == SEQ_SLOTS


def test_an_empty_queue_waits_for_nothing() -> None:
    scheduler = Scheduler(BlockManager(BLOCK_SIZE, range(1000)), max_num_seqs=2, max_num_batched_tokens=4096)
    scheduler.add(sequence("s", 20))
    scheduler.schedule()
    assert scheduler.last_stall is None


def run_burst(config: EngineConfig, num: int, prompt_len: int, output_len: int) -> tuple[SimulatedCluster, int]:
    """`num` requests arriving at once, split over two simulated replicas under kunserve;
    returns the cluster and the most blocks a replica's queue needed beyond its free ones."""
    cluster = SimulatedCluster(config, 2, CoordinatorConfig("kunserve", drop_after_s=0.2, restore_after_s=1.0))
    cluster.open_all_links()
    deficits = [0]

    def sample(_: float) -> None:
        deficits.extend(deficit(engine) for engine in cluster.engines)

    cluster.run([0.0] * num, [[0] * prompt_len for _ in range(num)], [request_params(output_len)] * num,
                sample_every_s=0.05, sample=sample)
    return cluster, max(deficits)


def test_a_compute_bound_queue_does_not_drop() -> None:
    # 96 prompts of 1024 tokens behind a 512-token budget: seconds of prefill backlog. The
    # queue's blocks (64 each) exceed the free ones, but its head always finds its blocks.
    config = EngineConfig(model=MODEL, num_kv_blocks=2048, max_num_batched_tokens=512, max_model_len=2048)
    cluster, most_short = run_burst(config, 96, 1024, 8)
    assert most_short > 0  # a trigger on queued demand beyond the free blocks would fire
    stalls = [engine.scheduler.stalls for engine in cluster.engines]
    assert all(s[TOKEN_BUDGET] > 10 * s[KV_BLOCKS] for s in stalls)
    assert not cluster.coordinator.runner.history


def test_a_kv_shortage_drops_and_says_so() -> None:
    config = EngineConfig(model=MODEL, num_kv_blocks=128, max_num_batched_tokens=4096, max_model_len=2048)
    cluster, _ = run_burst(config, 16, 512, 256)  # 16 x 48 blocks at the end: far more than 2 x 128
    drops = [t for t in cluster.coordinator.runner.history if t.kind == "drop"]
    assert drops and drops[0].reason.startswith(f"{KV_BLOCKS}: ") and "waited for KV blocks" in drops[0].reason


def test_a_sequence_slot_shortage_drops_and_the_group_has_the_members_slots() -> None:
    # Replica 0 holds four requests and queues twelve with KV to spare; replica 1 is idle: a
    # pair runs eight at once (their slots add up).
    config = EngineConfig(model=MODEL, num_kv_blocks=4096, max_num_seqs=4, max_model_len=2048)
    cluster = SimulatedCluster(config, 2, CoordinatorConfig("kunserve", drop_after_s=0.2, restore_after_s=1.0))
    cluster.open_all_links()
    for i in range(16):
        cluster.engines[0].add_request(f"r{i}", [0] * 32, request_params(400))
    runner = cluster.coordinator.runner
    for _ in range(40):
        for replica in cluster.replicas:
            if replica.forward_to is None and replica.engine.has_unfinished_requests():
                replica.engine.step()
        cluster.coordinator.check(cluster.clock())
    drops = [t for t in runner.history if t.kind == "drop"]
    assert drops and drops[0].reason.startswith(f"{SEQ_SLOTS}: ") and "sequence slots" in drops[0].reason
    assert runner.groups and runner.groups[0].engine.scheduler.max_num_seqs == 8


def test_the_operator_view_says_what_each_replica_waits_for() -> None:
    config = EngineConfig(model=MODEL, num_kv_blocks=4096, max_num_seqs=2, max_model_len=2048)
    cluster = SimulatedCluster(config, 2, CoordinatorConfig("kunserve"))
    for i in range(3):
        cluster.engines[0].add_request(f"r{i}", [0] * 32, request_params(8))
    cluster.engines[0].step()
    view = describe(cluster.coordinator.runner, "kunserve")
    assert [replica["waiting_for"] for replica in view["replicas"]] == [SEQ_SLOTS, None]


def test_budget_spent_recomputing_preempted_requests_counts_as_memory() -> None:
    scheduler = Scheduler(BlockManager(BLOCK_SIZE, range(20)), max_num_seqs=64, max_num_batched_tokens=256)
    recomputing = sequence("preempted", 200)
    recomputing.token_ids.append(7)  # it had generated a token before its preemption
    scheduler.add(recomputing)
    for i in range(2):
        scheduler.add(sequence(f"s{i}", 200))
    scheduler.schedule()
    assert scheduler.last_stall == KV_BLOCKS
