"""Model directories load as users keep them: single or sharded safetensors, with or without
a tokenizer; bare configs of real architectures load with dummy weights."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

from kunserve import LLM, SamplingParams
from kunserve.model.presets import config_presets, resolve_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SMALL = {"num_kv_blocks": 64, "max_model_len": 256}


def _greedy(model: str, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    llm = LLM(model, **SMALL, **kwargs)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_sharded_safetensors_with_index_load_like_a_single_file(llama_dir: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    prompts = make_prompts(256, (4, 50))
    assert _greedy(str(sharded), prompts) == _greedy(str(llama_dir), prompts)


def test_directory_without_a_tokenizer_serves_token_ids(llama_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(llama_dir).save_pretrained(bare)
    prompts = make_prompts(256, (4, 50))
    assert _greedy(str(bare), prompts, skip_tokenizer_init=True) == _greedy(str(llama_dir), prompts)


def test_text_prompts_are_tokenized_and_outputs_detokenized(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), **SMALL)
    out = llm.generate("Hello there", GREEDY, use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    assert out.prompt_token_ids == tokenizer.encode("Hello there")
    assert out.outputs[0].text == tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_dummy_weights_are_reproducible_for_a_seed(llama_dir: Path) -> None:
    prompts = make_prompts(256, (4, 20))
    first = _greedy(str(llama_dir), prompts, load_format="dummy", seed=3)
    assert _greedy(str(llama_dir), prompts, load_format="dummy", seed=3) == first


def test_every_real_architecture_preset_parses_and_sizes_its_layers() -> None:
    for name in config_presets():
        spec = resolve_model(name).spec
        assert spec.num_layers > 0 and spec.num_kv_heads <= spec.num_heads
        assert spec.hidden_size % spec.num_heads == 0


def test_bfloat16_engine_keeps_its_arena_in_bfloat16(llama_dir: Path) -> None:
    prompts = make_prompts(256, (10,))
    llm = LLM(str(llama_dir), dtype="bfloat16", **SMALL)
    assert llm.engine.executor.worker.arena.buffer.dtype == torch.bfloat16
    out = llm.generate(prompts, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert len(out) == GREEDY.max_tokens
