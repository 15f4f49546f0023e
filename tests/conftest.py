"""Shared fixtures: tiny random models of each supported architecture, built with
transformers, and their reference greedy outputs from transformers' own `generate`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter; it must be chosen before
# anything (transformers, through torch._dynamo) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoModelForCausalLM

from kunserve.model.tiny import make_tiny_model

NUM_NEW_TOKENS = 32
PROMPT_LENGTHS = (1, 5, 17, 40, 100, 200, 300, 64)

# Variants exercising what the decoder must get right beyond a plain model:
# GQA everywhere; qkv bias and tied/untied embeddings (Qwen2); a sliding window shorter
# than the prompts (Mistral); llama3 rope scaling with a short original context.
MODEL_VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "llama": ("llama", {}, {}),
    "llama3-rope": (
        "llama",
        {},
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}, {}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}, {}),
    "mistral-window": ("mistral", {}, {"sliding_window": 48}),
}


def build_model_dir(path: Path, arch: str, build_kwargs: dict, config_edits: dict) -> Path:
    """A tiny random model; `config_edits` are written into config.json, so transformers and
    kunserve both read them as they would a real checkpoint's config."""
    make_tiny_model(path, arch, **build_kwargs)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config.update(config_edits)
    config_path.write_text(json.dumps(config, indent=2))
    return path


def reference_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int = NUM_NEW_TOKENS) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=None,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def make_prompts(vocab_size: int, lengths: tuple[int, ...] = PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_dir(models_root: Path) -> Path:
    return build_model_dir(models_root / "llama-shared", "llama", {}, {})
