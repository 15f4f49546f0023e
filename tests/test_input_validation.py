"""Bad input is refused with a ValueError that names the offending field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kunserve import LLM, SamplingParams


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
    [("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("top_k", -2), ("min_p", 1.5)],
)
def test_sampling_field_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


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
