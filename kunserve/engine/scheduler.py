"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running sequences first, in admission order (one token for a decode, the next
chunk for an unfinished prefill), then waiting sequences in FCFS order while the budget,
`max_num_seqs` and free blocks allow. When a running sequence cannot get a block, the most
recently admitted running sequence is preempted: its blocks are freed and its tokens
recomputed later (vLLM's default), or, given a host swap pool, its KV is copied to host
memory and back when blocks free up (InferCept-like swapping; the copies ride on the step,
see kunserve/worker/swap.py), or, given a `SwapOrRecompute` too (preemption_mode "auto"), by
whichever of the two costs less time (kunserve/engine/preemption.py). Swapped sequences come
back before new ones are admitted. The
oldest running sequence is therefore never preempted by a younger one and, since no
admitted sequence needs more blocks than the pool holds, always makes progress: no livelock.

With a pipeline, several steps (micro-batches) are in flight at once: a sequence waiting for
its sampled token is neither scheduled again nor preempted until its step comes back; a
prompt's next chunk may go into the next micro-batch while the previous chunk is still in
flight (every stage runs micro-batches in order, so the chunk finds the KV it attends to),
which lets g micro-batches share one long prefill. Each micro-batch
takes at most `max_seqs` sequences so that the others get work too, or, with lookahead batch
formulation, as much work as its time budget allows (kunserve/engine/lookahead.py).

Scheduling ahead (asynchronous scheduling): the next step is scheduled while the previous
one still runs, so that the host's work overlaps the device's. A sequence whose sampled
token is still in flight decodes that token in the step ahead, its input id taken on the
device from the previous step's output. A pipeline schedules micro-batch k+g while its
oldest, k, is still in flight: only k's sequences decode ahead (their tokens come back from
the last stage to the first on the devices), the others still wait for theirs. A step ahead preempts nothing: it is formed
only while every running sequence surely finds its blocks, so under memory pressure
scheduling falls back to one step at a time with the preemption order above.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from kunserve.engine.block_manager import BlockAccounting, BlockManager
from kunserve.engine.cost_model import StepShape
from kunserve.engine.lookahead import LookaheadBudget
from kunserve.engine.preemption import HostLinkLoad, SwapOrRecompute
from kunserve.engine.sequence import Sequence, SequenceStatus

