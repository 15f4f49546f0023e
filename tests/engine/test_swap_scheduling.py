"""Preemption by swapping (InferCept-like): the youngest running sequence's KV goes to host
blocks and comes back when device blocks free up, before anything new is admitted; its
computed tokens are kept (nothing recomputed); without host room it falls back to recompute."""

from __future__ import annotations

from engine_steps import complete_step, make_sequence

from kunserve.engine.block_manager import BlockManager
from kunserve.engine.scheduler import Scheduler, SchedulerOutput
from kunserve.engine.sequence import Sequence, SequenceStatus
from kunserve.engine.step_builder import build_step_input

BLOCK = 4


def _two_full_sequences(host_blocks: int) -> tuple[Scheduler, Sequence, Sequence]:
    """Two 4-token prompts prefilled into a 2-block pool: each now needs a second block."""
    scheduler = Scheduler(BlockManager(BLOCK, range(2)), max_num_seqs=8, max_num_batched_tokens=100,
                          swap_pool=BlockManager(BLOCK, range(host_blocks)))
    old, young = make_sequence("old", 4), make_sequence("young", 4)
    scheduler.add(old)
    scheduler.add(young)
    complete_step(scheduler, scheduler.schedule())
    return scheduler, old, young


def test_the_youngest_is_swapped_out_with_its_computed_tokens_kept() -> None:
    scheduler, old, young = _two_full_sequences(host_blocks=4)
    young_blocks = list(young.block_ids)
    out = scheduler.schedule()
    assert out.preempted == [young] and young.status is SequenceStatus.SWAPPED
    assert young.num_computed_tokens == 4 and young.block_ids == []
    assert out.swap_out == list(zip(young_blocks, young.host_block_ids))
    assert [seq for seq, _ in out.scheduled] == [old]


def test_a_requests_metrics_count_its_swap_outs_among_its_preemptions() -> None:
    scheduler, _, young = _two_full_sequences(host_blocks=4)
    scheduler.schedule()
    assert (young.metrics.num_preemptions, young.metrics.num_swap_outs) == (1, 1)


def test_a_recomputed_preemption_is_no_swap_out() -> None:
    scheduler, _, young = _two_full_sequences(host_blocks=0)
    scheduler.schedule()
    assert (young.metrics.num_preemptions, young.metrics.num_swap_outs) == (1, 0)


def test_a_swapped_sequence_comes_back_with_its_kv_copied_in() -> None:
    scheduler, old, young = _two_full_sequences(host_blocks=4)
    complete_step(scheduler, scheduler.schedule())
    host = list(young.host_block_ids)
    scheduler.finish(old, "stop")
    out = scheduler.schedule()
    assert [(seq.request_id, n) for seq, n in out.scheduled] == [("young", 1)]  # its next token only
    assert out.swap_in == list(zip(host, young.block_ids))
    assert young.status is SequenceStatus.RUNNING and scheduler.swap_pool.num_free_blocks == 4


def test_swapped_sequences_come_back_before_new_ones_are_admitted() -> None:
    scheduler, old, _ = _two_full_sequences(host_blocks=4)
    complete_step(scheduler, scheduler.schedule())
    scheduler.finish(old, "stop")
    scheduler.add(make_sequence("new", 2))
    out = scheduler.schedule()
    assert [seq.request_id for seq, _ in out.scheduled] == ["young"]


def test_without_room_in_host_memory_preemption_recomputes() -> None:
    scheduler, _, young = _two_full_sequences(host_blocks=0)
    out = scheduler.schedule()
    assert young.status is SequenceStatus.WAITING and young.num_computed_tokens == 0 and not out.swap_out


def test_an_aborted_swapped_sequence_gives_its_host_blocks_back() -> None:
    scheduler, _, young = _two_full_sequences(host_blocks=4)
    complete_step(scheduler, scheduler.schedule())
    scheduler.finish(young, "abort")
    assert scheduler.swap_pool.num_free_blocks == 4 and not scheduler.swapped and scheduler.num_waiting_blocks == 0


def test_a_step_of_swaps_alone_is_still_sent() -> None:
    step = build_step_input([], BLOCK, [], swap_out=[(1, 0)])
    assert not SchedulerOutput([], swap_out=[(1, 0)]).is_empty
    assert step.num_tokens == 0 and step.swap_out.tolist() == [[1, 0]]


def test_swapped_sequences_are_handed_over_first_in_line_to_be_recomputed() -> None:
    scheduler, old, young = _two_full_sequences(host_blocks=4)
    complete_step(scheduler, scheduler.schedule())
    scheduler.add(make_sequence("new", 2))
    running, waiting = scheduler.release_all()
    assert running == [old] and [seq.request_id for seq in waiting] == ["young", "new"]
    assert young.status is SequenceStatus.WAITING and young.num_computed_tokens == 0 and young.host_block_ids == []
    assert scheduler.swap_pool.num_free_blocks == 4 and not scheduler.swapped and not scheduler.has_unfinished
