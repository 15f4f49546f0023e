"""What the engine needs to know about a model, parsed from a Hugging Face ``config.json``.

The raw JSON is read directly (not through ``transformers.AutoConfig``) so that both the
transformers-4 layout (``rope_theta`` + ``rope_scaling``) and the transformers-5 layout
(``rope_parameters``) load the same way on every installed transformers version. Where
families read a config differently, their modules in kunserve/arch/ say how.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kunserve.arch.family import Family
from kunserve.arch.registry import family, family_of
from kunserve.arch.schema import LayerTensor

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = tuple(_DTYPES)  # what a dtype setting may name


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype: unsupported value {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    kind: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    tie_word_embeddings: bool
    # Per decoder layer: the attention window in tokens, or None for full attention.
    sliding_windows: tuple[int | None, ...]
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_tensors(self) -> tuple[LayerTensor, ...]:
        """One decoder layer's parameters, as its family declares them (kunserve/arch/schema.py)."""
        return family(self.family).layer_tensors(self)

    # ---- tensor parallelism: what one of `tp_size` ranks holds ----------------------------

    def check_tensor_parallel(self, tp_size: int) -> None:
        """ValueError naming the field when `tp_size` ranks cannot split this model's layers:
        query heads and MLP channels must divide evenly; KV heads too, or be shared (t a
        multiple of them)."""
        if tp_size < 1:
            raise ValueError(f"tensor_parallel_size: must be >= 1, got {tp_size}")
        for tensor in self.layer_tensors():
            for part in tensor.parts:
                part.check(tp_size)

    def heads_per_rank(self, tp_size: int) -> int:
        return self.num_heads // tp_size

    def kv_heads_per_rank(self, tp_size: int) -> int:
        """KV heads each rank holds: its share, or one shared head with more ranks than heads."""
        return max(1, self.num_kv_heads // tp_size)

    def vocab_per_rank(self, tp_size: int) -> int:
        """Rows of the embedding and LM head each rank holds: rank r has vocab ids
        [r·n, (r+1)·n), the last rank's tail past the vocab zero padding."""
        return -(-self.vocab_size // tp_size)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelSpec:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"model: {str(model_dir)!r} is not a model directory (no config.json)")
        return cls.from_dict(json.loads(path.read_text()), _read_generation_eos(Path(model_dir)))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], extra_eos: tuple[int, ...] = ()) -> ModelSpec:
        arch = family_of(cfg.get("architectures") or [])
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: unsupported activation {cfg['hidden_act']!r}; expected 'silu'")
        if cfg.get("mlp_bias", False):
            raise ValueError("mlp_bias: MLP biases are not supported")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        num_layers = int(cfg["num_hidden_layers"])
        qkv_bias, o_bias = arch.attention_biases(cfg)
        return cls(
            family=arch.name,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(cfg),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_windows=_parse_sliding_windows(cfg, arch, num_layers),
            eos_token_ids=tuple(dict.fromkeys(_as_id_list(cfg.get("eos_token_id")) + list(extra_eos))),
            dtype=parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        )


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _read_generation_eos(model_dir: Path) -> tuple[int, ...]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return ()
    return tuple(_as_id_list(json.loads(path.read_text()).get("eos_token_id")))


def _parse_rope(cfg: dict[str, Any]) -> RopeSpec:
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_scaling: unsupported rope type {kind!r}; expected default, linear or llama3")
    return RopeSpec(
        theta=theta,
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _parse_sliding_windows(cfg: dict[str, Any], arch: Family, num_layers: int) -> tuple[int | None, ...]:
    """`layer_types`, where a config has it, names each layer's attention in every family;
    without it, the family's own rule applies."""
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        window = cfg.get("sliding_window")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return arch.sliding_windows(cfg, num_layers)
