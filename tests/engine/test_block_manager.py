"""Block accounting: tables grow block by block, frees return blocks, the pool can change."""

from __future__ import annotations

import pytest

from kunserve.engine.block_manager import BlockManager
from kunserve.engine.sequence import Sequence
from kunserve.sampling_params import SamplingParams

BLOCK = 4


def _seq(name: str = "s") -> Sequence:
    return Sequence(name, [1, 2, 3], SamplingParams(), max_total_tokens=100)


def test_allocation_covers_exactly_the_tokens_asked_for() -> None:
    manager = BlockManager(BLOCK, range(10))
    seq = _seq()
    manager.allocate(seq, 9)
    assert len(seq.block_ids) == 3
    manager.allocate(seq, 12)  # still fits in 3 blocks
    assert len(seq.block_ids) == 3
    manager.allocate(seq, 13)
    assert len(seq.block_ids) == 4
    assert manager.num_free_blocks == 6


def test_a_block_belongs_to_one_sequence_at_a_time() -> None:
    manager = BlockManager(BLOCK, range(10))
    a, b = _seq("a"), _seq("b")
    manager.allocate(a, 20)
    manager.allocate(b, 20)
    assert not set(a.block_ids) & set(b.block_ids)


def test_free_returns_every_block() -> None:
    manager = BlockManager(BLOCK, range(10))
    seq = _seq()
    manager.allocate(seq, 30)
    manager.free(seq)
    assert manager.num_free_blocks == 10 and seq.block_ids == []


def test_usage_is_the_fraction_of_blocks_in_use() -> None:
    manager = BlockManager(BLOCK, range(8))
    manager.allocate(_seq(), 8)
    assert manager.usage == pytest.approx(0.25)


def test_allocation_beyond_the_free_blocks_is_refused() -> None:
    manager = BlockManager(BLOCK, range(2))
    seq = _seq()
    assert not manager.allocate(seq, 9)
    assert manager.num_free_blocks == 2 and seq.block_ids == []


def test_added_blocks_are_allocatable_and_removed_ones_are_not() -> None:
    manager = BlockManager(BLOCK, range(10, 12))
    manager.add_blocks(range(3))
    assert manager.num_total_blocks == 5
    manager.remove_blocks(range(3))
    seq = _seq()
    manager.allocate(seq, 8)
    assert sorted(seq.block_ids) == [10, 11]


def test_removing_a_block_in_use_is_refused_and_changes_nothing() -> None:
    manager = BlockManager(BLOCK, range(3))
    seq = _seq()
    manager.allocate(seq, 4)
    with pytest.raises(RuntimeError, match="in use"):
        manager.remove_blocks(range(3))
    assert manager.num_total_blocks == 3 and manager.num_free_blocks == 2


def test_adding_a_block_already_in_the_pool_is_refused() -> None:
    manager = BlockManager(BLOCK, range(3))
    with pytest.raises(ValueError):
        manager.add_blocks([2, 3])
