"""Lookahead batch formulation: a pipeline's micro-batches balanced by predicted time.

Specified with a predictor of one time unit per step plus one per token: a micro-batch
takes a candidate's tokens whole while they fit its target, cuts a prefill to the largest
chunk that fits (never below the minimum chunk), lets a decode that does not fit wait, and
never stays empty; formed from a mixed queue, the micro-batches of a cycle come out
balanced where a split by sequence count leaves one carrying all the prefill, and one long
prompt is shared by them."""

from __future__ import annotations

from kunserve.engine.block_manager import BlockManager
from kunserve.engine.cost_model import StepShape
from kunserve.engine.lookahead import LookaheadBudget, cycle_target_s
from kunserve.engine.scheduler import Scheduler, SchedulerOutput
from kunserve.engine.sequence import Sequence, SequenceStatus
from kunserve.sampling_params import SamplingParams

MIN_CHUNK = 8
DEPTH = 2
TOKEN_BUDGET = 256


def predict(shape: StepShape) -> float:
    return 1.0 + shape.num_tokens


def prompt(name: str, length: int) -> Sequence:
    return Sequence(name, list(range(length)), SamplingParams(max_tokens=8), max_total_tokens=length + 8)


def decoding(name: str, context: int) -> Sequence:
    seq = prompt(name, context)
    seq.num_computed_tokens = context - 1
    seq.status = SequenceStatus.RUNNING
    return seq


def budget_with(target_tokens: float, committed_tokens: int = 0) -> LookaheadBudget:
    budget = LookaheadBudget(predict, 1.0 + target_tokens, MIN_CHUNK)
    if committed_tokens:
        budget.commit(prompt("earlier", committed_tokens), committed_tokens)
    return budget


def test_a_chunk_that_fits_is_granted_whole() -> None:
    assert budget_with(100, committed_tokens=10).grant(prompt("p", 90), 90) == 90


def test_a_prefill_is_cut_to_the_largest_chunk_that_fits() -> None:
    assert budget_with(50, committed_tokens=10).grant(prompt("p", 100), 100) == 40


def test_a_chunk_below_the_minimum_is_not_cut() -> None:
    assert budget_with(14, committed_tokens=10).grant(prompt("p", 100), 100) == 0


def test_a_decode_that_would_overshoot_more_than_it_fills_waits() -> None:
    assert budget_with(10.4, committed_tokens=10).grant(decoding("d", 30), 1) == 0


def test_a_decode_that_overshoots_less_than_it_fills_goes_in() -> None:
    assert budget_with(10.6, committed_tokens=10).grant(decoding("d", 30), 1) == 1


def test_an_empty_micro_batch_always_gets_work() -> None:
    assert budget_with(0).grant(prompt("p", 100), 100) == MIN_CHUNK
    assert budget_with(0).grant(decoding("d", 30), 1) == 1


def test_the_cycle_target_is_the_prediction_for_one_micro_batchs_share() -> None:
    running = [decoding(f"d{i}", 20) for i in range(8)]
    waiting = [prompt(f"p{i}", 100) for i in range(4)]
    assert cycle_target_s(predict, [], running, waiting, DEPTH, TOKEN_BUDGET) == 1.0 + (8 + 400) / DEPTH


def test_the_cycle_counts_the_micro_batches_in_flight() -> None:
    waiting = [prompt("p", 100)]
    assert cycle_target_s(predict, [StepShape(num_tokens=60)], [], waiting, DEPTH, TOKEN_BUDGET) == 1.0 + 80


def test_the_cycle_looks_ahead_no_further_than_its_micro_batches_can_take() -> None:
    waiting = [prompt(f"p{i}", 400) for i in range(4)]
    assert cycle_target_s(predict, [], [], waiting, DEPTH, TOKEN_BUDGET) == 1.0 + TOKEN_BUDGET


def form_cycle(scheduler: Scheduler, lookahead: bool) -> list[int]:
    """The tokens of the DEPTH micro-batches of one pipeline cycle, formed one after another
    (each is in flight when the next is formed)."""
    in_flight: list[SchedulerOutput] = []
    for _ in range(DEPTH):
        if lookahead:
            shapes = [step.shape for step in in_flight if step.shape is not None]
            target = cycle_target_s(predict, shapes, scheduler.running, scheduler.waiting, DEPTH, TOKEN_BUDGET)
            output = scheduler.schedule(None, LookaheadBudget(predict, target, MIN_CHUNK))
        else:
            output = scheduler.schedule(-(-(len(scheduler.running) + len(scheduler.waiting)) // DEPTH))
        scheduler.launch(output)
        in_flight.append(output)
    return [sum(n for _, n in step.scheduled) for step in in_flight]


def micro_batch_tokens(lookahead: bool) -> list[int]:
    """A mixed queue: eight decodes running, four 100-token prompts waiting."""
    scheduler = Scheduler(BlockManager(4, range(400)), max_num_seqs=64, max_num_batched_tokens=TOKEN_BUDGET)
    for i in range(8):
        scheduler.add(prompt(f"d{i}", 20))
    first = scheduler.schedule()
    scheduler.launch(first)
    scheduler.update(first, [7] * 8)  # the eight prompts are now decoding
    for i in range(4):
        scheduler.add(prompt(f"p{i}", 100))
    return form_cycle(scheduler, lookahead)


def test_one_long_prompt_is_shared_by_the_micro_batches_of_a_cycle() -> None:
    scheduler = Scheduler(BlockManager(4, range(400)), max_num_seqs=64, max_num_batched_tokens=TOKEN_BUDGET)
    scheduler.add(prompt("lone", 400))
    assert form_cycle(scheduler, lookahead=True) == [200, 200]


def test_lookahead_balances_the_micro_batches_of_a_mixed_queue() -> None:
    balanced = micro_batch_tokens(lookahead=True)
    assert min(balanced) >= 0.45 * (8 + 400)  # each takes about half the cycle's work
    assert max(balanced) <= 1.05 * min(balanced)


def test_a_split_by_count_leaves_the_micro_batches_unbalanced() -> None:
    by_count = micro_batch_tokens(lookahead=False)
    assert max(by_count) > 10 * min(by_count)
