"""The engine of one replica: requests in, scheduled steps out to the executor, tokens back."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from kunserve.config import EngineConfig
from kunserve.engine.ahead_timer import AheadTimer
from kunserve.engine.block_manager import BlockAccounting, BlockManager
from kunserve.engine.cost_model import CostModel, StagePredictor, StepShape, resolve_cost_model
from kunserve.engine.lookahead import LookaheadBudget, cycle_target_s
from kunserve.engine.output_processor import OutputProcessor
from kunserve.engine.preemption import SwapOrRecompute
from kunserve.engine.scheduler import Scheduler, SchedulerOutput
from kunserve.engine.sequence import Sequence
from kunserve.engine.stats import FinishedRequestStats, PipelineBusy, StatsListener, StepStats
from kunserve.engine.step_builder import build_step_input
from kunserve.executor.base import Executor
from kunserve.executor.factory import build_executor
from kunserve.model.presets import ResolvedModel, resolve_model
from kunserve.outputs import CompletionOutput, RequestOutput
from kunserve.sampling_params import SamplingParams
from kunserve.step import StepInput

logger = logging.getLogger(__name__)

PromptInput = str | list[int]
# Output lengths of the last finished requests an engine keeps: what an overload policy
# estimates running requests' remaining growth from (kunserve/cluster/demand.py).
RECENT_OUTPUTS = 256
Clock = Callable[[], float]  # seconds, monotonic: time.monotonic, or a simulation's virtual clock
FAILED = "error"  # the finish reason of a request that failed alone (a fault in its own output)


class BetweenSteps(Protocol):
    """Work an engine does a piece of before each step (a drop's KV exchange, in chunks)."""

    def advance(self) -> bool:
        """Do the next piece; True once all is done."""
        ...


@dataclass(frozen=True)
class ModelContext:
    """What every engine of one model shares (a replica's, and its group's after a drop)."""

    model: ResolvedModel
    tokenizer: PreTrainedTokenizerBase | None
    max_model_len: int
    cost_model: CostModel


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        executor: Executor | None = None,
        clock: Clock = time.monotonic,
        *,
        context: ModelContext | None = None,
        block_manager: BlockAccounting | None = None,
    ) -> None:
        """`executor`: the devices (built from `config` when None: kunserve/executor/factory.py);
        `clock`: what request and step times are read from; `context` and `block_manager`: given
        for a group formed by a drop (`for_group`)."""
        self.config = config
        self.clock = clock
        if context is None:
            model = resolve_model(config.model)
            tokenizer = self._load_tokenizer(model)  # before the devices load: a bad path fails fast
            self.executor = executor or build_executor(config, model)
            context = self._model_context(model, tokenizer)
        else:
            model, self.executor = context.model, executor or build_executor(config, context.model)
        self.context = context
        self.model, self.spec = model, model.spec
        self.tokenizer, self.max_model_len = self.context.tokenizer, self.context.max_model_len
        self.cost_model = self.context.cost_model
        self._assemble(block_manager or BlockManager(config.block_size, self.executor.kv_block_ids()))
        capacity = self.block_manager.num_total_blocks * config.block_size
        if block_manager is None and capacity < self.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, less than max_model_len=%d: longer requests will be refused",
                capacity,
                self.max_model_len,
            )

    @classmethod
    def for_group(
        cls, like: LLMEngine, config: EngineConfig, executor: Executor, block_manager: BlockAccounting
    ) -> LLMEngine:
        """An engine of `like`'s model with `config` on another executor and block pool (a
        group formed by a drop); it starts with no requests."""
        engine = cls(config, executor, like.clock, context=like.context, block_manager=block_manager)
        engine.stats_listener = like.stats_listener
        return engine

    @classmethod
    def replacing(cls, failed: LLMEngine, executor: Executor) -> LLMEngine:
        """A fresh engine for `failed`'s replica on new devices (its workers died): the same
        config, model, clock and stats listener; no requests."""
        engine = cls(failed.config, executor, failed.clock, context=failed.context)
        engine.stats_listener = failed.stats_listener
        return engine

    def _model_context(self, model: ResolvedModel, tokenizer: PreTrainedTokenizerBase | None) -> ModelContext:
        config = self.config
        cost_model = resolve_cost_model(config.cost_profile, model.spec, model.name, self.executor.layout.elem_bytes,
                                        config.tensor_parallel_size)
        max_model_len = config.max_model_len or model.spec.max_position_embeddings
        return ModelContext(model, tokenizer, max_model_len, cost_model)

    def _assemble(self, block_manager: BlockAccounting) -> None:
        config = self.config
        self.block_manager = block_manager
        swap_blocks = self.executor.num_swap_blocks
        swap_pool = BlockManager(config.block_size, range(swap_blocks)) if swap_blocks else None
        choice = self._swap_or_recompute() if swap_pool is not None and config.preemption_mode == "auto" else None
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, swap_pool,
                                   choice)
        # Asynchronous scheduling: one step scheduled ahead of the one on the device (of a
        # pipeline's oldest micro-batch), while swaps allow it (swaps_allow_ahead).
        self._schedules_ahead = self.executor.runs_ahead and config.resolve_async_scheduling(config.resolve_device())
        # A replica forms its step ahead just before the running one ends (kunserve/engine/ahead_timer.py).
        self._ahead_timer = (AheadTimer(config.ahead_slack)
                             if self._schedules_ahead and self.executor.max_in_flight == 1 else None)
        self.output_processor = OutputProcessor(self.tokenizer, self.spec.eos_token_ids)
        self._sequences: dict[str, Sequence] = {}
        self._finished_ids: list[str] = []
        # Set by a server to receive StepStats after each step; offline runs skip the stats.
        self.stats_listener: StatsListener | None = None
        self._unreported: list[FinishedRequestStats] = []  # aborts between steps
        self.recent_output_lens: deque[int] = deque(maxlen=RECENT_OUTPUTS)  # of requests that ran to their end
        self.num_recent_outputs = 0  # appended to recent_output_lens so far
        self._in_flight: deque[SchedulerOutput] = deque()  # submitted steps, oldest first
        self._lookahead_predictor: StagePredictor | None = None  # built at the first micro-batch
        self.between_steps: BetweenSteps | None = None
        # The pipeline bubble: time with steps in flight, against the stages' busy clocks.
        self._in_flight_s = 0.0
        self._in_flight_since: float | None = None
        self._bubble_window_start = self.clock()
        if self.executor.max_in_flight > 1:
            self.executor.take_busy_seconds()  # start the stages' clocks from here

    def _swap_or_recompute(self) -> SwapOrRecompute | None:
        """Preemption_mode "auto"'s choice, priced for one stage (a pipeline's stages each copy
        and recompute their own layers' part); None, swapping whenever the host pool has room
        (as "swap"), where the cost model cannot price a swap."""
        layout = self.executor.layout
        layers = self.spec.num_layers // self.executor.max_in_flight
        stage_block_bytes = layout.block_bytes // layout.num_layers * layers
        try:
            return SwapOrRecompute(self.cost_model, layers, stage_block_bytes, self.config.max_num_batched_tokens)
        except ValueError as error:
            _warn_unpriced(str(error))
            return None

    def _load_tokenizer(self, model: ResolvedModel) -> PreTrainedTokenizerBase | None:
        if self.config.skip_tokenizer_init:
            return None
        source = self.config.tokenizer or model.tokenizer_dir
        if source is None:
            logger.info("model %r ships no tokenizer: prompts must be token ids", model.name)
            return None
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)

    # ---- requests -------------------------------------------------------------------------

    def tokenize(self, prompt: PromptInput) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; pass token ids instead")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams) -> None:
        """Validate and queue a request; raises ValueError naming the offending field."""
        self.add_sequence(self.make_sequence(request_id, prompt, params))

    def make_sequence(self, request_id: str, prompt: PromptInput, params: SamplingParams) -> Sequence:
        """A validated, not yet queued request (so a batch can be checked whole first)."""
        if request_id in self._sequences:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        token_ids = self.tokenize(prompt)
        self._validate_prompt(token_ids)
        params.validate_for_vocabulary(self.spec.vocab_size)
        max_total = self.max_model_len if params.max_tokens is None else len(token_ids) + params.max_tokens
        seq = Sequence(
            request_id,
            token_ids,
            params,
            min(max_total, self.max_model_len),
            prompt if isinstance(prompt, str) else None,
            self.clock(),
        )
        kv_tokens = max(seq.num_prompt_tokens, seq.max_total_tokens - 1)  # the last token needs no KV
        if self.block_manager.blocks_for(kv_tokens) > self.block_manager.num_total_blocks:
            raise ValueError(
                f"max_tokens: the request may grow to {kv_tokens} tokens, more than the KV cache holds "
                f"({self.block_manager.num_total_blocks * self.config.block_size})"
            )
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        self.output_processor.add(seq)
        self._sequences[seq.request_id] = seq
        self.scheduler.add(seq)

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt: must not be empty")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"prompt: {len(token_ids)} tokens is longer than max_model_len={self.max_model_len}")
        bad = [t for t in token_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size})")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self._sequences.get(request_id)
        if seq is None or seq.is_finished:
            return None
        self.scheduler.finish(seq, "abort")
        return self._finish_output(seq)

    def kv_demand_blocks(self) -> int:
        """Blocks in use plus the blocks the waiting requests need (safe to read from any thread)."""
        bm = self.block_manager
        return bm.num_total_blocks - bm.num_free_blocks + self.scheduler.num_waiting_blocks

    def unfinished_request_ids(self) -> list[str]:
        return list(self._sequences)

    def has_request(self, request_id: str) -> bool:
        """Whether the request is here and unfinished."""
        return request_id in self._sequences

    def take_unstarted(self) -> list[Sequence]:
        """Give up the waiting requests that were never scheduled (nothing of them is on the
        devices, and nothing was output) for another engine to `add_sequence`: what of a failed
        engine's requests can go on elsewhere."""
        unstarted = self.scheduler.take_unstarted()
        for seq in unstarted:
            del self._sequences[seq.request_id]
        return unstarted

    def hand_over(self) -> tuple[list[Sequence], list[Sequence]]:
        """Give up all requests (running, waiting) for another engine to `take_over`; nothing
        may be in flight. Their blocks are the caller's to account for."""
        if self._in_flight:
            raise RuntimeError("hand_over: steps are in flight; drain() first")
        if self.between_steps is not None:
            raise RuntimeError("hand_over: work between steps is unfinished; finish_between_steps() first")
        return self.scheduler.release_all()

    def finish_between_steps(self) -> None:
        """Do all the work left between steps (a drop's exchange) now."""
        while self.between_steps is not None:
            self._advance_between_steps()

    def _advance_between_steps(self) -> None:
        if self.between_steps is not None and self.between_steps.advance():
            self.between_steps = None

    def take_over(self, source: LLMEngine, running: list[Sequence], waiting: list[Sequence]) -> None:
        """Adopt requests handed over by `source` (which now runs on this engine's devices):
        their blocks already belong to this engine's block pool; running keeps its order
        (preemption takes the last)."""
        for seq in running + waiting:
            self._adopt_bookkeeping(source, seq)
        self._finished_ids.extend(source._finished_ids)
        source._finished_ids = []
        self.scheduler.adopt(running, waiting)

    def release_running(self, seq: Sequence) -> None:
        """Let running `seq` go (between steps, to migrate it): out of the scheduler, its
        blocks here freed; the destination's `adopt_running` takes the rest."""
        self.scheduler.detach(seq)

    def adopt_running(self, source: LLMEngine, seq: Sequence) -> None:
        """Run `seq`, released by `source`, here; its blocks already belong to this engine's
        pool and hold its KV."""
        self._adopt_bookkeeping(source, seq)
        self.scheduler.insert_running(seq)

    def _adopt_bookkeeping(self, source: LLMEngine, seq: Sequence) -> None:
        self._sequences[seq.request_id] = source._sequences.pop(seq.request_id)
        self.output_processor.adopt(source.output_processor, seq.request_id)

    def reset_block_pool(self) -> None:
        """A fresh block manager over the executor's KV blocks (after a group split); no
        request may be here."""
        if self._sequences:
            raise RuntimeError("reset_block_pool: requests are still here")
        self.block_manager = BlockManager(self.config.block_size, self.executor.kv_block_ids())
        self.scheduler.block_manager = self.block_manager

    @property
    def num_in_flight(self) -> int:
        """Steps submitted to the executor and not yet collected."""
        return len(self._in_flight)

    def next_step_due_at(self) -> float | None:
        """When the step scheduled ahead of the running one is best formed (this engine's
        clock): just before the running step ends, so that it takes the requests arriving
        meanwhile. None: at once (not a replica scheduling ahead, or no step runs alone)."""
        return None if self._ahead_timer is None else self._ahead_timer.due_at()

    def has_unfinished_requests(self) -> bool:
        """Requests to run, steps in flight, or work between steps (which a loop must keep
        stepping for: an exchange holds the blocks of requests aborted while their KV moved)."""
        return self.scheduler.has_unfinished or bool(self._in_flight) or self.between_steps is not None

    def shutdown(self) -> None:
        """Stop the executor's workers (worker processes, when there are any)."""
        self.executor.shutdown()

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step. Returns the finished requests' outputs, and the outputs of running
        requests that got a token (unless their output kind is FINAL_ONLY). With a pipeline,
        it first fills the pipeline with micro-batches, then completes the oldest; scheduling
        asynchronously, it submits the next step before completing the one on the device."""
        stats = None if self.stats_listener is None else StepStats()
        self._advance_between_steps()
        self._fill_pipeline(stats)
        outputs = self._complete_oldest(stats) if self._in_flight else []
        window_closed = self.clock() - self._bubble_window_start >= self.config.bubble_window_s
        if stats is not None and self.executor.max_in_flight > 1 and window_closed:
            stats.pipeline = self.measure_pipeline()
        self._report(stats)
        return outputs

    def measure_pipeline(self) -> PipelineBusy:
        """The pipeline's busy and available stage time since the last measurement (or since
        the engine started): its bubble. Reads the stages' clocks (one message each)."""
        now = self.clock()
        if self._in_flight_since is not None:
            self._in_flight_s += now - self._in_flight_since
            self._in_flight_since = now
        busy = self.executor.take_busy_seconds()
        measured = PipelineBusy(sum(busy), len(busy) * self._in_flight_s)
        self._in_flight_s, self._bubble_window_start = 0.0, now
        return measured

    def drain(self) -> list[RequestOutput]:
        """Complete every step in flight without starting new ones (before the devices change)."""
        stats = None if self.stats_listener is None else StepStats()
        outputs: list[RequestOutput] = []
        while self._in_flight:
            outputs.extend(self._complete_oldest(stats))
        self._report(stats)
        return outputs

    def _complete_oldest(self, stats: StepStats | None) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        output = self._in_flight.popleft()
        sampled = self.executor.collect()
        now = self.clock()
        if self._ahead_timer is not None:
            self._ahead_timer.collected(now)
        if not self._in_flight and self._in_flight_since is not None:
            self._in_flight_s += now - self._in_flight_since
            self._in_flight_since = None
        for seq in self.scheduler.update(output, sampled.tolist()):
            self._record_token_time(seq, now, stats)
            try:
                out = self._output_of_token(seq)
            except Exception as error:  # a fault in this request's own output (its text, its stop check)
                logger.exception("processing request %s's token failed; failing that request alone", seq.request_id)
                out = self._fail_request(seq, error)
            if out is not None:
                outputs.append(out)
        return outputs

    def _output_of_token(self, seq: Sequence) -> RequestOutput | None:
        """Stop checks for the token just appended to `seq`; its output, if it has one now."""
        reason = self.output_processor.check_stop(seq)
        if reason is None:
            return self.output_processor.running_output(seq)
        self.scheduler.finish(seq, reason)
        return self._finish_output(seq)

    def _fail_request(self, seq: Sequence, error: Exception) -> RequestOutput:
        """End `seq` alone with finish reason "error"; its output names `error`."""
        if not seq.is_finished:
            self.scheduler.finish(seq, FAILED)
        seq.finish_reason = FAILED
        seq.metrics.finished_time = self.clock()
        self.output_processor.forget(seq.request_id)
        self._forget_finished(seq)
        completion = CompletionOutput(0, "", seq.output_token_ids, FAILED)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], True, seq.metrics,
                             error=f"{error!r}")

    def _report(self, stats: StepStats | None) -> None:
        if stats is not None and self.stats_listener is not None:
            self._fill_step_stats(stats)
            self.stats_listener(stats)

    def _fill_pipeline(self, stats: StepStats | None) -> None:
        depth = self.executor.max_in_flight
        while len(self._in_flight) < depth + (self._schedules_ahead and self.swaps_allow_ahead()):
            # Full (every stage has a micro-batch): the next is scheduled ahead of the oldest.
            ahead = len(self._in_flight) >= depth
            form_start = time.perf_counter()
            output = self.scheduler.schedule(*self._micro_batch_limits(depth), ahead=ahead,
                                             ahead_of=self._in_flight[0] if ahead else None)
            if stats is not None:
                stats.num_preemptions += len(output.preempted)
            if output.is_empty:
                return
            now = self.clock()
            for seq, _ in output.scheduled:
                if seq.metrics.first_scheduled_time is None:
                    seq.metrics.first_scheduled_time = now
            step = build_step_input(output.scheduled, self.config.block_size, self._finished_ids, output.swap_out,
                                    output.swap_in, len(self._in_flight))
            self.executor.submit(step)
            if self._ahead_timer is not None:
                self._ahead_timer.submitted(self.clock(), self._timed_prediction(step), time.perf_counter() - form_start)
            self.scheduler.launch(output)
            self._finished_ids = []
            if not self._in_flight:
                self._in_flight_since = now
            self._in_flight.append(output)

    def _timed_prediction(self, step: StepInput) -> float | None:
        """The cost model's time of a decode step, which the ahead timer times; None for a step
        with a prompt chunk (kunserve/engine/ahead_timer.py)."""
        if not step.decodes_only:
            return None
        shape = StepShape.of_batch(step.batch.query_lens, step.batch.context_lens, len(step.sample_rows))
        return self.cost_model.step_time(shape, self.spec.num_layers)

    def swaps_allow_ahead(self) -> bool:
        """Whether swapping lets the next step be scheduled while the one before runs. Swaps
        copy blocks on side streams, off the steps' stream order, so a step that swaps runs
        alone: under "swap" no step is scheduled ahead (any may swap); under "auto" none while
        a request is swapped out or a step in flight swaps (a step ahead never preempts, so
        then it swaps nothing either)."""
        scheduler = self.scheduler
        return scheduler.swap_pool is None or (self.config.preemption_mode == "auto" and not scheduler.swaps_pending)

    def _micro_batch_limits(self, depth: int) -> tuple[int | None, LookaheadBudget | None]:
        """(max sequences, time budget) of the next step: one device takes what the token
        budget allows; a pipeline's micro-batch takes 1/depth of the pending work, balanced by
        predicted time (lookahead batch formulation) or else by sequence count."""
        if depth == 1:
            return None, None
        scheduler, config = self.scheduler, self.config
        if config.lookahead_batching:
            predict = self._stage_predictor(depth)
            in_flight = (step.shape for step in self._in_flight if step.shape is not None)
            target = cycle_target_s(predict, in_flight, scheduler.running, scheduler.waiting, depth,
                                    config.max_num_batched_tokens)
            return None, LookaheadBudget(predict, target, config.lookahead_min_chunk_tokens)
        demand = len(scheduler.running) + len(scheduler.waiting)
        return max(1, math.ceil(demand / depth)), None

    def _stage_predictor(self, depth: int) -> StagePredictor:
        """The lookahead's predictor of one stage of a `depth`-stage pipeline, built once (it
        binds the cost model's coefficients) and rebuilt only if the depth changes."""
        layers = self.spec.num_layers // depth
        predictor = self._lookahead_predictor
        if predictor is None or predictor.layers != layers:
            predictor = self._lookahead_predictor = StagePredictor(self.cost_model, layers)
        return predictor

    def _record_token_time(self, seq: Sequence, now: float, stats: StepStats | None) -> None:
        m = seq.metrics
        if stats is not None:
            if m.first_token_time is None:
                stats.time_to_first_token_s.append(now - m.arrival_time)
                stats.num_prompt_tokens += seq.num_prompt_tokens
            else:
                assert m.last_token_time is not None
                stats.inter_token_latency_s.append(now - m.last_token_time)
            stats.num_generation_tokens += 1
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now

    def _fill_step_stats(self, stats: StepStats) -> None:
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.kv_cache_usage = self.block_manager.usage
        stats.num_kv_blocks = self.block_manager.num_total_blocks
        stats.finished = self._unreported
        self._unreported = []

    def _finish_output(self, seq: Sequence) -> RequestOutput:
        seq.metrics.finished_time = self.clock()
        if seq.finish_reason != "abort":
            self.recent_output_lens.append(seq.num_output_tokens)
            self.num_recent_outputs += 1
        output = self.output_processor.finished_output(seq)
        self._forget_finished(seq)
        return output

    def _forget_finished(self, seq: Sequence) -> None:
        del self._sequences[seq.request_id]
        self._finished_ids.append(seq.request_id)
        if self.stats_listener is not None:
            self._unreported.append(FinishedRequestStats.of(seq))

    # ---- memory: parameters <-> KV ---------------------------------------------------------

    def release_layer(self, layer: int) -> int:
        """Drop local layer `layer`'s weights; its bytes join the KV pool at once. Returns the
        number of blocks added."""
        blocks = self.executor.release_layer(layer)
        self.block_manager.add_blocks(blocks)
        return len(blocks)

    def reclaim_layer(self, layer: int) -> None:
        """Take local layer `layer`'s bytes back and refill its weights; refused (RuntimeError)
        while any of its blocks holds KV."""
        self.block_manager.remove_blocks(self.executor.layout.released_blocks(layer))
        self.executor.reclaim_layer(layer)


@functools.cache
def _warn_unpriced(reason: str) -> None:
    """Once per reason: preemption_mode "auto" swaps as "swap" does (its cost model cannot say)."""
    logger.warning("preemption_mode='auto' swaps whenever host memory has room, as 'swap': %s", reason)
