"""The time a pipeline stage spends computing, for the bubble metric."""

from __future__ import annotations

import time
from collections import deque

import torch


class BusyClock:
    """The time this stage spends computing, not waiting for its input: with the wall time
    it gives the pipeline's bubble. On a GPU, CUDA events time each step and `take` reads
    only those already done (no host sync); on CPU the host clock does."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._done_s = 0.0
        self._host_start = 0.0

    def begin(self) -> None:
        if self.cuda:
            self._pending.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._pending[-1][0].record()
        else:
            self._host_start = time.perf_counter()

    def end(self) -> None:
        if self.cuda:
            self._pending[-1][1].record()
        else:
            self._done_s += time.perf_counter() - self._host_start

    def take(self) -> float:
        """Seconds computed since the last take (steps still running count at a later take)."""
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.popleft()
            self._done_s += start.elapsed_time(end) / 1e3
        taken, self._done_s = self._done_s, 0.0
        return taken
