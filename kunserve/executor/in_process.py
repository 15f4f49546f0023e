"""The executor for one device driven from the engine's own process."""

from __future__ import annotations

import numpy as np

from kunserve.executor.base import Executor
from kunserve.layout import ArenaLayout
from kunserve.step import StepInput
from kunserve.worker.worker import Worker


class InProcessExecutor(Executor):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    @property
    def layout(self) -> ArenaLayout:
        return self.worker.layout

    def execute(self, step: StepInput) -> np.ndarray:
        return self.worker.execute(step)

    def release_layer(self, layer: int) -> range:
        return self.worker.release_layer(layer)

    def reclaim_layer(self, layer: int) -> None:
        self.worker.reclaim_layer(layer)
