"""The static-buffer decode path that CUDA graphs replay gives the same tokens as the eager
path. Without a GPU it runs uncaptured with the Triton kernels under the interpreter: the
CPU twin of graph replay (padding rows, bucketed sizes, one staged copy per step)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_prompts

from kunserve import LLM, SamplingParams
from kunserve.worker.cuda_graphs import graph_batch_sizes

pytest.importorskip("triton")


def test_graph_batch_sizes_cover_every_batch_up_to_the_maximum() -> None:
    sizes = graph_batch_sizes(40)
    assert sizes == [1, 2, 4, 8, 16, 32, 40]
    assert all(any(s >= b for s in sizes) for b in range(1, 41))


def test_graph_batch_sizes_include_every_power_of_two() -> None:
    """The Triton backend plans key splits from the batch rounded up to a power of two, which
    then equals the plan for the batch's bucket."""
    sizes = graph_batch_sizes(200)
    assert {1, 2, 4, 8, 16, 32, 64, 128} <= set(sizes)


def test_static_decode_path_matches_eager(llama_dir: Path) -> None:
    prompts = make_prompts(256, (3, 20, 9))  # 3 rows: padded up to the 4-row size
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = {}
    for eager in (True, False):
        llm = LLM(str(llama_dir), attention_backend="triton", enforce_eager=eager, num_kv_blocks=32,
                  max_model_len=64, max_num_seqs=8)
        assert (llm.engine.executor.worker.runner.graphs is None) == eager
        outputs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs[False] == outputs[True]
