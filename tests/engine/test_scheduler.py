"""Continuous batching: token budget, sequence cap, FCFS admission, preemption order."""

from __future__ import annotations

from engine_steps import complete_step, make_sequence

from kunserve.engine.block_manager import BlockManager
from kunserve.engine.scheduler import Scheduler
from kunserve.engine.sequence import SequenceStatus
from kunserve.engine.step_builder import build_step_input

BLOCK = 4


def _run_step(scheduler: Scheduler) -> list[tuple[str, int]]:
    """Schedule a step and pretend the model sampled token 7 for every finished prefill."""
    out = scheduler.schedule()
    complete_step(scheduler, out)
    return [(seq.request_id, n) for seq, n in out.scheduled]


def test_a_step_never_exceeds_the_token_budget() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(100)), max_num_seqs=8, max_num_batched_tokens=10)
    for i in range(3):
        scheduler.add(make_sequence(f"r{i}", 7))
    for _ in range(6):
        assert sum(n for _, n in _run_step(scheduler)) <= 10


def test_long_prompts_are_prefilled_in_chunks() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(100)), max_num_seqs=8, max_num_batched_tokens=6)
    scheduler.add(make_sequence("long", 15))
    assert [_run_step(scheduler) for _ in range(3)] == [[("long", 6)], [("long", 6)], [("long", 3)]]


def test_running_sequences_are_served_before_new_ones_are_admitted() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(100)), max_num_seqs=8, max_num_batched_tokens=5)
    scheduler.add(make_sequence("a", 4))
    _run_step(scheduler)
    scheduler.add(make_sequence("b", 8))
    assert _run_step(scheduler) == [("a", 1), ("b", 4)]


def test_admission_is_first_come_first_served() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(100)), max_num_seqs=2, max_num_batched_tokens=100)
    for name in "abc":
        scheduler.add(make_sequence(name, 3))
    assert {name for name, _ in _run_step(scheduler)} == {"a", "b"}


def test_max_num_seqs_caps_the_running_set() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(100)), max_num_seqs=3, max_num_batched_tokens=100)
    for i in range(5):
        scheduler.add(make_sequence(f"r{i}", 2))
    _run_step(scheduler)
    assert len(scheduler.running) == 3 and len(scheduler.waiting) == 2


def test_decodes_come_first_in_a_step() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(100)), max_num_seqs=8, max_num_batched_tokens=100)
    scheduler.add(make_sequence("a", 3))
    _run_step(scheduler)
    scheduler.add(make_sequence("b", 6))
    scheduler.add(make_sequence("c", 1))
    steps = _run_step(scheduler)
    assert [n for _, n in steps] == sorted((n for _, n in steps), key=lambda n: n > 1)
    assert steps[0] == ("a", 1)


def test_the_youngest_running_sequence_is_preempted_when_blocks_run_out() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(2)), max_num_seqs=8, max_num_batched_tokens=100)
    old, young = make_sequence("old", 4), make_sequence("young", 4)
    scheduler.add(old)
    scheduler.add(young)
    _run_step(scheduler)  # both prefilled: both blocks in use, each now needs a second block
    out = scheduler.schedule()
    assert out.preempted == [young]
    assert young.status is SequenceStatus.WAITING and young.num_computed_tokens == 0
    assert scheduler.waiting[0] is young
    assert [seq for seq, _ in out.scheduled] == [old]


def test_a_preempted_sequence_recomputes_its_generated_tokens_too() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(2)), max_num_seqs=8, max_num_batched_tokens=100)
    old, young = make_sequence("old", 4), make_sequence("young", 4)
    scheduler.add(old)
    scheduler.add(young)
    _run_step(scheduler)
    _run_step(scheduler)  # young preempted with one generated token
    scheduler.finish(old, "stop")
    assert _run_step(scheduler) == [("young", 5)]


def test_nothing_is_admitted_in_a_step_that_preempted() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(2)), max_num_seqs=8, max_num_batched_tokens=100)
    scheduler.add(make_sequence("a", 4))
    scheduler.add(make_sequence("b", 4))
    _run_step(scheduler)
    scheduler.add(make_sequence("c", 1))
    out = scheduler.schedule()
    assert out.preempted and "c" not in {seq.request_id for seq, _ in out.scheduled}


def test_a_prompts_next_chunk_is_scheduled_while_the_previous_one_is_in_flight() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(100)), max_num_seqs=8, max_num_batched_tokens=6)
    scheduler.add(make_sequence("long", 15))
    steps = []
    for _ in range(3):
        out = scheduler.schedule()
        steps.append(build_step_input(out.scheduled, BLOCK, []).positions.tolist())
        scheduler.launch(out)
    assert steps == [list(range(6)), list(range(6, 12)), list(range(12, 15))]


def test_a_sequence_waiting_for_its_token_is_not_scheduled_again() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(100)), max_num_seqs=8, max_num_batched_tokens=100)
    seq = make_sequence("a", 5)
    scheduler.add(seq)
    first = scheduler.schedule()
    scheduler.launch(first)
    assert scheduler.schedule().is_empty
    scheduler.update(first, [7])
    assert len(seq) == 6 and seq.num_computed_tokens == 5 and not seq.in_flight
