"""`LLM` lets go of its devices as vLLM's does: on `shutdown()`, at the end of a `with` block
and once deleted (its worker processes too), so a second LLM of the same process finds the
memory free; and a budget too small for the model says what takes the memory."""

from __future__ import annotations

import gc
import os
import signal
import weakref
from pathlib import Path

import pytest
import torch

from kunserve import LLM, SamplingParams

ENGINE_ARGS = {"num_kv_blocks": 16, "max_model_len": 64}
GREEDY = SamplingParams(temperature=0.0, max_tokens=2)
# What the second LLM on a GPU must get of the first one's KV blocks: the kernels the first loaded stay.
SAME_BLOCKS_FRACTION = 0.99


def arena_of(llm: LLM) -> weakref.ref[torch.Tensor]:
    return weakref.ref(llm.engine.executor.worker.arena.buffer)


def test_nothing_keeps_a_deleted_llms_arena(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), **ENGINE_ARGS)
    arena = arena_of(llm)
    del llm
    gc.collect()  # what sizing the next engine's arena does first, on a GPU
    assert arena() is None


def test_a_deleted_llms_worker_processes_exit(llama_dir: Path) -> None:
    # Properties of worker processes, not of a device: two CPU stages, on a host with one GPU too.
    llm = LLM(str(llama_dir), **ENGINE_ARGS, pipeline_parallel_size=2, worker_threads=1, device="cpu")
    processes = [handle.process for handle in llm.engine.executor.workers.handles]
    del llm
    gc.collect()
    assert not any(process.is_alive() for process in processes)


def test_a_ctrl_c_reaching_a_worker_process_leaves_it_serving(llama_dir: Path) -> None:
    # A terminal's Ctrl-C reaches every process of its group; the driver decides what stops.
    with LLM(str(llama_dir), **ENGINE_ARGS, pipeline_parallel_size=2, worker_threads=1, device="cpu") as llm:
        for handle in llm.engine.executor.workers.handles:
            os.kill(handle.process.pid, signal.SIGINT)
        assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_an_engine_taken_from_an_llm_keeps_working(llama_dir: Path) -> None:
    engine = LLM(str(llama_dir), **ENGINE_ARGS).engine
    engine.add_request("r", [1, 2, 3], GREEDY)
    while engine.has_unfinished_requests():
        engine.step()


def test_shutdown_frees_the_arena(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), **ENGINE_ARGS)
    arena = arena_of(llm)
    llm.shutdown()
    assert arena() is None


def test_shutdown_twice_is_harmless(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), **ENGINE_ARGS)
    llm.shutdown()
    llm.shutdown()


def test_generating_after_shutdown_says_the_llm_is_shut_down(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), **ENGINE_ARGS)
    llm.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[1, 2, 3]], GREEDY)


def test_a_with_block_frees_the_arena_at_its_end(llama_dir: Path) -> None:
    with LLM(str(llama_dir), **ENGINE_ARGS) as llm:
        assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 2
        arena = arena_of(llm)
    assert arena() is None


def test_a_budget_too_small_names_what_takes_the_memory(llama_dir: Path) -> None:
    with pytest.raises(ValueError) as refused:
        LLM(str(llama_dir), memory_budget_bytes=300_000, max_model_len=256, max_num_batched_tokens=64, max_num_seqs=4)
    message = str(refused.value)
    for part in ("memory_budget_bytes=300000", "embeddings and LM head", "max_num_batched_tokens=64",
                 "max_num_seqs=4", "one KV block"):
        assert part in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device memory a second LLM finds is a GPU's")
def test_a_second_llm_on_a_gpu_gets_the_kv_blocks_the_first_had(llama_dir: Path) -> None:
    first = LLM(str(llama_dir), max_model_len=256, gpu_memory_utilization=0.5)
    blocks = first.engine.block_manager.num_total_blocks
    del first
    second = LLM(str(llama_dir), max_model_len=256, gpu_memory_utilization=0.5)
    assert second.engine.block_manager.num_total_blocks >= blocks * SAME_BLOCKS_FRACTION
    second.shutdown()
