"""The executor for one device driven from the engine's own process."""

from __future__ import annotations

import gc
from collections import deque

import numpy as np
import torch

from kunserve.executor.base import Executor
from kunserve.layout import ArenaLayout
from kunserve.step import StepInput
from kunserve.worker.model_runner import PendingTokens
from kunserve.worker.worker import Worker


class InProcessExecutor(Executor):
    runs_ahead = True

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._results: deque[PendingTokens] = deque()
        self._shut_down = False

    @property
    def layout(self) -> ArenaLayout:
        return self.worker.layout

    @property
    def num_swap_blocks(self) -> int:
        swap = self.worker.swap_space
        return 0 if swap is None else swap.num_blocks

    def kv_block_ids(self) -> range:
        return self.worker.layout.initial_kv_blocks()

    def submit(self, step: StepInput) -> None:
        self._results.append(self.worker.launch(step))

    def collect(self) -> np.ndarray:
        return self._results.popleft().result()

    def release_layer(self, layer: int) -> range:
        return self.worker.release_layer(layer)

    def reclaim_layer(self, layer: int) -> None:
        self.worker.reclaim_layer(layer)

    def shutdown(self) -> None:
        """Let go of the device's memory (the arena, its graphs), so that another engine of
        this process sizes its arena from what is really free: the engine's objects may live
        on in reference cycles, and torch keeps freed blocks cached until told otherwise."""
        if self._shut_down:
            return
        self._shut_down = True
        device = self.worker.device
        self._results.clear()  # steps in flight hold the device's tensors too
        del self.worker
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
