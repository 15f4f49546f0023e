"""Many decode steps of a simulated replica at once, with exactly the effects that running
them one by one through the engine would have.

Between two events that look at the cluster (an arrival, a coordinator check), a replica
whose requests all decode, with none waiting, runs the same kind of step again and again:
every running sequence gets one token, no request is admitted, preempted or finished, and
blocks are taken as sequences cross block boundaries. Those steps are applied here in one
go: the same block allocations in the same order, the same tokens, the same step times
(the executor's formula, summed in the same order, so the clock reads the same), the last
token's time. Whatever else happens (a prefill, a finish, a preemption) runs through the
engine's own step. This is what makes an hour of a trace on many GPUs take minutes.
"""

from __future__ import annotations

import numpy as np

from kunserve.engine.cost_model import StepShape
from kunserve.engine.llm_engine import LLMEngine
from kunserve.engine.sequence import Sequence
from kunserve.sim.executor import SIMULATED_TOKEN, SimulatedExecutor, overlapped_host_time

MIN_STEPS = 2  # fewer are not worth the bookkeeping: the engine's own step runs them


def decode_ahead(engine: LLMEngine, until: float) -> int:
    """Apply the replica's next steps while they are steady decodes that start before
    `until`; returns how many (0: the next step must run through the engine)."""
    executor = engine.executor
    scheduler = engine.scheduler
    running = scheduler.running
    if (not isinstance(executor, SimulatedExecutor) or executor.num_stages != 1 or engine.num_in_flight
            or scheduler.waiting or scheduler.swapped or not running
            or len(running) > min(scheduler.max_num_seqs, scheduler.max_num_batched_tokens)):
        return 0
    if not all(seq.num_computed_tokens == len(seq) - 1 and engine.output_processor.stops_on_length_only(seq)
               for seq in running):
        return 0
    most = min(seq.max_total_tokens - len(seq) for seq in running) - 1  # the step after finishes one
    if most < MIN_STEPS:
        return 0
    needs = _block_needs(running, most, engine.config.block_size)
    # A replica scheduling ahead does so while its free blocks cover every running sequence's
    # next block (Scheduler.can_schedule_ahead: for decodes, one each and their chunk's share).
    ahead_reserve = None
    if executor.overlaps_host:
        ahead_reserve = len(running) + -(-min(len(running), scheduler.max_num_batched_tokens) // engine.config.block_size)
    steps, end, compute_s, last_s = _steps_that_fit(executor, running, most, needs, engine.block_manager.num_free_blocks,
                                                    until, ahead_reserve)
    if steps < MIN_STEPS:
        return 0
    _take_blocks(engine, running, needs, steps)
    for seq in running:
        seq.token_ids.extend([SIMULATED_TOKEN] * steps)
        seq.num_computed_tokens += steps
        seq.metrics.last_token_time = end
    executor.record_steps(end, compute_s, last_s)
    executor.clock.advance_to(end)
    return steps


def schedules_ahead(engine: LLMEngine) -> bool:
    """Whether `engine`'s next step would be scheduled while the one before runs, on a GPU:
    a replica or pipeline whose swaps allow it (LLMEngine.swaps_allow_ahead; every GPU
    executor runs ahead: a pipeline's first stage takes the last stage's sampled tokens),
    with asynchronous scheduling on, and free blocks for every running sequence
    (kunserve/engine/scheduler.py)."""
    config = engine.config
    return (engine.swaps_allow_ahead() and config.resolve_async_scheduling(config.resolve_device())
            and engine.scheduler.can_schedule_ahead())


def _block_needs(running: list[Sequence], steps: int, block_size: int) -> np.ndarray:
    """[steps + 1, len(running)] booleans: sequence i takes a block in step j (1-based): the
    step computing position c_i + j - 1 crosses past its blocks."""
    needs = np.zeros((steps + 1, len(running)), dtype=bool)
    for i, seq in enumerate(running):
        first = len(seq.block_ids) * block_size - seq.num_computed_tokens + 1
        needs[max(first, 1) : steps + 1 : block_size, i] = True
    return needs


def _steps_that_fit(
    executor: SimulatedExecutor, running: list[Sequence], most: int, needs: np.ndarray, free_blocks: int,
    until: float, ahead_reserve: int | None,
) -> tuple[int, float, float, float]:
    """How many of the next `most` steps start before `until` with blocks to spare; the end
    time of the last, the compute seconds of all and of the last. A step overlaps its host
    time with the one before while `ahead_reserve` blocks are free before it (None: never)."""
    n = len(running)
    context = sum(seq.num_computed_tokens for seq in running)
    longest = max(seq.num_computed_tokens for seq in running)
    layers = executor.model_layers
    t = executor.clock()
    last_step = executor.last_step
    compute_total = 0.0
    taken = 0
    steps = 0
    for j in range(1, most + 1):
        overlaps = ahead_reserve is not None and free_blocks - taken >= ahead_reserve
        taken += int(needs[j].sum())
        if t >= until or taken > free_blocks:
            break
        # As SimulatedExecutor.submit then collect move the clock: host time, then compute.
        t += overlapped_host_time(executor.settings, n, n, t, last_step, overlaps)
        compute = executor.cost.step_time(StepShape(n, context + n * (j - 1), 0, n, longest + j - 1), layers)
        t = max(t, last_step[0] if steps else executor.stage_free_at()) + compute
        last_step = (t, compute)
        compute_total += compute
        steps = j
    return steps, t, compute_total, last_step[1]


def _take_blocks(engine: LLMEngine, running: list[Sequence], needs: np.ndarray, steps: int) -> None:
    """The allocations of those steps, in the order the scheduler makes them: step by step,
    in running order."""
    for j, i in zip(*np.nonzero(needs[1 : steps + 1]), strict=True):
        seq = running[int(i)]
        if not engine.block_manager.allocate(seq, seq.num_computed_tokens + int(j) + 1):
            raise RuntimeError("fast-forward: a block counted as free was not")
