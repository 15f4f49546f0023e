"""The CPU fast paths agree with the torch reference: decode attention compiled by TorchInductor
(kunserve/kernels/cpu_attention.py) and linears through oneDNN-packed weights
(kunserve/kernels/cpu_linear.py); where compilation fails, the reference runs instead."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attention_steps import DECODES_ONLY, MIXED, make_step
from conftest import make_prompts

from kunserve import LLM, EngineConfig, SamplingParams
from kunserve.kernels.attention import TorchAttentionBackend, make_attention_backend
from kunserve.kernels.cpu_attention import InductorAttentionBackend
from kunserve.kernels.cpu_linear import PackedLinear, make_linear, plain_linear

BLOCK_SIZE = 4
LAYER = 1
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def attend_both(
    seqs: list[tuple[int, int]], window: int | None, dtype: torch.dtype = torch.float32, group: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference output in float32, compiled backend's output) for one random step."""
    batch, arena, q, k, v = make_step(seqs, block_size=BLOCK_SIZE, dtype=dtype, group=group)
    ref, fast = TorchAttentionBackend(BLOCK_SIZE), InductorAttentionBackend(BLOCK_SIZE)
    ref_arena, fast_arena = arena.float(), arena.clone()
    ref_meta, fast_meta = ref.build_metadata(batch, q.device), fast.build_metadata(batch, q.device)
    ref.write_kv(ref_arena[:, LAYER], k.float(), v.float(), ref_meta)
    fast.write_kv(fast_arena[:, LAYER], k, v, fast_meta)
    expected = ref.attend(q.float(), ref_arena[:, LAYER], ref_meta, window)
    got = fast.attend(q, fast_arena[:, LAYER], fast_meta, window)
    skip_unless_compiled(fast)
    return expected, got


def skip_unless_compiled(backend: InductorAttentionBackend) -> None:
    """Without a C++ compiler the backend falls back to the reference (tested below), and a
    comparison with the reference would prove nothing."""
    if backend._decode is None:
        pytest.skip("TorchInductor could not compile here (no C++ compiler?)")


