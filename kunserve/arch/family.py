"""What an architecture module (kunserve/arch/llama.py, qwen2.py, mistral.py) declares.

A `Family` is everything kunserve needs to know about one architecture: the Hugging Face
architecture names it serves, how its config.json is read where families differ, its decoder
layer's tensors, and how to build a tiny random model of it. kunserve/arch/registry.py lists
the families; nothing else names one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kunserve.arch.schema import LayerDims, LayerTensor

# A config.json, as parsed from JSON.
HFConfig = Mapping[str, Any]


def attention_bias_flags(cfg: HFConfig) -> tuple[bool, bool]:
    """(qkv_bias, o_bias) as Llama and Mistral read them: both follow `attention_bias`."""
    bias = bool(cfg.get("attention_bias", False))
    return bias, bias


def uniform_windows(cfg: HFConfig, num_layers: int) -> tuple[int | None, ...]:
    """Every layer attends over `sliding_window` tokens (None: full attention)."""
    return (cfg.get("sliding_window"),) * num_layers


@dataclass(frozen=True)
class TinyRecipe:
    """How kunserve/model/tiny.py builds a tiny random model of a family with transformers."""

    config_class: str  # the transformers config class, by name: transformers is imported only to build one
    rope_theta: float
    takes_head_dim: bool = True  # False: the config class derives head_dim itself and takes no argument
    ties_word_embeddings: bool = False  # the default, as the family's small real checkpoints do
    # Further config arguments: what keeps a tiny model on full attention.
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    name: str  # ModelSpec.family, and the `tiny-<name>` preset
    hf_architectures: tuple[str, ...]  # config.json `architectures` entries it serves
    layer_tensors: Callable[[LayerDims], tuple[LayerTensor, ...]]
    tiny: TinyRecipe | None = None  # None: kunserve cannot build a tiny model of it
    # (qkv_bias, o_bias) from the config.
    attention_biases: Callable[[HFConfig], tuple[bool, bool]] = attention_bias_flags
    # Per layer, the attention window in tokens or None, from a config without `layer_types`
    # (which, where present, says it for every family).
    sliding_windows: Callable[[HFConfig, int], tuple[int | None, ...]] = uniform_windows
