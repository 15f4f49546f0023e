"""The embedded default model: a tiny, random, HF-format causal LM built locally.

Tests, demos and the default ``LLM()`` need a real model directory (config,
safetensors weights, tokenizer) without network access. This module generates
one deterministically from a seed: a byte-level BPE tokenizer trained on an
embedded corpus, and a small Llama/Qwen2/Mistral model with random weights.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedConfig, PreTrainedTokenizerFast

from kunserve.arch.family import TinyRecipe
from kunserve.arch.registry import TINY_ARCHS, family

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
# Listed first so they get the lowest, stable ids (0..5) in every vocab.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
)

# Each turn is "<|role|>\ncontent<|eos|>\n"; the generation prompt opens an
# assistant turn, and since turns end with eos, a generated reply stops at eos.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_CORPUS = """\
The lighthouse keeper wrote in her log every evening, long after the last boat
had come home. She noted the wind, the color of the water, and the number of
gulls that rested on the rail. Most nights nothing happened at all, and she
wrote that down too, because a quiet night is still a night worth counting.

In the valley below the hills, a small school opened its doors each morning at
eight o'clock. The children learned to read, to write, and to add long columns
of numbers. Their teacher liked to say that a question asked out loud is worth
more than an answer kept silent. On Fridays they planted beans, measured how
tall the plants had grown, and drew charts of the results.

A train left the city at 6:45 and arrived at the coast by 9:30, stopping at
twelve stations along the way. Passengers read newspapers, drank tea, and
watched the fields turn from green to gold. One man counted the bridges; there
were 17 of them, and he was very proud of knowing that.

Cooking is mostly patience. You chop the onions, warm the oil, and wait until
the kitchen smells right. Then you add the tomatoes, a pinch of salt, and a
little water. Let it simmer for 20 minutes, stir it now and then, and taste it
before you serve it. If it needs more salt, add more salt; if it needs more
time, give it more time.

The library kept its old maps in a wide wooden cabinet. Some showed rivers that
had since moved, roads that no longer existed, and towns with names nobody
remembered. Visitors would trace the lines with a finger and wonder what the
world had looked like to the people who drew them, one careful line at a time.

Questions and answers: What is the time? It is a quarter past three. Where are
you going? I am going to the market to buy bread, apples, and cheese. How much
does it cost? It costs $4.50, or about 4 euros. Can you help me? Yes, of course!

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 1024 2048 3.14159 -7 +42 1e-5
Punctuation: . , ; : ! ? ' " ( ) [ ] { } < > / \\ | @ # $ % ^ & * - _ = + ~ `
"""


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained locally (tokenizers library) on an embedded corpus; deterministic.

    vocab_size is an upper bound: the vocab always holds the 256 byte tokens and
    the 6 special tokens, and the embedded corpus yields at most about 900.
    """
    tokenizer = Tokenizer(models.BPE())
    # Byte-level pre-tokenization makes every string encodable and lets decode
    # reproduce the input exactly, unicode included.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Seed the full 256-byte alphabet, not just bytes seen in the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS], trainer=trainer)
    # No post-processor: encoding never inserts bos; callers/templates decide.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Byte-level BPE never needs unk. Saving an explicit null also stops
        # transformers' Qwen2Tokenizer (which AutoTokenizer forces for qwen2)
        # from appending its default "<|endoftext|>" past the model's vocab.
        unk_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def _recipe(arch: str) -> TinyRecipe:
    recipe = family(arch).tiny if arch in TINY_ARCHS else None
    if recipe is None:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    return recipe


def _make_config(
    recipe: TinyRecipe,
    tokenizer: PreTrainedTokenizerFast,
    num_layers: int,
    hidden_size: int,
    tie_word_embeddings: bool,
    dtype: str,
    num_kv_heads: int,
) -> PreTrainedConfig:
    num_heads = 4
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads must divide the {num_heads} query heads, got {num_kv_heads}")
    # Even head_dim is required by rotary embeddings.
    if hidden_size <= 0 or hidden_size % (2 * num_heads):
        raise ValueError(f"hidden_size must be a positive multiple of {2 * num_heads}, got {hidden_size}")
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        # ~8/3 * hidden rounded up to a multiple of 16 (176 for 64), like Llama's
        # SwiGLU sizing; deliberately not a power of two.
        "intermediate_size": -(-hidden_size * 8 // (3 * 16)) * 16,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,  # GQA by default: 2 query heads share each kv head
        "head_dim": hidden_size // num_heads,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": tie_word_embeddings,
        "dtype": dtype,
        "rope_parameters": {"rope_type": "default", "rope_theta": recipe.rope_theta},
        **recipe.extra,
    }
    if not recipe.takes_head_dim:
        del common["head_dim"]
    config_class: type[PreTrainedConfig] = getattr(transformers, recipe.config_class)
    return config_class(**common)


@torch.no_grad()
def _init_weights(model: torch.nn.Module, seed: int) -> None:
    # A private generator keeps the weights a function of the seed alone. Stds
    # are far above HF's 0.02 so next-token logits are peaked: top-1/top-2 gaps
    # must dwarf float summation-order noise between two implementations.
    generator = torch.Generator().manual_seed(seed)
    # Logit scale is set by the unembedding (pre-norm makes the embedding scale
    # nearly irrelevant), so it gets std 1.0 while inner projections keep 0.2,
    # which leaves attention soft rather than one-hot.
    vocab_matrices = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if name.endswith("bias"):
            param.copy_(0.1 * noise)
        elif param.ndim == 1:
            # RMSNorm weight: near 1, but not exactly, so a skipped or misapplied
            # norm weight changes the output.
            param.copy_(1.0 + 0.1 * noise)
        elif id(param) in vocab_matrices:
            param.copy_(noise)
        else:
            param.copy_(0.2 * noise)


def make_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    *,
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 512,
    tie_word_embeddings: bool | None = None,
    dtype: str = "float32",
    num_kv_heads: int = 2,
) -> pathlib.Path:
    """Write config.json, model.safetensors, generation_config.json and tokenizer files to out_dir."""
    recipe = _recipe(arch)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be one of ('float32', 'float16', 'bfloat16'), got {dtype!r}")
    if tie_word_embeddings is None:
        tie_word_embeddings = recipe.ties_word_embeddings
    out = pathlib.Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    config = _make_config(recipe, tokenizer, num_layers, hidden_size, tie_word_embeddings, dtype, num_kv_heads)
    # from_config draws its (discarded) init from the global RNG; fork it so the
    # caller's random state is left untouched. Weights are drawn in float32 so
    # every dtype holds a rounding of the same model.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def default_model_dir(arch: str = "llama") -> pathlib.Path:
    """The cached embedded default model, returned ready to load.

    Built on first use at $KUNSERVE_CACHE/tiny-<arch> (default root
    ~/.cache/kunserve); safe against two processes building at once, since each
    builds in a temp dir and then renames it into place atomically.
    """
    _recipe(arch)  # an unknown arch fails here, before the cache is touched
    cache = pathlib.Path(os.environ.get("KUNSERVE_CACHE") or pathlib.Path.home() / ".cache" / "kunserve")
    final = cache / f"tiny-{arch}"
    # The directory only ever appears by an atomic rename of a finished build,
    # so its existence means it is complete.
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    # The temp dir sits next to the target so the rename stays on one filesystem.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tiny-{arch}-", dir=cache))
    try:
        make_tiny_model(tmp, arch)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its build into place first; use that one.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
