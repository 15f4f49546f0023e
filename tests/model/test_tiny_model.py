"""Specs for the embedded default model (kunserve/model/tiny.py)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kunserve.arch.registry import TINY_ARCHS
from kunserve.model.tiny import build_tokenizer, default_model_dir, make_tiny_model

EXPECTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """One default build per arch, shared by the read-only tests."""
    return {arch: make_tiny_model(tmp_path_factory.mktemp(arch), arch) for arch in TINY_ARCHS}


def read_config(model_dir: pathlib.Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_directory_loads_back_with_transformers_offline(built: dict[str, pathlib.Path], arch: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(built[arch], local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(built[arch], local_files_only=True)
    ids = tokenizer("The keeper wrote in her log.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    # Every id the tokenizer can emit must have an embedding row and a logit.
    assert len(tokenizer) == model.config.vocab_size
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_config_names_the_hf_architecture(built: dict[str, pathlib.Path], arch: str) -> None:
    assert read_config(built[arch])["architectures"] == [EXPECTED_ARCHITECTURES[arch]]


def test_special_token_ids_agree_across_config_generation_config_and_tokenizer(
    built: dict[str, pathlib.Path],
) -> None:
    model_dir = built["llama"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    for source in (read_config(model_dir), generation):
        assert source["bos_token_id"] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("<|bos|>")
        assert source["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|eos|>")
        assert source["pad_token_id"] == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|pad|>")


def test_same_seed_builds_byte_identical_weights_and_tokenizer(tmp_path: pathlib.Path) -> None:
    first = make_tiny_model(tmp_path / "a", "qwen2", seed=7)
    second = make_tiny_model(tmp_path / "b", "qwen2", seed=7)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_tokenizer_training_is_deterministic() -> None:
    assert build_tokenizer().get_vocab() == build_tokenizer().get_vocab()


def test_different_seeds_give_different_weights_and_the_same_tokenizer(tmp_path: pathlib.Path) -> None:
    first = make_tiny_model(tmp_path / "a", seed=0)
    second = make_tiny_model(tmp_path / "b", seed=1)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[name], b[name]) for name in a)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    "text",
    [
        "The lighthouse keeper wrote 17 lines.",
        "  leading and trailing spaces  \n\ttabs\r\nand newlines\n",
        "precomposed caf\u00e9 vs combining cafe\u0301, na\u00efve, \u00dcber",
        "\u4f60\u597d\u4e16\u754c, \u041f\u0440\u0438\u0432\u0435\u0442, \u0645\u0631\u062d\u0628\u0627",
        "emoji \U0001f916\U0001f680 and zero\u200bwidth, math \u2211\u221a\u03c0 \u2248 3.14",
        "def f(x):\n    return {'a': [1, 2, 3]} # <tag> & $5 ~ `code`",
        "",
    ],
)
def test_tokenizer_round_trips_arbitrary_text(text: str) -> None:
    tokenizer = build_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_does_not_add_bos_automatically() -> None:
    tokenizer = build_tokenizer()
    assert tokenizer.bos_token_id not in tokenizer.encode("hello world")


def test_chat_template_renders_turns_and_generation_prompt() -> None:
    tokenizer = build_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>\nBe brief.<|eos|>\n<|user|>\nHi!<|eos|>\n<|assistant|>\n"
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without_prompt == "<|system|>\nBe brief.<|eos|>\n<|user|>\nHi!<|eos|>\n"


def test_chat_markers_are_single_special_tokens() -> None:
    tokenizer = build_tokenizer()
    for marker in ("<|system|>", "<|user|>", "<|assistant|>", "<|eos|>"):
        assert len(tokenizer.encode(marker)) == 1


def test_unknown_arch_raises_value_error_naming_the_choices(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"arch.*llama.*qwen2.*mistral.*'gpt2'"):
        make_tiny_model(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="arch"):
        default_model_dir("gpt2")


def test_qwen2_ties_word_embeddings_by_default(built: dict[str, pathlib.Path]) -> None:
    assert read_config(built["qwen2"])["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(built["qwen2"] / "model.safetensors")


def test_llama_and_mistral_do_not_tie_by_default(built: dict[str, pathlib.Path]) -> None:
    for arch in ("llama", "mistral"):
        assert read_config(built[arch])["tie_word_embeddings"] is False
        assert "lm_head.weight" in load_file(built[arch] / "model.safetensors")


def test_tying_can_be_overridden(tmp_path: pathlib.Path) -> None:
    model_dir = make_tiny_model(tmp_path, "qwen2", tie_word_embeddings=False)
    assert read_config(model_dir)["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(model_dir / "model.safetensors")


def test_qwen2_has_nonzero_qkv_biases(built: dict[str, pathlib.Path]) -> None:
    tensors = load_file(built["qwen2"] / "model.safetensors")
    biases = [t for name, t in tensors.items() if name.endswith("_proj.bias")]
    assert biases and all(t.abs().min() > 0 for t in biases)


def test_weights_are_saved_in_the_requested_dtype(tmp_path: pathlib.Path) -> None:
    model_dir = make_tiny_model(tmp_path, dtype="bfloat16")
    assert {t.dtype for t in load_file(model_dir / "model.safetensors").values()} == {torch.bfloat16}
    assert read_config(model_dir)["dtype"] == "bfloat16"


def test_building_leaves_the_global_torch_rng_untouched(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    make_tiny_model(tmp_path)
    assert torch.equal(torch.rand(4), expected)


def test_default_model_dir_builds_once_under_kunserve_cache(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUNSERVE_CACHE", str(tmp_path))
    model_dir = default_model_dir("mistral")
    assert model_dir == tmp_path / "tiny-mistral"
    assert read_config(model_dir)["architectures"] == ["MistralForCausalLM"]
    weights_mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir("mistral") == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime
    # The temporary build directory was renamed into place, not left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-mistral"]
