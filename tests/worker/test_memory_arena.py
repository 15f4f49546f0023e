"""Releasing a decoder layer's parameter bytes to the KV pool, and reclaiming them."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from conftest import make_prompts

from kunserve import LLM, SamplingParams
from kunserve.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture()
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), num_kv_blocks=64, max_model_len=256)


def test_release_adds_floor_of_layer_bytes_over_block_bytes_free_blocks(llm: LLM) -> None:
    engine = llm.engine
    layout = engine.executor.layout
    free_before = engine.block_manager.num_free_blocks
    added = engine.release_layer(1)
    assert added == layout.layer_bytes // layout.block_bytes
    assert added > 0
    assert engine.block_manager.num_free_blocks == free_before + added


def test_reclaim_removes_exactly_the_released_blocks(llm: LLM) -> None:
    engine = llm.engine
    before = engine.block_manager.num_free_blocks
    engine.release_layer(2)
    engine.reclaim_layer(2)
    assert engine.block_manager.num_free_blocks == before
    assert engine.block_manager.num_total_blocks == before


def test_released_blocks_are_the_layer_bytes_themselves(llm: LLM) -> None:
    """No copy, no allocation: each new KV block lies inside the layer's parameter bytes."""
    worker = llm.engine.executor.worker
    arena = worker.arena
    layer = arena.layers[0]
    lo = min(t.data_ptr() for t in layer.tensors().values())
    hi = max(t.data_ptr() + t.numel() * t.element_size() for t in layer.tensors().values())
    buffer_ptr = arena.buffer.data_ptr()
    llm.engine.release_layer(0)
    for block in arena.layout.released_blocks(0):
        start = arena.kv_cache[block].data_ptr()
        end = start + arena.layout.block_bytes
        assert lo <= start and end <= hi
        assert buffer_ptr <= start
    assert arena.buffer.data_ptr() == buffer_ptr


def test_reclaim_is_refused_while_a_released_block_holds_kv(llm: LLM) -> None:
    engine = llm.engine
    engine.release_layer(1)
    # Occupy every free block: the released ones are among them.
    manager = engine.block_manager
    seq = Sequence("hog", [0], GREEDY, max_total_tokens=1)
    manager.allocate(seq, manager.num_free_blocks * manager.block_size)
    with pytest.raises(RuntimeError, match="in use"):
        engine.reclaim_layer(1)
    manager.free(seq)
    engine.reclaim_layer(1)


def test_outputs_unchanged_after_release_kv_overwrite_reclaim_and_refill(llm: LLM) -> None:
    prompts = make_prompts(llm.engine.spec.vocab_size, (3, 30, 70))
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    engine = llm.engine
    arena = engine.executor.worker.arena
    blocks = list(engine.executor.layout.released_blocks(1))
    engine.release_layer(1)
    weights_before = arena.layers[1].qkv.clone()
    # While released the bytes belong to KV: write into them as the cache would.
    arena.kv_cache[blocks] = torch.randn_like(arena.kv_cache[blocks])
    assert not torch.equal(arena.layers[1].qkv, weights_before)
    engine.reclaim_layer(1)
    assert torch.equal(arena.layers[1].qkv, weights_before)
    after = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert after == before


def test_a_stage_with_a_released_layer_refuses_to_run(llm: LLM) -> None:
    llm.engine.release_layer(3)
    with pytest.raises(RuntimeError, match="released"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)


def test_new_kv_prefers_kv_region_blocks_over_released_layer_blocks(llm: LLM) -> None:
    """Allocation takes the highest block ids first, so released-layer blocks (low ids) stay
    free as long as possible and a reclaim can succeed sooner."""
    engine = llm.engine
    engine.release_layer(0)
    released = set(engine.executor.layout.released_blocks(0))
    seq = Sequence("probe", [0], GREEDY, max_total_tokens=1)
    engine.block_manager.allocate(seq, 10 * engine.config.block_size)
    assert not released & set(seq.block_ids)


def test_an_absolute_memory_budget_bounds_the_arena_and_the_stage_weights(llama_dir: Path) -> None:
    budget = 4 << 20
    llm = LLM(str(llama_dir), memory_budget_bytes=budget, max_model_len=256, max_num_batched_tokens=256,
              max_num_seqs=8)
    worker = llm.engine.executor.worker
    arena_bytes = worker.arena.buffer.numel() * worker.arena.buffer.element_size()
    stage = worker.model.stage
    stage_bytes = sum(t.numel() * t.element_size() for t in (stage.embed, stage.final_norm, stage.lm_head))
    assert arena_bytes + stage_bytes <= budget
    assert llm.engine.block_manager.num_total_blocks == worker.layout.num_initial_kv_blocks > 0


def test_a_budget_too_small_for_the_layers_is_refused(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="memory budget"):
        LLM(str(llama_dir), memory_budget_bytes=300_000, max_model_len=256, max_num_batched_tokens=64, max_num_seqs=4)


def test_shutting_an_engine_down_lets_go_of_its_arena(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), num_kv_blocks=16, max_model_len=64)
    arena = weakref.ref(llm.engine.executor.worker.arena.buffer)
    llm.engine.shutdown()
    llm.engine.shutdown()  # twice is fine
    assert arena() is None
