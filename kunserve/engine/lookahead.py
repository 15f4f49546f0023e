"""Lookahead batch formulation (from the KunServe paper): balanced micro-batches for a pipeline.

A g-stage pipeline keeps g micro-batches in flight; every stage waits for the slowest of
them, so a micro-batch that carries a long prefill chunk while the others carry a few
decodes leaves the other stages idle (the bubble). Splitting the sequences evenly by count
ignores that a chunk of 2,000 prompt tokens costs as much as hundreds of decodes.

Instead, before forming a micro-batch the engine looks ahead at the work of the pipeline
cycle (the micro-batches in flight, every running sequence's next chunk, and waiting
prompts up to what g micro-batches can take) and sets the micro-batch's target time to the
cost model's prediction for 1/g of it. The scheduler then fills the micro-batch while its
predicted time stays within the target, cutting a prefill into the largest chunk that fits;
the prompt's next chunk may go into the next micro-batch at once (kunserve/engine/
scheduler.py), so g micro-batches can share one long prefill.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from kunserve.engine.cost_model import CountPredictor, StagePredictor, StepShape
from kunserve.engine.sequence import Sequence

Predictor = Callable[[StepShape], float]  # predicted seconds of a micro-batch on one stage
# A lookahead shape's fields: num_tokens, decode_context, prefill_pairs, num_samples (its
# longest decode is never known). The budget sums these per candidate instead of building a
# StepShape each time: a micro-batch's host cost is mostly these sums.
Counts = tuple[float, float, float, float]
# How much longer than the decode that proves a cover the decodes it covers may be: a
# micro-batch's decodes have contexts of a like size, more or less (a longer one predicts).
COVER_CONTEXT_FACTOR = 2


class LookaheadBudget:
    """The time budget of one micro-batch: how many tokens each candidate may compute."""

    def __init__(self, predict: Predictor, target_s: float, min_chunk_tokens: int) -> None:
        self.predict = predict
        self.target_s = target_s
        self.min_chunk_tokens = min_chunk_tokens
        self._predict_counts = _count_predictor(predict)
        self._counts: Counts = (0, 0, 0, 0)
        # The counts with the last chunk tried, which `commit` usually takes (one sum per
        # candidate, not two).
        self._tried: tuple[Sequence, int, Counts] | None = None
        # Counts known to fit (predicted within the target) ahead of the micro-batch's: where the
        # prediction never falls as a count grows, a chunk whose counts stay within them fits
        # without a prediction of its own. A decode that finds none tries to prove counts
        # `_reach` decodes ahead of it (twice as far after a proof, half after a miss; 0: no
        # more tries), so a micro-batch of b decodes of like contexts costs O(log b) predictions.
        self._cover: Counts | None = None
        grows = isinstance(predict, StagePredictor) and predict.grows_with_counts
        self._reach = 1 if grows else 0
        # Where the prediction grows with the counts, a one-token chunk refused at start s is a
        # refusal of every one starting at s or later until the counts change: once a micro-batch
        # is full, the rest of the running sequences are refused without the three predictions
        # a refusal costs. None: nothing refused since the last commit (or not monotone).
        self._remembers_refusals = grows
        self._refused_from: int | None = None

    @property
    def shape(self) -> StepShape:
        """What the micro-batch computes so far."""
        return StepShape(*self._counts)

    def grant(self, seq: Sequence, wanted: int) -> int:
        """Tokens of the `wanted` next ones that `seq` may compute in this micro-batch (0:
        none). A prefill is cut to the target; what cannot be cut (a decode, a chunk at the
        minimum) goes in if that brings the micro-batch closer to the target than leaving it
        out, so a micro-batch is not one decode short of its share. An empty micro-batch
        always gets something, so every step makes progress."""
        refused_from = self._refused_from
        if wanted == 1 and refused_from is not None and seq.num_scheduled_tokens >= refused_from:
            return 0
        if self._fits(seq, wanted):
            return wanted
        if wanted <= self.min_chunk_tokens and self._closer_with(seq, wanted):
            return wanted
        floor = min(wanted, self.min_chunk_tokens)
        if self._counts[0] == 0:
            granted = floor
        elif wanted == 1:
            if self._remembers_refusals:
                self._refused_from = seq.num_scheduled_tokens
            return 0
        elif not self._fits(seq, floor):
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
        tried = self._tried
        if tried is not None and tried[0] is seq and tried[1] == num_tokens:
            self._counts = tried[2]
        else:
            self._counts = _with_chunk(self._counts, seq, num_tokens)
        self._tried = None
        self._refused_from = None

    def _fits(self, seq: Sequence, num_tokens: int) -> bool:
        with_chunk = _with_chunk(self._counts, seq, num_tokens)
        self._tried = (seq, num_tokens, with_chunk)
        cover = self._cover
        if (cover is not None and with_chunk[0] <= cover[0] and with_chunk[1] <= cover[1]
                and with_chunk[2] <= cover[2] and with_chunk[3] <= cover[3]):
            return True
        if num_tokens == 1 and self._reach and self._proves_cover(with_chunk, with_chunk[1] - self._counts[1]):
            return True
        return self._predict_counts(*with_chunk) <= self.target_s

    def _proves_cover(self, with_decode: Counts, context: float) -> bool:
        """Whether the counts `_reach` decodes past `with_decode` (each of up to
        COVER_CONTEXT_FACTOR times this decode's `context`) fit; if so they become the cover."""
        reach = self._reach
        num, decode_context, pairs, samples = with_decode
        cover = (num + reach, decode_context + reach * COVER_CONTEXT_FACTOR * context, pairs, samples + reach)
        if self._predict_counts(*cover) <= self.target_s:
            self._cover, self._reach = cover, 2 * reach
            return True
        self._reach = reach // 2
        return False

    def _closer_with(self, seq: Sequence, num_tokens: int) -> bool:
        over = self._predict_counts(*_with_chunk(self._counts, seq, num_tokens)) - self.target_s
        return over < self.target_s - self._predict_counts(*self._counts)


def cycle_target_s(
    predict: Predictor,
    in_flight: Iterable[StepShape],
    running: Iterable[Sequence],
    waiting: Iterable[Sequence],
    num_stages: int,
    max_num_batched_tokens: int,
) -> float:
    """The predicted time of 1/g of a pipeline cycle's work: the micro-batches in flight, the
    rest of every running sequence not waiting for its token, and the waiting prompts;
    together at most g micro-batches' token budget (a prompt's chunks may fill them all)."""
    cycle_tokens = num_stages * max_num_batched_tokens
    # Summed field by field in StepShape.__add__'s order (a StepShape per sum costs more than it).
    tokens, context, pairs, samples, longest = 0, 0, 0, 0, 0
    for step in in_flight:
        tokens, context, pairs = tokens + step.num_tokens, context + step.decode_context, pairs + step.prefill_pairs
        samples, longest = samples + step.num_samples, max(longest, step.longest_decode_context)
    # Each chunk summed as `_with_chunk` sums (inlined: this runs over every running sequence).
    for seq in itertools.chain(running, waiting):
        if tokens >= cycle_tokens:
            break
        in_flight = seq.num_in_flight_tokens
        start = seq.num_computed_tokens + in_flight
        length = len(seq.token_ids)
        if in_flight > 0 and start >= length:  # it awaits its token (Sequence.awaits_token)
            continue
        n = min(length - start, cycle_tokens - tokens)
        if n == 1:
            tokens, context, samples = tokens + 1, context + start, samples + 1
        else:
            tokens, pairs = tokens + n, pairs + (n * start + n * (n + 1) // 2)
            samples += int(start + n >= length)
    # A chunk's longest decode is not known: the cycle's is the steps in flight's. Its 1/g
    # share as StepShape.scaled makes it.
    share = 1 / num_stages
    return predict(StepShape(tokens * share, context * share, pairs * share, samples * share, longest))


def _count_predictor(predict: Predictor) -> CountPredictor:
    """`predict` of a lookahead shape, from its counts."""
    if isinstance(predict, StagePredictor):
        return predict.of_counts
    return lambda num_tokens, context, pairs, samples: predict(StepShape(num_tokens, context, pairs, samples))


def _with_chunk(counts: Counts, seq: Sequence, num_tokens: int) -> Counts:
    """`counts` plus those of `seq`'s next `num_tokens` tokens (StepShape.of_chunk's, summed
    in the same order, so the sums are those of adding the chunk's StepShape)."""
    num, context, pairs, samples = counts
    start = seq.num_computed_tokens + seq.num_in_flight_tokens
    if num_tokens == 1:
        return (num + 1, context + start, pairs, samples + 1)
    new_pairs = num_tokens * start + num_tokens * (num_tokens + 1) // 2
    return (num + num_tokens, context, pairs + new_pairs, samples + int(start + num_tokens >= len(seq.token_ids)))