# Why queued requests stayed queued in a step (`Scheduler.stalls` counts steps by it): no
# room left in the step's token budget (or its micro-batch share) for the queue's head; else
# no free sequence slot (`max_num_seqs`) or no free KV blocks for it (or a preemption:
# running requests outgrew them). The last two are memory, which a drop relieves; the first
# is compute, which it does not (more memory would admit more work into full steps).
KV_BLOCKS = "kv_blocks"
SEQ_SLOTS = "seq_slots"
TOKEN_BUDGET = "token_budget"
MEMORY_WAITS = frozenset({KV_BLOCKS, SEQ_SLOTS})


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]]  # (sequence, tokens to compute); decodes first
    preempted: list[Sequence] = field(default_factory=list)
    shape: StepShape | None = None  # as a lookahead budget formed it (the cost model's view)
    # KV copies the step carries out before computing: (device block, host block) pairs.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """Nothing to send: no tokens and no KV to copy (a swap-out must reach the device
        before its blocks are reused)."""
        return not self.scheduled and not self.swap_out


class Scheduler:
    def __init__(
        self,
        block_manager: BlockAccounting,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        swap_pool: BlockManager | None = None,
        swap_or_recompute: SwapOrRecompute | None = None,
    ) -> None:
        """`swap_pool`: host blocks for preempted sequences' KV; None preempts by recompute.
        `swap_or_recompute`: with a pool, chooses per victim (None: swap whenever it has room)."""
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.swap_pool = swap_pool
        self.swap_or_recompute = swap_or_recompute
        # Blocks the steps in flight copy out to and in from host memory (the host link's load).
        self.num_swap_out_in_flight = 0
        self.num_swap_in_in_flight = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()  # preempted with their KV in host memory, oldest first
        # Running, but not to be scheduled until their KV has arrived (a drop's exchange running
        # between the group's steps: kunserve/cluster/exchange.py); their blocks are bound.
        self.parked: set[Sequence] = set()
        self.num_preemptions = 0
        self.num_swap_outs = 0  # preemptions that kept their KV in host memory
        self.num_steps_ahead = 0  # steps scheduled while the previous one was in flight
        # Blocks the waiting and swapped sequences need to run their known tokens: a
        # replica's queued KV demand, kept as a running sum so other threads can read it.
        self.num_waiting_blocks = 0
        # Steps that left requests queued, by why (KV_BLOCKS, SEQ_SLOTS, TOKEN_BUDGET), and the
        # last step's reason (None: nothing was left queued): read by the overload policy.
        self.stalls = {KV_BLOCKS: 0, SEQ_SLOTS: 0, TOKEN_BUDGET: 0}
        self.last_stall: str | None = None

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self.parked)

    @property
    def swaps_pending(self) -> bool:
        """Whether a request is swapped out or a step in flight copies KV to or from host memory."""
        return bool(self.swapped or self.num_swap_out_in_flight or self.num_swap_in_in_flight)

    def park(self, seqs: list[Sequence]) -> None:
        """Take running `seqs` out of scheduling until `unpark` (their KV is on its way)."""
        for seq in seqs:
            self.running.remove(seq)
            self.parked.add(seq)

    def unpark(self, seq: Sequence) -> bool:
        """`seq`'s KV has arrived: it runs again, in its place by age. False when it finished
        (was aborted) while parked: its blocks, kept until now, are freed instead."""
        if seq.is_finished:
            self.block_manager.free(seq)
            return False
        self.parked.remove(seq)
        self.insert_running(seq)
        return True

    def release_all(self) -> tuple[list[Sequence], list[Sequence]]:
        """Empty the scheduler: (running, waiting), running sequences untouched. Swapped-out
        sequences lead the waiting ones, to be recomputed: their KV is in this device's host
        memory, which the next scheduler (a group, or its members) addresses otherwise.
        Refused while sequences wait for their KV (an overlapped exchange: finish it first)."""
        if self.parked:
            raise RuntimeError(f"{len(self.parked)} sequences wait for their KV; finish the exchange first")
        swapped = [self._recompute_swapped(seq) for seq in self.swapped]
        running, waiting = self.running, swapped + list(self.waiting)
        self.swapped = deque()
        self.running, self.waiting, self.num_waiting_blocks = [], deque(), 0
        self.last_stall = None  # nothing waits here any more
        return running, waiting

    def take_unstarted(self) -> list[Sequence]:
        """Take out the waiting sequences that were never scheduled (no KV, no token yet), in
        queue order, for another scheduler to run."""
        unstarted = [seq for seq in self.waiting if seq.metrics.first_scheduled_time is None]
        self.waiting = deque(seq for seq in self.waiting if seq.metrics.first_scheduled_time is not None)
        self.num_waiting_blocks -= sum(self.block_manager.blocks_for(len(seq)) for seq in unstarted)
        return unstarted

    def adopt(self, running: list[Sequence], waiting: list[Sequence]) -> None:
        """Take sequences over from another scheduler, as they are (blocks included)."""
        self.running.extend(running)
        for seq in waiting:
            self.add(seq)

    def detach(self, seq: Sequence) -> None:
        """Take running `seq` out (it moves to another scheduler), its blocks freed here."""
        if seq.in_flight:
            raise RuntimeError(f"{seq.request_id}: a sequence in flight cannot leave")
        self.running.remove(seq)
        self.block_manager.free(seq)

    def insert_running(self, seq: Sequence) -> None:
        """Run `seq` (its blocks already here) in its place by age, so preemption still
        takes the youngest first."""
        bisect.insort(self.running, seq, key=lambda s: s.age_key)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.num_waiting_blocks += self.block_manager.blocks_for(len(seq))

    def schedule(
        self, max_seqs: int | None = None, time_budget: LookaheadBudget | None = None, ahead: bool = False,
        ahead_of: SchedulerOutput | None = None,
    ) -> SchedulerOutput:
        """The next step. `ahead`: the previous step is still in flight on the same device
        (asynchronous scheduling); the step is empty unless every running sequence can get
        its blocks without preempting. `ahead_of`: the step in flight whose sampled sequences
        may decode ahead (a pipeline's oldest micro-batch); None: any in flight."""
        self.block_manager.settle()  # the step before was submitted (with its swap-outs' block ids)
        budget = self.max_num_batched_tokens
        seq_limit = self.max_num_seqs if max_seqs is None else max_seqs
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        output = SchedulerOutput(scheduled, preempted)
        if ahead and not self._has_ahead_reserve(budget):
            return output

        sampled_by = None if ahead_of is None else _sampled_sequences(ahead_of)
        i = 0
        while i < len(self.running) and budget > 0 and len(scheduled) < seq_limit:
            seq = self.running[i]
            # (Whether the step in flight samples it is asked first: in a pipeline most are not.)
            if seq.awaits_token and not (ahead and (sampled_by is None or seq in sampled_by) and seq.can_run_ahead):
                i += 1
                continue
            # A decode ahead of its token in flight computes that one token.
            n = max(1, min(len(seq.token_ids) - seq.num_scheduled_tokens, budget))
            if time_budget is not None:
                n = time_budget.grant(seq, n)
                if n == 0:
                    i += 1
                    continue
            # A pipelined chunk, or a step ahead, waits for blocks rather than preempting.
            if (seq.in_flight or ahead) and not self.block_manager.allocate(seq, seq.num_scheduled_tokens + n):
                i += 1
                continue
            while not self.block_manager.allocate(seq, seq.num_scheduled_tokens + n):
                victim = next(s for s in reversed(self.running) if not s.in_flight)  # seq at the latest
                self._preempt(victim, output)
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

        # Bring nothing back and admit nothing in a step that had to preempt: the freed
        # blocks go to the survivors. Swapped sequences come back before new ones enter.
        while (
            self.swapped and budget > 0 and len(self.running) < self.max_num_seqs and len(scheduled) < seq_limit
            and not preempted
        ):
            seq = self.swapped[0]
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if time_budget is not None:
                n = time_budget.grant(seq, n)
            if n == 0 or not self._swap_in(seq, n, output):
                break
            scheduled.append((seq, n))
            budget -= n
            if time_budget is not None:
                time_budget.commit(seq, n)

        while (
            self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and len(scheduled) < seq_limit
            and not preempted and not self.swapped
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
        self.num_steps_ahead += ahead and bool(scheduled)
        output.shape = None if time_budget is None else time_budget.shape
        # Budget spent recomputing preempted requests' KV (prompt chunks of requests that have
        # output already) is memory's doing, not compute's.
        recomputing = sum(n for seq, n in scheduled if n > 1 and seq.num_output_tokens)
        decodes = sum(n == 1 for _, n in scheduled)
        self._record_stall(bool(preempted), budget + recomputing, self.max_num_batched_tokens - decodes)
        return output

    def _record_stall(self, preempted: bool, budget_left: int, prefill_budget: int) -> None:
        """Count the step by why requests stayed queued (nothing when none did): KV_BLOCKS when
        it preempted, else, when the budget it left (or spent recomputing preempted requests)
        would have taken the queue's head (its known tokens, up to what a step leaves for
        prompts beside its decodes: `prefill_budget`), what the head lacked: a sequence slot,
        or blocks.
        A head the budget could not take waits for compute (TOKEN_BUDGET), whatever else it
        lacks: freeing memory would admit it no sooner."""
        if not (self.waiting or self.swapped):
            self.last_stall = None
            return
        head = self.swapped[0] if self.swapped else self.waiting[0]
        need = min(len(head) - head.num_computed_tokens, prefill_budget)
        if preempted:
            reason = KV_BLOCKS
        elif budget_left < need:
            reason = TOKEN_BUDGET
        elif len(self.running) >= self.max_num_seqs:
            reason = SEQ_SLOTS
        elif self.block_manager.num_missing_blocks(head, len(head)) > self.block_manager.num_free_blocks:
            reason = KV_BLOCKS
        else:  # it fitted, but the step was a micro-batch's share of the work: compute
            reason = TOKEN_BUDGET
        self.last_stall = reason
        self.stalls[reason] += 1

    def can_schedule_ahead(self) -> bool:
        """Whether the next step, if scheduled ahead, would find blocks for every running
        sequence (else scheduling falls back to one step at a time)."""
        return self._has_ahead_reserve(self.max_num_batched_tokens)

    def _has_ahead_reserve(self, budget: int) -> bool:
        """Whether the free blocks surely cover a step's running sequences: each may start one
        new block, and their prompt chunks fill at most (the budget or what is left of their
        prompts) / block_size more. What is left of the prompts is summed (a pass over the
        running sequences) only when blocks for a whole budget's chunks are not free."""
        free, block_size = self.block_manager.num_free_blocks, self.block_manager.block_size
        if free >= len(self.running) + -(-budget // block_size):
            return True
        chunks = sum(len(s.token_ids) - s.num_scheduled_tokens for s in self.running if not s.awaits_token)
        return free >= len(self.running) + -(-min(chunks, budget) // block_size)

    def launch(self, output: SchedulerOutput) -> None:
        """Mark the step's tokens in flight (after its input is built: see build_step_input)."""
        for seq, n in output.scheduled:
            seq.num_in_flight_tokens += n
        self.num_swap_out_in_flight += len(output.swap_out)
        self.num_swap_in_in_flight += len(output.swap_in)

    def update(self, output: SchedulerOutput, sampled: list[int]) -> list[Sequence]:
        """Advance the scheduled sequences; append the sampled tokens (one per sequence that
        reached its end this step, in step order). Returns those sequences. A sequence that
        finished (was aborted) while its step was in flight is skipped, its token dropped."""
        advanced: list[Sequence] = []
        tokens = iter(sampled)
        self.num_swap_out_in_flight -= len(output.swap_out)
        self.num_swap_in_in_flight -= len(output.swap_in)
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
        if seq in self.parked:  # its KV is still being written: its blocks go at `unpark`
            self.parked.remove(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = reason
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self.num_waiting_blocks -= self.block_manager.blocks_for(len(seq))
        elif seq.status is SequenceStatus.SWAPPED:
            assert self.swap_pool is not None
            self.swapped.remove(seq)
            self.num_waiting_blocks -= self.block_manager.blocks_for(len(seq))
            self.swap_pool.give(seq.host_block_ids)
            seq.host_block_ids = []
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence, output: SchedulerOutput) -> None:
        """Swap `seq` out when the host pool has room for its blocks (and, choosing, swapping
        costs less than recomputing), else recompute it later."""
        self.running.remove(seq)
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.num_waiting_blocks += self.block_manager.blocks_for(len(seq))
        pool = self.swap_pool
        if pool is not None and seq.num_computed_tokens and len(seq.block_ids) <= pool.num_free_blocks and (
            self.swap_or_recompute is None or self.swap_or_recompute.swaps(seq, self._host_link_load(output))
        ):
            seq.host_block_ids = pool.take(len(seq.block_ids))
            output.swap_out.extend(zip(seq.block_ids, seq.host_block_ids))
            self.block_manager.free(seq)
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
            seq.metrics.num_swap_outs += 1
            self.num_swap_outs += 1
            return
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _host_link_load(self, output: SchedulerOutput) -> HostLinkLoad:
        """The swap traffic ahead of a swap-out in `output` (the step being formed)."""
        assert self.swap_pool is not None
        held = self.swap_pool.num_total_blocks - self.swap_pool.num_free_blocks
        return HostLinkLoad(len(output.swap_out) + self.num_swap_out_in_flight,
                            held + len(output.swap_in) + self.num_swap_in_in_flight)

    def _recompute_swapped(self, seq: Sequence) -> Sequence:
        """Swapped-out `seq` gives its host blocks up and waits to be recomputed."""
        assert self.swap_pool is not None
        self.swap_pool.give(seq.host_block_ids)
        seq.host_block_ids = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        return seq

    def _swap_in(self, seq: Sequence, num_tokens: int, output: SchedulerOutput) -> bool:
        """Give swapped `seq` device blocks for its KV and its next `num_tokens` tokens, the
        copy back riding on this step; False (nothing changed) when too few are free."""
        if not self.block_manager.allocate(seq, seq.num_computed_tokens + num_tokens):
            return False
        assert self.swap_pool is not None
        output.swap_in.extend(zip(seq.host_block_ids, seq.block_ids))
        self.swap_pool.give(seq.host_block_ids)
        seq.host_block_ids = []
        self.swapped.popleft()
        self.num_waiting_blocks -= self.block_manager.blocks_for(len(seq))
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True


def _sampled_sequences(step: SchedulerOutput) -> set[Sequence]:
    """The sequences whose token in flight `step` samples (its last chunk of theirs in flight)."""
    return {seq for seq, n in step.scheduled if seq.num_in_flight_tokens == n}
