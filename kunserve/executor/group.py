"""Replicas' workers (processes, or Ray actors) driven as the stages of one pipeline, after a
drop fused them (kunserve/cluster/transitions.py). Each stage gets the step with its own
physical sub-block ids; the last stage samples. The workers stay owned by their replicas'
executors."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np

from kunserve.engine.staged_block_manager import StagedBlockManager
from kunserve.executor.base import FusedGroupExecutor
from kunserve.executor.multiproc import WorkerSetExecutor
from kunserve.step import StepInput


class GroupExecutor(FusedGroupExecutor):
    def __init__(self, members: list[WorkerSetExecutor], blocks: StagedBlockManager) -> None:
        super().__init__(list(members), blocks)
        # A set of the members' kind (pipes or Ray calls) over each member's one worker.
        self.workers = type(members[0].workers)([member.workers.handles[0] for member in members])

    def submit(self, step: StepInput) -> None:
        self.refuse_swaps(step)
        for stage in range(len(self.members)):
            tables, slots = self.blocks.translate(stage, step.batch.block_tables, step.batch.slot_mapping)
            staged = dataclasses.replace(step, batch=dataclasses.replace(step.batch, block_tables=tables,
                                                                          slot_mapping=slots))
            self.workers.send(stage, pickle.dumps(("execute", staged), protocol=pickle.HIGHEST_PROTOCOL))

    def collect(self) -> np.ndarray:
        return self.workers.receive_sampled()

    def take_busy_seconds(self) -> list[float]:
        return self.workers.take_busy_seconds()
