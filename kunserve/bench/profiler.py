"""Measure step times of a worker over a grid of step shapes, for the cost model
(kunserve/engine/cost_model.py; benchmarks/profile_steps.py runs it on the device).

Each case is a step of `decodes` decoding sequences with `decode_context` tokens of KV each,
plus one prefill chunk of `prefill_tokens` after `prefill_context` tokens. The KV the steps
read is whatever the arena holds: times do not depend on its values."""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from kunserve.engine.block_manager import BlockManager
from kunserve.engine.cost_model import ProfilePoint, StepShape
from kunserve.engine.sequence import Sequence
from kunserve.engine.step_builder import build_step_input
from kunserve.sampling_params import SamplingParams
from kunserve.step import StepInput
from kunserve.worker.worker import Worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileCase:
    decodes: int = 0
    decode_context: int = 0
    prefill_tokens: int = 0
    prefill_context: int = 0

    @property
    def kv_tokens(self) -> int:
        return self.decodes * (self.decode_context + 1) + self.prefill_context + self.prefill_tokens


def profile_grid(decode_batches: list[int], contexts: list[int], prefill_tokens: list[int]) -> list[ProfileCase]:
    """Decode-only, prefill-only (fresh and after a context) and mixed steps."""
    cases = [ProfileCase(b, c) for b, c in itertools.product(decode_batches, contexts)]
    cases += [ProfileCase(prefill_tokens=t, prefill_context=c)
              for t, c in itertools.product(prefill_tokens, [0, contexts[-1]])]
    mid_batch, mid_context = decode_batches[len(decode_batches) // 2], contexts[len(contexts) // 2]
    cases += [ProfileCase(mid_batch, mid_context, t, 0) for t in prefill_tokens]
    return cases


def case_sequences(case: ProfileCase, blocks: BlockManager) -> list[tuple[Sequence, int]]:
    """The case's sequences with their KV blocks, and the tokens each computes."""
    params = SamplingParams(temperature=0.0)
    scheduled: list[tuple[Sequence, int]] = []
    for i in range(case.decodes):
        scheduled.append((_sequence(f"d{i}", case.decode_context, 1, params, blocks), 1))
    if case.prefill_tokens:
        seq = _sequence("p", case.prefill_context, case.prefill_tokens, params, blocks)
        scheduled.append((seq, case.prefill_tokens))
    return scheduled


def _sequence(request_id: str, computed: int, new: int, params: SamplingParams, blocks: BlockManager) -> Sequence:
    seq = Sequence(request_id, [1] * (computed + new), params, computed + new + 1)
    seq.num_computed_tokens = computed
    if not blocks.allocate(seq, computed + new):
        raise ValueError(f"profile case needs more KV blocks than the arena holds ({blocks.num_total_blocks})")
    return seq


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(worker: Worker, step: StepInput, samples: bool, repeats: int) -> float:
    """Median seconds of the stage's forward (and sampling, when it samples), after one warm-up."""
    times = []
    for _ in range(repeats + 1):
        _synchronize(worker.device)
        start = time.perf_counter()
        hidden = worker.runner.forward(step)
        if samples:
            worker.runner.sample(step, hidden)
        _synchronize(worker.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def profile_worker(worker: Worker, cases: list[ProfileCase], block_size: int, repeats: int) -> list[ProfilePoint]:
    """One point per case that fits the worker's KV cache. The worker's stage must be the
    first (it embeds token ids); it samples when it also holds the LM head."""
    if worker.start != 0:
        raise ValueError("profile_worker: the stage must start at layer 0 (it embeds the token ids)")
    samples = worker.end == worker.spec.num_layers
    capacity = worker.layout.num_initial_kv_blocks * block_size
    points = []
    for case in cases:
        if case.kv_tokens + block_size * (case.decodes + 1) > capacity:
            logger.info("skipping %s: more KV than the arena holds", case)
            continue
        blocks = BlockManager(block_size, worker.layout.initial_kv_blocks())
        scheduled = case_sequences(case, blocks)
        seconds = time_case(worker, build_step_input(scheduled, block_size, []), samples, repeats)
        points.append(ProfilePoint(StepShape.of_step(scheduled), worker.end - worker.start, samples, seconds))
        logger.info("%s layers=%d: %.3f ms", case, worker.end - worker.start, seconds * 1e3)
    return points


def split_holdout(points: list[ProfilePoint], every: int, seed: int = 0) -> tuple[list[ProfilePoint], list[ProfilePoint]]:
    """(fit, held out): every `every`-th point of a seeded shuffle is held out."""
    order = np.random.default_rng(seed).permutation(len(points))
    held = {int(i) for i in order[::every]}
    return [p for i, p in enumerate(points) if i not in held], [p for i, p in enumerate(points) if i in held]
