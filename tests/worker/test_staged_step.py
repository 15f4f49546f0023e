"""A pipeline group's step message (Command.EXECUTE_STAGED): the step and every stage's block
tables and KV slots, pickled once for all stages; each stage runs the step with its own
physical sub-blocks, in rows the attention kernels can read (contiguous)."""

from __future__ import annotations

import pickle

import numpy as np

from kunserve.engine.block_manager import BlockManager
from kunserve.engine.sequence import Sequence
from kunserve.engine.staged_block_manager import StagedBlockManager
from kunserve.engine.step_builder import build_step_input
from kunserve.executor.worker_set import staged_step_messages
from kunserve.sampling_params import SamplingParams
from kunserve.step import StepInput
from kunserve.worker.protocol import Command
from kunserve.worker.worker_process import staged_step

BLOCK_SIZE = 4
STAGES = 3


def group_step(lengths: list[int]) -> tuple[StagedBlockManager, StepInput, list[bytes]]:
    """A 3-stage group's block pool (each stage's sub-blocks at other ids), the step of
    sequences of `lengths` tokens prefilling whole (in logical block ids), and each stage's
    message of it (as the group's executor sends them)."""
    blocks = StagedBlockManager(BLOCK_SIZE, [BlockManager(BLOCK_SIZE, range(100 * s, 100 * s + 60))
                                             for s in range(STAGES)])
    seqs = []
    for i, length in enumerate(lengths):
        seq = Sequence(f"s{i}", list(range(length)), SamplingParams(max_tokens=4), length + 4)
        assert blocks.allocate(seq, length)
        seqs.append(seq)
    step = build_step_input([(seq, len(seq)) for seq in seqs], BLOCK_SIZE, [])
    return blocks, step, staged_step_messages(step, blocks, STAGES)


def stage_runs(message: bytes) -> StepInput:
    """The step a stage runs from its message (kunserve/worker/worker_process.py's handler)."""
    command, argument = pickle.loads(message)
    assert command == Command.EXECUTE_STAGED
    return staged_step(*argument)


def test_each_stage_runs_the_step_with_its_own_sub_blocks() -> None:
    blocks, logical, messages = group_step([3, 9, 17, 1])
    for stage in range(STAGES):
        step = stage_runs(messages[stage])
        tables, slots = blocks.translate(stage, logical.batch.block_tables, logical.batch.slot_mapping)
        np.testing.assert_array_equal(step.batch.block_tables, tables)
        np.testing.assert_array_equal(step.batch.slot_mapping, slots)
        np.testing.assert_array_equal(step.token_ids, logical.token_ids)


def test_a_stages_block_tables_are_contiguous_and_writable() -> None:
    _, _, messages = group_step([5, 12])
    for stage in range(STAGES):
        tables = stage_runs(messages[stage]).batch.block_tables
        assert tables.flags["C_CONTIGUOUS"] and tables.flags["WRITEABLE"]
