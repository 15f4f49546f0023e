"""Bad input is refused with a ValueError that names the offending field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kunserve import LLM, EngineConfig, SamplingParams
from kunserve.config import PREEMPTION_MODES


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), num_kv_blocks=64, max_model_len=128)


def test_prompt_longer_than_max_model_len(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt.*max_model_len"):
        llm.generate([[1] * 129], use_tqdm=False)


def test_empty_prompt(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt.*empty"):
        llm.generate([[]], use_tqdm=False)


def test_empty_text_prompt(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt.*empty"):
        llm.generate("", use_tqdm=False)


def test_token_id_outside_the_vocabulary(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt.*vocabulary"):
        llm.generate([[1, llm.engine.spec.vocab_size]], use_tqdm=False)


def test_a_bad_prompt_queues_nothing(llm: LLM) -> None:
    with pytest.raises(ValueError):
        llm.generate([[1, 2], []], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("top_k", -2), ("min_p", 1.5),
     ("seed", 2**64), ("seed", 10**30), ("seed", -1), ("seed", -(2**63) - 1), ("temperature", math.nan),
     ("temperature", math.inf), ("temperature", 10**400), ("temperature", 1e39), ("top_p", math.nan), ("min_p", math.nan),
     ("top_k", 1.5), ("seed", "7"), ("max_tokens", 2.0), ("stop_token_ids", [-1]), ("stop", [3])],
)
def test_sampling_field_out_of_range(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_temperature_too_small_for_float32_logits_samples_greedily() -> None:
    assert SamplingParams(temperature=1e-30).is_greedy


def test_a_top_p_too_small_for_float32_keeps_the_top_token(llm: LLM) -> None:
    greedy, tiny_top_p = (
        llm.generate([[1, 2, 3]], SamplingParams(temperature=t, top_p=p, max_tokens=6, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0].token_ids
        for t, p in ((0.0, 1.0), (1.0, 1e-50))
    )
    assert tiny_top_p == greedy


@pytest.mark.parametrize("seed", [0, 2**64 - 1])
def test_seeds_at_both_ends_of_the_64_bit_range_sample(llm: LLM, seed: int) -> None:
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=4, ignore_eos=True)
    first, second = (llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids for _ in range(2))
    assert first == second and len(first) == 4


def test_top_k_beyond_the_vocabulary(llm: LLM) -> None:
    with pytest.raises(ValueError, match="top_k.*vocabulary"):
        llm.generate([[1, 2]], SamplingParams(top_k=llm.engine.spec.vocab_size + 1), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_a_stop_token_id_outside_the_vocabulary(llm: LLM) -> None:
    with pytest.raises(ValueError, match="stop_token_ids.*vocabulary"):
        llm.generate([[1, 2]], SamplingParams(stop_token_ids=[llm.engine.spec.vocab_size]), use_tqdm=False)


def test_request_that_can_never_fit_the_kv_cache(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), num_kv_blocks=8, max_model_len=1024)  # KV for 128 tokens
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([[1] * 10, [1] * 100], SamplingParams(max_tokens=64), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_unknown_model_path() -> None:
    with pytest.raises(ValueError, match="model"):
        LLM("/nonexistent/model/dir")


def test_unsupported_architecture(tmp_path: Path, llama_dir: Path) -> None:
    config = json.loads((llama_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architectures"):
        LLM(str(tmp_path))


def test_text_prompt_without_a_tokenizer(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=128, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate("hello", use_tqdm=False)


def test_unknown_dtype(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(llama_dir), dtype="float8", num_kv_blocks=64, max_model_len=128)


def test_an_unknown_preemption_mode_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="preemption_mode"):
        EngineConfig(preemption_mode="sometimes")


@pytest.mark.parametrize("mode", PREEMPTION_MODES)
def test_every_preemption_mode_is_accepted(mode: str) -> None:
    assert EngineConfig(preemption_mode=mode).preemption_mode == mode


def test_swap_and_auto_keep_a_host_swap_pool_and_recompute_does_not() -> None:
    assert {mode: EngineConfig(preemption_mode=mode).can_swap for mode in PREEMPTION_MODES} == {
        "recompute": False, "swap": True, "auto": True}
