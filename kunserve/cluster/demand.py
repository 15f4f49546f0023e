"""The KV demand to come, as the drop planner and the restore decision see it: what an
engine's requests will hold at their peak if each runs to its expected end.

Output lengths are not known in advance. A request that has generated n tokens is expected
to end at the mean length of the recently finished requests that ran longer than n (the
mean residual life of the recent history: with heavy-tailed outputs, a request that has run
long is expected to run longer still), never beyond its max_tokens; with no such history,
where it is now. Requests end at different times, so the peak of their sum is below the sum
of their ends: with l_i tokens now and r_i to come, the demand t tokens from now is the sum
over the requests with r_i >= t of (l_i + t), which peaks at one of the r_i (a sort, then a
scan). Queued requests count as if admitted now.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from kunserve.engine.llm_engine import LLMEngine


@dataclass(frozen=True)
class Demand:
    """An engine's requests, as a drop or restore weighs them."""

    now_blocks: int  # KV blocks the requests hold or, queued, need now
    peak_blocks: int  # the forecast peak (>= now_blocks)
    seqs: int  # running, queued and swapped-out requests: sequence slots they need


# Output lengths a policy estimates from: many bursts' worth, so that a burst of short
# requests does not push the long tail out of the history.
OUTPUT_HISTORY = 4096


class OutputLengths:
    """Output lengths of the requests that recently ran to their end, across the engines a
    policy looks at (each engine keeps its last RECENT_OUTPUTS between two looks)."""

    def __init__(self, capacity: int = OUTPUT_HISTORY) -> None:
        self._lengths: deque[int] = deque(maxlen=capacity)
        self._taken: weakref.WeakKeyDictionary[LLMEngine, int] = weakref.WeakKeyDictionary()
        self._sorted = np.zeros(0, dtype=np.int64)
        self._suffix = np.zeros(1, dtype=np.int64)  # _suffix[i]: the sum of _sorted[i:]

    def __len__(self) -> int:
        return len(self._lengths)

    def collect(self, engines: Iterable[LLMEngine]) -> None:
        """Take the lengths the engines recorded since the last collect."""
        changed = False
        for engine in engines:
            total = engine.num_recent_outputs
            new = total - self._taken.get(engine, 0)
            if new > 0:
                self._lengths.extend(list(engine.recent_output_lens)[-new:])
                self._taken[engine] = total
                changed = True
        if changed:
            self._sorted = np.sort(np.fromiter(self._lengths, dtype=np.int64))
            self._suffix = np.concatenate((np.cumsum(self._sorted[::-1])[::-1], [0]))

    def expected_final(self, generated: np.ndarray) -> np.ndarray:
        """Each request's expected output length, given the tokens it has generated: the mean
        of the recent lengths above it, or what it has when none is above."""
        if not len(self._sorted):
            return generated
        first_longer = np.searchsorted(self._sorted, generated, side="right")
        longer = len(self._sorted) - first_longer
        mean_longer = self._suffix[first_longer] / np.maximum(longer, 1)
        return np.where(longer > 0, np.ceil(mean_longer), generated).astype(np.int64)


def forecast(engine: LLMEngine, lengths: OutputLengths) -> Demand:
    """The demand of `engine`'s requests now and at its forecast peak (read from any thread:
    list copies, and counts a step may move on by one)."""
    scheduler = engine.scheduler
    seqs = list(scheduler.running) + list(scheduler.waiting) + list(scheduler.swapped)
    if not seqs:
        return Demand(0, 0, 0)
    block_size = engine.block_manager.block_size
    current = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    # What the requests hold or need now: a running one's blocks, a queued one's known tokens.
    now_blocks = int(np.maximum(-(-current // block_size),
                                np.fromiter((len(s.block_ids) for s in seqs), dtype=np.int64, count=len(seqs))).sum())
    prompt = np.fromiter((s.num_prompt_tokens for s in seqs), dtype=np.int64, count=len(seqs))
    cap = np.fromiter((s.max_total_tokens for s in seqs), dtype=np.int64, count=len(seqs))
    final = np.clip(prompt + lengths.expected_final(current - prompt), current, np.maximum(cap, current))
    remaining = final - current
    order = np.argsort(-remaining, kind="stable")
    alive = np.arange(1, len(seqs) + 1)  # at t = the k-th largest remainder, k requests still run
    tokens = np.cumsum(current[order]) + alive * remaining[order]
    peak = int(np.argmax(tokens))
    t = remaining[order][peak]
    at_peak = current[order][: peak + 1] + t
    blocks = int((-(-at_peak // block_size)).sum())
    return Demand(now_blocks, max(now_blocks, blocks), len(seqs))
