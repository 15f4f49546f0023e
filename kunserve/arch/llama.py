"""Llama 2/3/3.1: the decoder layer the other families share."""

from __future__ import annotations

from kunserve.arch.family import Family, TinyRecipe
from kunserve.arch.schema import COLUMN, ROW, LayerDims, LayerTensor, ShardUnits

LLAMA_ROPE_THETA = 10000.0  # Llama 2's base frequency; tiny Llama and Mistral models use it


def llama_layer(dims: LayerDims) -> tuple[LayerTensor, ...]:
    """A pre-norm layer with GQA attention and a SwiGLU MLP, its projections fused so each is
    one GEMM: q/k/v into `qkv`, gate/up into `gate_up`. Optional biases follow the spec.
    Tensor parallelism splits attention by heads (q/k/v by rows, o by columns) and the MLP by
    channels (gate/up by rows, down by columns); o's bias and the norms are replicated."""
    hidden, inter = dims.hidden_size, dims.intermediate_size
    qkv_rows = dims.q_size + 2 * dims.kv_size
    attn, mlp = "self_attn.", "mlp."
    q_heads = ShardUnits("num_attention_heads", dims.num_heads, dims.head_dim)
    kv_heads = ShardUnits("num_key_value_heads", dims.num_kv_heads, dims.head_dim, shared=True)
    channels = ShardUnits("intermediate_size", inter)
    qkv_parts = (q_heads, kv_heads, kv_heads)
    tensors = [
        LayerTensor("input_norm", (hidden,), ("input_layernorm.weight",), is_norm=True),
        LayerTensor("qkv", (qkv_rows, hidden), tuple(f"{attn}{x}_proj.weight" for x in "qkv"), split=COLUMN,
                    parts=qkv_parts),
    ]
    if dims.qkv_bias:
        tensors.append(LayerTensor("qkv_bias", (qkv_rows,), tuple(f"{attn}{x}_proj.bias" for x in "qkv"),
                                   split=COLUMN, parts=qkv_parts))
    tensors.append(LayerTensor("o", (hidden, dims.q_size), (f"{attn}o_proj.weight",), split=ROW, parts=(q_heads,)))
    if dims.o_bias:
        tensors.append(LayerTensor("o_bias", (hidden,), (f"{attn}o_proj.bias",)))
    tensors += [
        LayerTensor("post_attention_norm", (hidden,), ("post_attention_layernorm.weight",), is_norm=True),
        LayerTensor("gate_up", (2 * inter, hidden), (f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight"),
                    split=COLUMN, parts=(channels, channels)),
        LayerTensor("down", (hidden, inter), (f"{mlp}down_proj.weight",), split=ROW, parts=(channels,)),
    ]
    return tuple(tensors)


LLAMA = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    layer_tensors=llama_layer,
    tiny=TinyRecipe(config_class="LlamaConfig", rope_theta=LLAMA_ROPE_THETA),
)
