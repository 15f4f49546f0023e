"""Greedy outputs equal transformers' `generate` token for token,
also when prefill is chunked and when KV memory is so small that requests are preempted."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MODEL_VARIANTS, NUM_NEW_TOKENS, build_model_dir, make_prompts, reference_greedy

from kunserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
# KV for 480 tokens: the 8 requests (727 prompt tokens, 32 new tokens each) must take
# turns, so running requests get preempted. max_model_len is lowered to match.
SMALL_KV = {"num_kv_blocks": 30, "max_model_len": 400}
# The fast subset (-m "not slow") checks one architecture; the others are slow.
FAST_VARIANT = "llama"
VARIANTS = [pytest.param(name, marks=() if name == FAST_VARIANT else pytest.mark.slow) for name in sorted(MODEL_VARIANTS)]


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request: pytest.FixtureRequest, models_root: Path) -> tuple[Path, list[list[int]], list[list[int]]]:
    arch, build_kwargs, edits = MODEL_VARIANTS[request.param]
    model_dir = build_model_dir(models_root / request.param, arch, build_kwargs, edits)
    llm = LLM(str(model_dir), max_model_len=512, num_kv_blocks=64)
    prompts = make_prompts(llm.engine.spec.vocab_size)
    return model_dir, prompts, reference_greedy(model_dir, prompts)


def _generate(model_dir: Path, prompts: list[list[int]], **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(model_dir), **engine_args)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], llm


def test_greedy_equals_transformers(variant) -> None:
    model_dir, prompts, expected = variant
    got, _ = _generate(model_dir, prompts, max_model_len=512, num_kv_blocks=256)
    assert got == expected


def test_greedy_equals_transformers_with_16_token_prefill_chunks(variant) -> None:
    model_dir, prompts, expected = variant
    got, _ = _generate(model_dir, prompts, max_model_len=512, num_kv_blocks=256, max_num_batched_tokens=16)
    assert got == expected


def test_greedy_equals_transformers_under_preemption(variant) -> None:
    model_dir, prompts, expected = variant
    got, llm = _generate(model_dir, prompts, **SMALL_KV)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == expected


def test_all_blocks_free_after_the_load(variant) -> None:
    model_dir, prompts, _ = variant
    _, llm = _generate(model_dir, prompts, **SMALL_KV)
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_total_blocks
