"""The swap preemption mode end to end: KV copied to host memory comes back bit for bit,
and requests preempted by swapping produce the tokens of an unloaded run, on one device
and through a two-stage pipeline of worker processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_prompts

from kunserve import LLM, SamplingParams
from kunserve.worker.swap import SwapSpace

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
LENGTHS = (1, 5, 17, 40, 100, 200, 300, 64)
# KV for 480 tokens: the 8 requests must take turns, so the youngest get preempted.
SMALL_KV = {"num_kv_blocks": 30, "max_model_len": 400}


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_swapped_kv_comes_back_bit_for_bit_into_other_blocks() -> None:
    kv = torch.randn(12, 2, 4, 2, 8)
    original = kv.clone()
    swap = SwapSpace(kv, num_blocks=6)
    swap.apply(np.array([[3, 5], [4, 0], [9, 1]]), np.empty((0, 2), np.int64), np.empty(0, np.int64))
    kv[[3, 4, 9]] = float("nan")
    swap.apply(np.empty((0, 2), np.int64), np.array([[5, 10], [0, 11], [1, 2]]), np.empty(0, np.int64))
    assert torch.equal(kv[[10, 11, 2]], original[[3, 4, 9]])


def test_outputs_under_swap_preemption_equal_an_unloaded_run(llama_dir: Path) -> None:
    unloaded = LLM(str(llama_dir), max_model_len=400, num_kv_blocks=256)
    prompts = make_prompts(unloaded.engine.spec.vocab_size, LENGTHS)
    swapping = LLM(str(llama_dir), preemption_mode="swap", **SMALL_KV)
    assert _tokens(swapping, prompts) == _tokens(unloaded, prompts)
    scheduler = swapping.engine.scheduler
    assert scheduler.num_swap_outs > 0 and scheduler.swap_pool.num_free_blocks == scheduler.swap_pool.num_total_blocks


@pytest.mark.slow  # a pipeline of worker processes
def test_a_pipeline_swaps_each_stages_kv_and_keeps_the_outputs(llama_dir: Path) -> None:
    unloaded = LLM(str(llama_dir), max_model_len=400, num_kv_blocks=256)
    prompts = make_prompts(unloaded.engine.spec.vocab_size, LENGTHS)
    pipeline = LLM(str(llama_dir), preemption_mode="swap", pipeline_parallel_size=2, worker_threads=1, **SMALL_KV)
    try:
        assert _tokens(pipeline, prompts) == _tokens(unloaded, prompts)
        assert pipeline.engine.scheduler.num_swap_outs > 0
    finally:
        pipeline.engine.shutdown()
