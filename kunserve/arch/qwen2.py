"""Qwen2/2.5: Llama's layer with q/k/v biases always, and a window only on opted-in layers."""

from __future__ import annotations

from kunserve.arch.family import Family, HFConfig, TinyRecipe
from kunserve.arch.llama import llama_layer

QWEN2_ROPE_THETA = 1000000.0  # Qwen2's base frequency


def qwen2_attention_biases(cfg: HFConfig) -> tuple[bool, bool]:
    """q/k/v always carry biases; o never does (`attention_bias` adds nothing to it)."""
    return True, False


def qwen2_sliding_windows(cfg: HFConfig, num_layers: int) -> tuple[int | None, ...]:
    """Qwen2 applies its window only with use_sliding_window, from max_window_layers on."""
    if not cfg.get("use_sliding_window", False):
        return (None,) * num_layers
    window = cfg.get("sliding_window")
    first = int(cfg.get("max_window_layers", num_layers))
    return tuple(window if i >= first else None for i in range(num_layers))


QWEN2 = Family(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    layer_tensors=llama_layer,
    tiny=TinyRecipe(
        config_class="Qwen2Config",
        rope_theta=QWEN2_ROPE_THETA,
        takes_head_dim=False,
        ties_word_embeddings=True,
        extra={"use_sliding_window": False},
    ),
    attention_biases=qwen2_attention_biases,
    sliding_windows=qwen2_sliding_windows,
)
