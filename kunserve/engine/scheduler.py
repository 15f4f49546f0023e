"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running sequences first, in admission order (one token for a decode, the next
chunk for an unfinished prefill), then waiting sequences in FCFS order while the budget,
`max_num_seqs` and free blocks allow. When a running sequence cannot get a block, the most
recently admitted running sequence is preempted (its blocks freed, recomputed later). The
oldest running sequence is therefore never preempted by a younger one and, since no
admitted sequence needs more blocks than the pool holds, always makes progress: no livelock.

With a pipeline, several steps (micro-batches) are in flight at once: a sequence waiting for
its sampled token is neither scheduled again nor preempted until its step comes back; a
prompt's next chunk may go into the next micro-batch while the previous chunk is still in
flight (every stage runs micro-batches in order, so the chunk finds the KV it attends to),
which lets g micro-batches share one long prefill. Each micro-batch
takes at most `max_seqs` sequences so that the others get work too, or, with lookahead batch
formulation, as much work as its time budget allows (kunserve/engine/lookahead.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kunserve.engine.block_manager import BlockAccounting
from kunserve.engine.cost_model import StepShape
from kunserve.engine.lookahead import LookaheadBudget
from kunserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]]  # (sequence, tokens to compute); decodes first
    preempted: list[Sequence] = field(default_factory=list)
    shape: StepShape | None = None  # as a lookahead budget formed it (the cost model's view)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockAccounting, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Blocks the waiting sequences need to run their known tokens: a replica's queued
        # KV demand, kept as a running sum so other threads can read it at any time.
        self.num_waiting_blocks = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def release_all(self) -> tuple[list[Sequence], list[Sequence]]:
        """Empty the scheduler: (running, waiting), sequences untouched."""
        running, waiting = self.running, list(self.waiting)
        self.running, self.waiting, self.num_waiting_blocks = [], deque(), 0
        return running, waiting

    def adopt(self, running: list[Sequence], waiting: list[Sequence]) -> None:
        """Take sequences over from another scheduler, as they are (blocks included)."""
        self.running.extend(running)
        for seq in waiting:
            self.add(seq)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.num_waiting_blocks += self.block_manager.blocks_for(len(seq))

    def schedule(self, max_seqs: int | None = None, time_budget: LookaheadBudget | None = None) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        seq_limit = self.max_num_seqs if max_seqs is None else max_seqs
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0 and len(scheduled) < seq_limit:
            seq = self.running[i]
            if seq.awaits_token:
                i += 1
                continue
            n = min(len(seq.token_ids) - seq.num_scheduled_tokens, budget)
            if time_budget is not None:
                n = time_budget.grant(seq, n)
                if n == 0:
                    i += 1
                    continue
            # A pipelined chunk waits for blocks rather than preempting.
            if seq.in_flight and not self.block_manager.allocate(seq, seq.num_scheduled_tokens + n):
                i += 1
                continue
            while not self.block_manager.allocate(seq, seq.num_scheduled_tokens + n):
                victim = next(s for s in reversed(self.running) if not s.in_flight)  # seq at the latest
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it preempted itself: every sequence after it is gone or in flight
            scheduled.append((seq, n))
            budget -= n
            if time_budget is not None:
                time_budget.commit(seq, n)
            i += 1

        # Admit nothing in a step that had to preempt: the freed blocks go to the survivors.
        while (
            self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and len(scheduled) < seq_limit
            and not preempted
        ):
            seq = self.waiting[0]
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if time_budget is not None:
                n = time_budget.grant(seq, n)
            if n == 0 or not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                break
            self.waiting.popleft()
            self.num_waiting_blocks -= self.block_manager.blocks_for(len(seq))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
            if time_budget is not None:
                time_budget.commit(seq, n)

        scheduled.sort(key=lambda item: item[1] > 1)  # stable: decodes first, for the kernels
        return SchedulerOutput(scheduled, preempted, None if time_budget is None else time_budget.shape)

    def launch(self, output: SchedulerOutput) -> None:
        """Mark the step's tokens in flight (after its input is built: see build_step_input)."""
        for seq, n in output.scheduled:
            seq.num_in_flight_tokens += n

    def update(self, output: SchedulerOutput, sampled: list[int]) -> list[Sequence]:
        """Advance the scheduled sequences; append the sampled tokens (one per sequence that
        reached its end this step, in step order). Returns those sequences. A sequence that
        finished (was aborted) while its step was in flight is skipped, its token dropped."""
        advanced: list[Sequence] = []
        tokens = iter(sampled)
        for seq, n in output.scheduled:
            seq.num_in_flight_tokens -= n
            reached_end = seq.num_computed_tokens + n == len(seq.token_ids)
            if seq.is_finished:
                if reached_end:
                    next(tokens)
                continue
            seq.num_computed_tokens += n
            if reached_end:
                seq.token_ids.append(next(tokens))
                advanced.append(seq)
        return advanced

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self.num_waiting_blocks -= self.block_manager.blocks_for(len(seq))
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_waiting_blocks += self.block_manager.blocks_for(len(seq))
        self.num_preemptions += 1