def assert_close(expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == expected.shape
    assert not torch.isnan(got).any()
    err = (got.float() - expected).abs().max().item()
    assert err < TOLERANCE[dtype], f"max abs error {err:.3g}"


@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window5"])
@pytest.mark.parametrize("group", [1, 4])
def test_compiled_decode_attention_matches_the_reference(window: int | None, group: int) -> None:
    expected, got = attend_both(DECODES_ONLY, window, group=group)
    assert_close(expected, got, torch.float32)


def test_compiled_decodes_in_a_mixed_step_match_the_reference() -> None:
    """Decodes go through the compiled kernel, the prefill chunks after them through SDPA."""
    expected, got = attend_both(MIXED, None)
    assert_close(expected, got, torch.float32)


def test_compiled_decode_attention_in_bfloat16_matches_the_float32_reference() -> None:
    expected, got = attend_both(DECODES_ONLY, None, dtype=torch.bfloat16)
    assert_close(expected, got, torch.bfloat16)


def test_compiled_decode_attention_takes_every_batch_and_block_count() -> None:
    """The batch size and block count are compiled as symbols: steps of other shapes (one
    sequence, more blocks) give the reference's result too."""
    for seqs in ([(1, 5)], [(1, 70), (1, 2)], DECODES_ONLY):
        expected, got = attend_both(seqs, None)
        assert_close(expected, got, torch.float32)


def test_a_failing_first_compilation_falls_back_to_the_reference(caplog: pytest.LogCaptureFixture) -> None:
    batch, arena, q, _, _ = make_step(DECODES_ONLY, block_size=BLOCK_SIZE)
    fast = InductorAttentionBackend(BLOCK_SIZE)

    def no_compiler(*args: object) -> torch.Tensor:
        raise RuntimeError("no C++ compiler")

    fast._decode = no_compiler
    meta = fast.build_metadata(batch, q.device)
    with caplog.at_level(logging.WARNING):
        got = fast.attend(q, arena[:, LAYER], meta, None)
    expected = TorchAttentionBackend(BLOCK_SIZE).attend(q, arena[:, LAYER], meta, None)
    assert torch.equal(got, expected)
    assert "using the torch reference" in caplog.text
    assert fast._decode is None  # later steps do not retry


def test_a_failure_after_a_successful_compilation_is_raised() -> None:
    batch, arena, q, _, _ = make_step(DECODES_ONLY, block_size=BLOCK_SIZE)
    fast = InductorAttentionBackend(BLOCK_SIZE)
    meta = fast.build_metadata(batch, q.device)
    calls = 0

    def works_once(*args: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("a bug")
        return torch.zeros_like(q)

    fast._decode = works_once
    fast.attend(q, arena[:, LAYER], meta, None)
    with pytest.raises(RuntimeError, match="a bug"):
        fast.attend(q, arena[:, LAYER], meta, None)


def test_compiled_attention_is_asked_for_by_name() -> None:
    """Compiling costs seconds per process, so CPU engines default to the reference."""
    cpu = torch.device("cpu")
    assert type(make_attention_backend("auto", BLOCK_SIZE, cpu)) is TorchAttentionBackend
    assert isinstance(make_attention_backend("inductor", BLOCK_SIZE, cpu), InductorAttentionBackend)


def test_compiled_attention_with_enforce_eager_is_refused() -> None:
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig(attention_backend="inductor", enforce_eager=True)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_packed_linear_matches_f_linear(with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=gen)
    bias = torch.randn(48, generator=gen) if with_bias else None
    linear = PackedLinear()
    for rows in (0, 1, 7, 300):
        x = torch.randn(rows, 32, generator=gen)
        torch.testing.assert_close(linear(x, weight, bias, "w"), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_packed_linear_takes_a_strided_input() -> None:
    """The attention output reaches the o projection as a reshaped view."""
    gen = torch.Generator().manual_seed(1)
    weight, wide = torch.randn(16, 32, generator=gen), torch.randn(5, 64, generator=gen)
    x = wide[:, ::2]
    assert not x.is_contiguous()
    torch.testing.assert_close(PackedLinear()(x, weight, None, "w"), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_packed_linear_packs_each_weight_once_by_its_key() -> None:
    """A pack is found by the weight's name in the model, not re-made per call: the bytes of
    two weights are counted once each however often they run."""
    gen = torch.Generator().manual_seed(2)
    first, second, x = torch.randn(8, 4, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(3, 4, generator=gen)
    linear = PackedLinear()
    for _ in range(3):
        linear(x, first, None, (0, "qkv"))
        linear(x, second, None, (1, "qkv"))
    assert linear.packed_bytes == (first.numel() + second.numel()) * 4


def test_packed_linear_keeps_its_pack_when_the_weights_memory_is_reused() -> None:
    """A drop hands a released layer's memory to KV blocks: the pack, made from the weight
    before, still computes with the weight's values."""
    gen = torch.Generator().manual_seed(3)
    slot = torch.randn(8, 4, generator=gen)
    original, x = slot.clone(), torch.randn(3, 4, generator=gen)
    linear = PackedLinear()
    linear(x, slot, None, (0, "o"))
    slot.zero_()  # the slot now holds KV
    torch.testing.assert_close(linear(x, slot, None, (0, "o")), F.linear(x, original), rtol=1e-5, atol=1e-5)


def test_linears_are_packed_when_asked_for() -> None:
    """Packing keeps a second copy of the weights beside the arena, so F.linear is the default."""
    cpu = torch.device("cpu")
    assert EngineConfig().linear_backend == "torch"
    assert make_linear("torch", cpu, torch.float32) is plain_linear
    assert isinstance(make_linear("onednn", cpu, torch.float32), PackedLinear)


@pytest.mark.parametrize(("device", "dtype"), [("cpu", torch.bfloat16), ("cuda", torch.float32)])
def test_packed_linears_elsewhere_than_float32_on_cpu_are_refused(device: str, dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="runs float32 on CPU"):
        make_linear("onednn", torch.device(device), dtype)


def test_an_unknown_linear_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="linear_backend"):
        EngineConfig(linear_backend="mkl")


def test_the_fast_cpu_paths_give_the_eager_engines_greedy_tokens(llama_dir: Path) -> None:
    """Compiled decode attention and packed linears against the reference paths (the CPU
    defaults), end to end, through prefill, decodes and growing block tables."""
    prompts = make_prompts(512, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    runs = []
    for fast in (True, False):
        options = {"attention_backend": "inductor", "linear_backend": "onednn"} if fast else {}
        llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=128, **options)
        model = llm.engine.executor.worker.model
        assert isinstance(model.linear, PackedLinear) == fast
        assert isinstance(model.backend, InductorAttentionBackend) == fast
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        if fast:
            skip_unless_compiled(model.backend)
    assert runs[0] == runs[1]
