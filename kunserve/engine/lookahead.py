"""Lookahead batch formulation (from the KunServe paper): balanced micro-batches for a pipeline.

A g-stage pipeline keeps g micro-batches in flight; every stage waits for the slowest of
them, so a micro-batch that carries a long prefill chunk while the others carry a few
decodes leaves the other stages idle (the bubble). Splitting the sequences evenly by count
ignores that a chunk of 2,000 prompt tokens costs as much as hundreds of decodes.

Instead, before forming a micro-batch the engine looks ahead at the work of the next
pipeline cycle (every running sequence's next chunk, plus waiting prompts up to what g
micro-batches can take) and sets the micro-batch's target time to the cost model's
prediction for 1/g of it (or for its largest chunk with 1/g of the decodes: no split can
shorten a single sequence's chunk). The scheduler then fills the micro-batch while its predicted
time stays within the target, cutting a prefill into the largest chunk that fits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from kunserve.engine.cost_model import StepShape
from kunserve.engine.sequence import Sequence

Predictor = Callable[[StepShape], float]  # predicted seconds of a micro-batch on one stage


class LookaheadBudget:
    """The time budget of one micro-batch: how many tokens each candidate may compute."""

    def __init__(self, predict: Predictor, target_s: float, min_chunk_tokens: int) -> None:
        self.predict = predict
        self.target_s = target_s
        self.min_chunk_tokens = min_chunk_tokens
        self.shape = StepShape()

    def grant(self, seq: Sequence, wanted: int) -> int:
        """Tokens of the `wanted` next ones that `seq` may compute in this micro-batch (0:
        none). An empty micro-batch always gets something, so every step makes progress."""
        if self._fits(seq, wanted):
            return wanted
        floor = min(wanted, self.min_chunk_tokens)
        if self.shape.num_tokens == 0:
            granted = floor
        elif wanted == 1 or not self._fits(seq, floor):
            return 0
        else:
            granted = floor
        # The largest chunk that fits: predicted time grows with the chunk.
        low, high = granted, wanted - 1
        while low < high:
            middle = (low + high + 1) // 2
            if self._fits(seq, middle):
                low = middle
            else:
                high = middle - 1
        return low

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        self.shape += _chunk(seq, num_tokens)

    def _fits(self, seq: Sequence, num_tokens: int) -> bool:
        return self.predict(self.shape + _chunk(seq, num_tokens)) <= self.target_s


def cycle_target_s(
    predict: Predictor,
    running: Iterable[Sequence],
    waiting: Iterable[Sequence],
    num_stages: int,
    max_num_batched_tokens: int,
) -> float:
    """The predicted time of 1/g of the next pipeline cycle's work: each running sequence's
    next chunk and the waiting prompts, together at most g micro-batches' token budget.

    A sequence's chunks run one after another, never in two micro-batches at once, so the
    cycle takes at least as long as a micro-batch holding the largest chunk (with its share
    of the decodes): the target never asks to cut that chunk, which would only add a cycle
    to its request's time to first token."""
    cycle_tokens = num_stages * max_num_batched_tokens
    shape = decodes = largest = StepShape()
    for seq in itertools.chain(running, waiting):
        if shape.num_tokens >= cycle_tokens:
            break
        remaining = max(1, len(seq) - seq.num_computed_tokens)
        chunk = _chunk(seq, min(remaining, max_num_batched_tokens, cycle_tokens - shape.num_tokens))
        shape += chunk
        if chunk.num_tokens == 1:
            decodes += chunk
        elif chunk.num_tokens > largest.num_tokens:
            largest = chunk
    share = 1 / num_stages
    return max(predict(shape.scaled(share)), predict(largest + decodes.scaled(share)))


def _chunk(seq: Sequence, num_tokens: int) -> StepShape:
    computed = seq.num_computed_tokens
    return StepShape.of_chunk(computed, num_tokens, computed + num_tokens >= len(seq))
