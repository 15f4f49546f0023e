"""The static-buffer path that replays a prompt step's layer halves from CUDA graphs (attention
eager between them) gives the same tokens as the eager path. Without a GPU it runs uncaptured:
the CPU twin of the replay (padding rows up to a captured size, the halves' static buffers, a
later stage's hidden input, steps past the largest size left eager)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_prompts

from kunserve import LLM, SamplingParams
from kunserve.worker.prompt_graphs import prompt_graph_sizes

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def generate(model_dir: Path, prompt_graph_max_tokens: int, prompts: list[list[int]], **engine_args: object
             ) -> list[list[int]]:
    llm = LLM(str(model_dir), prompt_graph_max_tokens=prompt_graph_max_tokens, num_kv_blocks=64,
              max_model_len=96, max_num_seqs=8, **engine_args)
    assert (llm.engine.executor.worker.runner.prompt_graphs is None) == (prompt_graph_max_tokens == 0)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_prompt_graph_sizes_cover_every_token_count_up_to_the_largest() -> None:
    sizes = prompt_graph_sizes(100)
    assert sizes == [16, 32, 64, 100]
    assert all(any(s >= t for s in sizes) for t in range(1, 101))


def test_a_largest_size_below_the_smallest_power_is_the_only_size() -> None:
    assert prompt_graph_sizes(8) == [8]


def test_prompt_steps_through_the_static_buffers_match_eager(llama_dir: Path) -> None:
    prompts = make_prompts(256, (3, 20, 9, 31))  # steps of 63 tokens and fewer, padded to 64
    assert generate(llama_dir, 64, prompts) == generate(llama_dir, 0, prompts)


def test_steps_past_the_largest_size_run_eagerly_among_graphed_ones(llama_dir: Path) -> None:
    prompts = make_prompts(256, (40, 5, 70))  # the first step's 115 tokens are past 32
    assert generate(llama_dir, 32, prompts, max_num_batched_tokens=128) == generate(
        llama_dir, 0, prompts, max_num_batched_tokens=128)


def test_prompt_steps_with_the_triton_kernels_match_eager(llama_dir: Path) -> None:
    pytest.importorskip("triton")
    prompts = make_prompts(256, (3, 17))
    assert generate(llama_dir, 32, prompts, attention_backend="triton") == generate(
        llama_dir, 0, prompts, attention_backend="triton")


def test_a_later_pipeline_stage_takes_its_hidden_input_through_the_static_buffers(llama_dir: Path) -> None:
    prompts = make_prompts(256, (3, 20, 9, 31))

    def pipeline_tokens(prompt_graph_max_tokens: int) -> list[list[int]]:
        with LLM(str(llama_dir), pipeline_parallel_size=2, worker_threads=1, num_kv_blocks=64, max_model_len=96,
                 max_num_seqs=8, prompt_graph_max_tokens=prompt_graph_max_tokens) as llm:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]

    assert pipeline_tokens(64) == pipeline_tokens(0)
