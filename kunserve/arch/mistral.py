"""Mistral: Llama's layer, with one attention window (`sliding_window`) on every layer."""

from __future__ import annotations

from kunserve.arch.family import Family, TinyRecipe
from kunserve.arch.llama import LLAMA_ROPE_THETA, llama_layer

MISTRAL = Family(
    name="mistral",
    hf_architectures=("MistralForCausalLM",),
    layer_tensors=llama_layer,
    # Plain full attention: a tiny default model should not need windowed kernels.
    tiny=TinyRecipe(config_class="MistralConfig", rope_theta=LLAMA_ROPE_THETA, extra={"sliding_window": None}),
)
