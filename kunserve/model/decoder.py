"""The Llama-family decoder (Llama 2/3/3.1, Qwen2/2.5, Mistral), run as a layer range.

A `DecoderStage` holds layers [start, end) of the model: the embedding only when it is the
first stage, the final norm and LM head only when it is the last. Decoder-layer weights are
views into the device's memory arena (kunserve/worker/arena.py), so dropping a layer frees
its bytes without the model owning a copy (unless the linears are oneDNN-packed on CPU:
kunserve/kernels/cpu_linear.py). Under tensor parallelism a stage runs on each of its ranks
with that rank's shard of the weights and its KV heads (kunserve/model/parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kunserve.arch.spec import ModelSpec
from kunserve.kernels.attention import AttentionBackend
from kunserve.kernels.cpu_linear import Linear, plain_linear
from kunserve.kernels.fused import add_rms_norm, rms_norm, rotary_qk, silu_mul
from kunserve.layout import ParamSlice
from kunserve.model.parallel import SINGLE, TensorParallel


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
    def view(cls, slot: torch.Tensor, params: dict[str, ParamSlice]) -> LayerWeights:
        """Views of one layer's parameters inside its arena slot (no copy)."""

        def param(name: str) -> torch.Tensor | None:
            p = params.get(name)
            return None if p is None else slot[p.offset : p.offset + p.numel].view(p.shape)

        return cls(**{name: param(name) for name in cls.__dataclass_fields__})  # type: ignore[arg-type]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for name in self.__dataclass_fields__ if (t := getattr(self, name)) is not None}


@dataclass
class StageWeights:
    """Parameters outside the arena: the embedding (first stage), final norm and LM head (last);
    a tensor-parallel rank holds its slice of the embedding's and the LM head's vocab rows."""

    embed: torch.Tensor | None
    final_norm: torch.Tensor | None
    lm_head: torch.Tensor | None


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
        linear: Linear = plain_linear,
        tp: TensorParallel = SINGLE,
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
        self.linear = linear
        self.tp = tp
        # This rank's heads ([q, k, v] in its qkv rows), and o's bias added by one rank only,
        # since the all-reduce after o sums every rank's output.
        self.heads = [spec.heads_per_rank(tp.size)] + [spec.kv_heads_per_rank(tp.size)] * 2
        self.q_size = self.heads[0] * spec.head_dim
        self.adds_o_bias = tp.rank == 0

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.spec.num_layers

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, attn_meta: object) -> torch.Tensor:
        """inputs: token ids [T] on the first stage, else hidden states [T, hidden]."""
        h = self.embed(inputs) if self.is_first else inputs
        residual = None
        for local in range(len(self.layers)):
            h, residual = self._layer(local, h, residual, positions, attn_meta)
        return h + residual

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.tp.embed(token_ids, self.stage.embed)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for the given rows of the last stage's output."""
        x = rms_norm(hidden, self.stage.final_norm, self.spec.rms_norm_eps)
        logits = self.linear(x, self.stage.lm_head, None, "lm_head").float()
        if self.tp.size == 1:
            return logits
        return self.tp.gather_columns(logits)[:, : self.spec.vocab_size]

    def _layer(
        self, local: int, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, attn_meta: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local layer `local` on the residual stream. `h` is the previous layer's MLP output,
        added to `residual` by the fused add + norm (the stage's input when `residual` is None);
        returns this layer's MLP output and the residual stream before it is added."""
        qkv, residual = self.attention_inputs(local, h, residual, positions)
        q, k, v = self.split_qkv(qkv)
        kv_layer = self.kv_layers[local]
        self.backend.write_kv(kv_layer, k, v, attn_meta)
        attn = self.backend.attend(q, kv_layer, attn_meta, self.spec.sliding_windows[self.start + local])
        return self.attention_output(local, attn, residual)

    def attention_inputs(
        self, local: int, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first half of local layer `local`, up to attention: its qkv [T, q + 2 kv heads,
        head_dim] (q and k rotated to `positions`) and the residual stream."""
        w, layer, eps = self.layers[local], self.start + local, self.spec.rms_norm_eps
        if residual is None:
            x, residual = rms_norm(h, w.input_norm, eps), h
        else:
            x, residual = add_rms_norm(h, residual, w.input_norm, eps)
        qkv = self.linear(x, w.qkv, w.qkv_bias, (layer, "qkv")).view(h.shape[0], sum(self.heads), self.spec.head_dim)
        q, k, _ = self.split_qkv(qkv)
        rotary_qk(q, k, self.cos_sin, positions)  # in place, inside qkv
        return qkv, residual

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.split(self.heads, dim=1)
        return q, k, v

    def attention_output(
        self, local: int, attn: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The second half of local layer `local`, from attention's output [T, q heads,
        head_dim]: the MLP's output and the residual stream before it is added."""
        w, layer, eps, linear, tp = self.layers[local], self.start + local, self.spec.rms_norm_eps, self.linear, self.tp
        o_bias = w.o_bias if self.adds_o_bias else None
        o = tp.all_reduce(linear(attn.reshape(attn.shape[0], self.q_size), w.o, o_bias, (layer, "o")))
        x, residual = add_rms_norm(o, residual, w.post_attention_norm, eps)
        mlp = linear(silu_mul(linear(x, w.gate_up, None, (layer, "gate_up"))), w.down, None, (layer, "down"))
        return tp.all_reduce(mlp), residual
