"""The Llama-family decoder (Llama 2/3/3.1, Qwen2/2.5, Mistral), run as a layer range.

A `DecoderStage` holds layers [start, end) of the model: the embedding only when it is the
first stage, the final norm and LM head only when it is the last. Decoder-layer weights are
views into the device's memory arena (kunserve/worker/arena.py), so dropping a layer frees
its bytes without the model owning a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kunserve.kernels.attention import AttentionBackend
from kunserve.layout import ParamSlice
from kunserve.model.rotary import apply_rotary
from kunserve.model.spec import ModelSpec


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_attention_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def view(cls, slot: torch.Tensor, params: dict[str, ParamSlice]) -> "LayerWeights":
        """Views of one layer's parameters inside its arena slot (no copy)."""

        def param(name: str) -> torch.Tensor | None:
            p = params.get(name)
            return None if p is None else slot[p.offset : p.offset + p.numel].view(p.shape)

        return cls(**{name: param(name) for name in cls.__dataclass_fields__})  # type: ignore[arg-type]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for name in self.__dataclass_fields__ if (t := getattr(self, name)) is not None}


@dataclass
class StageWeights:
    """Parameters outside the arena: the embedding (first stage), final norm and LM head (last)."""

    embed: torch.Tensor | None
    final_norm: torch.Tensor | None
    lm_head: torch.Tensor | None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In float32, then back, as the reference checkpoints were trained.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class DecoderStage:
    def __init__(
        self,
        spec: ModelSpec,
        start: int,
        end: int,
        layers: list[LayerWeights],
        stage: StageWeights,
        kv_layers: list[torch.Tensor],
        cos_sin: torch.Tensor,
        backend: AttentionBackend,
    ) -> None:
        if not 0 <= start < end <= spec.num_layers:
            raise ValueError(f"layer range: [{start}, {end}) is not inside [0, {spec.num_layers})")
        self.spec = spec
        self.start, self.end = start, end
        self.layers = layers
        self.stage = stage
        self.kv_layers = kv_layers
        self.cos_sin = cos_sin
        self.backend = backend

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.spec.num_layers

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, attn_meta: object) -> torch.Tensor:
        """inputs: token ids [T] on the first stage, else hidden states [T, hidden]."""
        h = F.embedding(inputs, self.stage.embed) if self.is_first else inputs
        half = self.spec.head_dim // 2
        cos_sin = self.cos_sin[positions]
        cos, sin = cos_sin[:, :half], cos_sin[:, half:]
        for local, weights in enumerate(self.layers):
            window = self.spec.sliding_windows[self.start + local]
            h = self._layer(h, weights, self.kv_layers[local], cos, sin, attn_meta, window)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for the given rows of the last stage's output."""
        x = rms_norm(hidden, self.stage.final_norm, self.spec.rms_norm_eps)
        return F.linear(x, self.stage.lm_head).float()

    def _layer(
        self,
        h: torch.Tensor,
        w: LayerWeights,
        kv_layer: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_meta: object,
        window: int | None,
    ) -> torch.Tensor:
        spec = self.spec
        tokens = h.shape[0]
        x = rms_norm(h, w.input_norm, spec.rms_norm_eps)
        q, k, v = F.linear(x, w.qkv, w.qkv_bias).split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
        q = apply_rotary(q.view(tokens, spec.num_heads, spec.head_dim), cos, sin)
        k = apply_rotary(k.view(tokens, spec.num_kv_heads, spec.head_dim), cos, sin)
        v = v.view(tokens, spec.num_kv_heads, spec.head_dim)
        self.backend.write_kv(kv_layer, k, v, attn_meta)
        attn = self.backend.attend(q, kv_layer, attn_meta, window)
        h = h + F.linear(attn.reshape(tokens, spec.q_size), w.o, w.o_bias)
        x = rms_norm(h, w.post_attention_norm, spec.rms_norm_eps)
        gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, w.down)
