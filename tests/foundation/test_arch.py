"""Each architecture declares its decoder layer once (kunserve/arch/): the arena layout, the
weight views, the checkpoint loader and the dummy weights follow that declaration, and each
family reads its config.json as its checkpoints mean it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from kunserve.arch.registry import FAMILIES, HF_ARCHITECTURES, TINY_ARCHS, family
from kunserve.arch.spec import ModelSpec
from kunserve.layout import layer_param_slices
from kunserve.model.decoder import LayerWeights
from kunserve.model.presets import resolve_model
from kunserve.model.tiny import make_tiny_model
from kunserve.model.weights import DummyWeights

# A layer's slot in bfloat16 elements as layout.py packed it before the layer schema existed,
# e.g. Llama-3-8B: qkv 6144x4096 + o 4096x4096 + gate_up 28672x4096 + down 4096x14336 + 2 norms
# of 4096 = 218,112,000 (every tensor a multiple of the 128-element alignment).
PRESET_SLOT_ELEMS = {
    "llama-3-8b": 218_112_000,
    "llama-3.1-8b": 218_112_000,
    "mistral-7b": 218_112_000,
    "qwen2.5-7b": 233_057_792,  # with its 4608-element qkv bias
    "qwen2.5-32b": 487_605_248,
}
BF16_BYTES = 2
CHECKPOINT_LAYER = 1


def config(architecture: str, **edits: Any) -> dict[str, Any]:
    """A small config.json of `architecture`, with `edits`."""
    return {
        "architectures": [architecture],
        "vocab_size": 32,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **edits,
    }


def spec_of(name: str, **fields: Any) -> ModelSpec:
    """A spec of family `name`, with `fields` replaced."""
    hf_name = next(hf for hf, f in HF_ARCHITECTURES.items() if f.name == name)
    return dataclasses.replace(ModelSpec.from_dict(config(hf_name)), **fields)


def names(spec: ModelSpec) -> list[str]:
    return [t.name for t in spec.layer_tensors()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A two-layer tiny checkpoint of every family kunserve can build."""
    return {arch: make_tiny_model(tmp_path_factory.mktemp(arch), arch, num_layers=2) for arch in TINY_ARCHS}


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_with_both_biases_a_layer_declares_exactly_the_layer_weights_fields_in_order(name: str) -> None:
    assert names(spec_of(name, qkv_bias=True, o_bias=True)) == list(LayerWeights.__dataclass_fields__)


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_without_biases_a_layer_declares_the_fields_that_are_never_none(name: str) -> None:
    required = [n for n, f in LayerWeights.__dataclass_fields__.items() if "None" not in str(f.type)]
    assert names(spec_of(name, qkv_bias=False, o_bias=False)) == required


@pytest.mark.parametrize(("preset", "slot_elems"), PRESET_SLOT_ELEMS.items())
def test_preset_layer_slots_keep_their_size(preset: str, slot_elems: int) -> None:
    assert layer_param_slices(resolve_model(preset).spec, BF16_BYTES)[1] == slot_elems


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_the_schema_names_every_tensor_of_a_checkpoint_layer_and_no_other(
    arch: str, checkpoints: dict[str, Path]
) -> None:
    spec = ModelSpec.from_dir(checkpoints[arch])
    prefix = f"model.layers.{CHECKPOINT_LAYER}."
    with safe_open(checkpoints[arch] / "model.safetensors", framework="pt") as f:
        in_checkpoint = {k for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118 - safe_open is not iterable
    declared = [k for t in spec.layer_tensors() for k in t.checkpoint_keys(CHECKPOINT_LAYER)]
    assert sorted(declared) == sorted(in_checkpoint)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_layers_checkpoint_tensors_stacked_have_the_declared_shape(arch: str, checkpoints: dict[str, Path]) -> None:
    spec = ModelSpec.from_dir(checkpoints[arch])
    with safe_open(checkpoints[arch] / "model.safetensors", framework="pt") as f:
        for t in spec.layer_tensors():
            stacked = torch.cat([f.get_tensor(k) for k in t.checkpoint_keys(CHECKPOINT_LAYER)], dim=0)
            assert tuple(stacked.shape) == t.shape, t.name


def test_dummy_weights_set_the_norms_to_one_and_draw_the_other_tensors() -> None:
    spec = spec_of("qwen2")
    params, layer_elems = layer_param_slices(spec, torch.float32.itemsize)
    weights = LayerWeights.view(torch.zeros(layer_elems), params)
    DummyWeights(spec, seed=0).load_layer(0, weights)
    norms = {t.name for t in spec.layer_tensors() if t.is_norm}
    assert norms == {"input_norm", "post_attention_norm"}
    for name, tensor in weights.tensors().items():
        assert bool((tensor == 1).all()) == (name in norms), name


@pytest.mark.parametrize("hf_name", sorted(HF_ARCHITECTURES))
def test_every_supported_hf_architecture_parses_to_its_family(hf_name: str) -> None:
    assert ModelSpec.from_dict(config(hf_name)).family == HF_ARCHITECTURES[hf_name].name


def test_an_unknown_family_name_is_refused() -> None:
    with pytest.raises(ValueError, match="family"):
        family("gpt2")


@pytest.mark.parametrize("attention_bias", [False, True])
def test_qwen2_has_qkv_biases_and_no_o_bias_whatever_attention_bias_says(attention_bias: bool) -> None:
    spec = ModelSpec.from_dict(config("Qwen2ForCausalLM", attention_bias=attention_bias))
    assert (spec.qkv_bias, spec.o_bias) == (True, False)


@pytest.mark.parametrize("hf_name", ["LlamaForCausalLM", "MistralForCausalLM"])
@pytest.mark.parametrize("attention_bias", [False, True])
def test_llama_and_mistral_biases_follow_attention_bias(hf_name: str, attention_bias: bool) -> None:
    spec = ModelSpec.from_dict(config(hf_name, attention_bias=attention_bias))
    assert (spec.qkv_bias, spec.o_bias) == (attention_bias, attention_bias)


def test_qwen2_windows_the_layers_from_max_window_layers_on_when_asked() -> None:
    cfg = config("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=32, max_window_layers=2)
    assert ModelSpec.from_dict(cfg).sliding_windows == (None, None, 32, 32)


def test_qwen2_ignores_its_window_without_use_sliding_window() -> None:
    cfg = config("Qwen2ForCausalLM", use_sliding_window=False, sliding_window=32, max_window_layers=2)
    assert ModelSpec.from_dict(cfg).sliding_windows == (None,) * 4


def test_mistral_windows_every_layer() -> None:
    assert ModelSpec.from_dict(config("MistralForCausalLM", sliding_window=32)).sliding_windows == (32,) * 4


@pytest.mark.parametrize("hf_name", sorted(HF_ARCHITECTURES))
def test_layer_types_name_each_layers_attention_in_every_family(hf_name: str) -> None:
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    cfg = config(hf_name, sliding_window=32, layer_types=types, use_sliding_window=False)
    assert ModelSpec.from_dict(cfg).sliding_windows == (None, 32, None, 32)
