"""The driver's own work per step of a pipeline group against a replica's, per member, without workers.

benchmarks/group_host_time.py measures the live driver beside its worker processes; on a
machine of few cores a group's busy stages slow the driver's every part (the same step built
from the same sequences takes longer there). This runs only the driver's part of a step on
tiny-llama's nominal cost model: schedule (a group: the cycle target and the lookahead budget
too, or with lookahead batching off 1/g of the demand by count, as the engine then splits), build the step input, pickle the message(s) as the executors do (a group: translate every
stage's blocks), mark it in flight, and take back the oldest step's tokens. All sequences
decode from 32-token prompts, as in group_host_time.py.

    python benchmarks/group_driver_time.py --batches 8 32 64
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import deque

import numpy as np

from kunserve.engine.block_manager import BlockManager
from kunserve.engine.cost_model import CostModel, StagePredictor
from kunserve.engine.lookahead import LookaheadBudget, cycle_target_s
from kunserve.engine.scheduler import Scheduler, SchedulerOutput
from kunserve.engine.sequence import Sequence
from kunserve.engine.staged_block_manager import StagedBlockManager
from kunserve.engine.step_builder import build_step_input
from kunserve.executor.worker_set import staged_step_messages, step_message
from kunserve.model.presets import resolve_model
from kunserve.sampling_params import SamplingParams
from kunserve.step import StepInput

BLOCK_SIZE = 16
NUM_BLOCKS = 65533  # tiny-llama's CPU arena in group_host_time.py
PROMPT_TOKENS = 32
MIN_CHUNK_TOKENS = 32  # EngineConfig.lookahead_min_chunk_tokens' default
WARMUP_STEPS_PER_STAGE = 3  # untimed: every sequence prefilled and the pipeline full
SAMPLED_TOKEN = 7


def driver_seconds_per_step(group_size: int, batch: int, steps: int, lookahead: bool = True) -> float:
    """Median seconds of the driver's work per step (per micro-batch for a group); `lookahead`:
    a group's micro-batches balanced by the lookahead budget, else split by count."""
    spec = resolve_model("tiny-llama").spec
    if group_size == 1:
        blocks = BlockManager(BLOCK_SIZE, range(NUM_BLOCKS))
    else:
        blocks = StagedBlockManager(BLOCK_SIZE, [BlockManager(BLOCK_SIZE, range(NUM_BLOCKS))
                                                 for _ in range(group_size)])
    scheduler = Scheduler(blocks, batch * group_size, max(batch * PROMPT_TOKENS, 256))
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=10 * steps + 64, ignore_eos=True)
    for i in range(batch * group_size):
        prompt = rng.integers(0, spec.vocab_size, PROMPT_TOKENS).tolist()
        scheduler.add(Sequence(str(i), prompt, params, PROMPT_TOKENS + 10 * steps + 64))
    predict = StagePredictor(CostModel.default(spec, "tiny-llama"), spec.num_layers // group_size)
    in_flight: deque[SchedulerOutput] = deque()
    timed: list[float] = []
    for i in range(WARMUP_STEPS_PER_STAGE * group_size + steps):
        start = time.perf_counter()
        if group_size == 1:
            output = scheduler.schedule()
        elif not lookahead:  # LLMEngine._micro_batch_limits with lookahead_batching off
            demand = len(scheduler.running) + len(scheduler.waiting)
            output = scheduler.schedule(max(1, math.ceil(demand / group_size)))
        else:
            shapes = (step.shape for step in in_flight if step.shape is not None)
            target = cycle_target_s(predict, shapes, scheduler.running, scheduler.waiting, group_size,
                                    scheduler.max_num_batched_tokens)
            output = scheduler.schedule(None, LookaheadBudget(predict, target, MIN_CHUNK_TOKENS))
        step = build_step_input(output.scheduled, BLOCK_SIZE, [])
        pickle_messages(step, blocks, group_size)
        scheduler.launch(output)
        in_flight.append(output)
        if len(in_flight) >= group_size:
            oldest = in_flight.popleft()
            sampled = sum(seq.num_computed_tokens + n == len(seq) for seq, n in oldest.scheduled)
            scheduler.update(oldest, [SAMPLED_TOKEN] * sampled)
        if i >= WARMUP_STEPS_PER_STAGE * group_size:
            timed.append(time.perf_counter() - start)
    return statistics.median(timed)


def pickle_messages(step: StepInput, blocks: BlockManager | StagedBlockManager, group_size: int) -> list[bytes]:
    """The step's messages as kunserve/executor/worker_set.py's executors pickle them (not sent)."""
    if isinstance(blocks, StagedBlockManager):
        return staged_step_messages(step, blocks, group_size)
    return [step_message(step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64], help="running requests per member")
    parser.add_argument("--steps", type=int, default=400, help="timed steps of each")
    args = parser.parse_args()
    print("| batch / member | replica (us) | group per member (us) | group / replica "
          "| group, lookahead off (us) | its / replica |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in args.batches:
        replica = driver_seconds_per_step(1, batch, args.steps)
        group = driver_seconds_per_step(args.group_size, batch, args.steps)
        by_count = driver_seconds_per_step(args.group_size, batch, args.steps, lookahead=False)
        print(f"| {batch} | {replica * 1e6:.0f} | {group * 1e6:.0f} | {group / replica:.2f} "
              f"| {by_count * 1e6:.0f} | {by_count / replica:.2f} |", flush=True)


if __name__ == "__main__":
    main()
