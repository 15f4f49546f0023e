"""The CPU fast paths agree with the torch reference: decode attention and the KV write in C
(kunserve/kernels/cpu_attention.py), the fused elementwise steps in C (kunserve/kernels/cpu_fused.py),
both built by kunserve/kernels/native.py, and linears through oneDNN-packed weights
(kunserve/kernels/cpu_linear.py); where the C kernels cannot be built, the reference runs instead."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attention_steps import DECODES_ONLY, MIXED, make_step
from conftest import make_prompts

from kunserve import LLM, EngineConfig, SamplingParams
from kunserve.config import ATTENTION_BACKENDS
from kunserve.kernels import backends, cpu_fused, fused, native
from kunserve.kernels.attention import TorchAttentionBackend
from kunserve.kernels.backends import make_attention_backend
from kunserve.kernels.cpu_attention import CpuAttentionBackend
from kunserve.kernels.cpu_linear import Linear, PackedLinear, make_linear, onednn_linear, plain_linear

BLOCK_SIZE = 4
LAYER = 1
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def attend_both(
    seqs: list[tuple[int, int]], window: int | None, dtype: torch.dtype = torch.float32, group: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference output in float32, the C kernel backend's output) for one random step."""
    batch, arena, q, k, v = make_step(seqs, block_size=BLOCK_SIZE, dtype=dtype, group=group)
    ref, fast = TorchAttentionBackend(BLOCK_SIZE), CpuAttentionBackend(BLOCK_SIZE)
    skip_unless_built(fast)
    ref_arena, fast_arena = arena.float(), arena.clone()
    ref_meta, fast_meta = ref.build_metadata(batch, q.device), fast.build_metadata(batch, q.device)
    ref.write_kv(ref_arena[:, LAYER], k.float(), v.float(), ref_meta)
    fast.write_kv(fast_arena[:, LAYER], k, v, fast_meta)
    expected = ref.attend(q.float(), ref_arena[:, LAYER], ref_meta, window)
    got = fast.attend(q, fast_arena[:, LAYER], fast_meta, window)
    return expected, got


def skip_unless_built(backend: CpuAttentionBackend) -> None:
    """Without a C compiler the backend falls back to the reference (tested below), and a
    comparison with the reference would prove nothing."""
    if not backend.uses_kernel:
        pytest.skip("the C decode kernel could not be built here (no C compiler?)")


def assert_close(expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == expected.shape
    assert not torch.isnan(got).any()
    err = (got.float() - expected).abs().max().item() if got.numel() else 0.0
    assert err < TOLERANCE[dtype], f"max abs error {err:.3g}"


@pytest.fixture
def fresh_kernel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty kernel cache, and no library loaded in this process yet."""
    monkeypatch.setenv("KUNSERVE_CACHE_DIR", str(tmp_path))
    native.load_library.cache_clear()
    yield tmp_path / "native"
    native.load_library.cache_clear()


@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window5"])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_kernel_matches_the_reference(window: int | None, group: int) -> None:
    expected, got = attend_both(DECODES_ONLY, window, group=group)
    assert_close(expected, got, torch.float32)


def test_decodes_in_a_mixed_step_match_the_reference() -> None:
    """Decodes go through the C kernel, the prefill chunks after them through SDPA."""
    expected, got = attend_both(MIXED, None)
    assert_close(expected, got, torch.float32)


def test_decode_kernel_in_bfloat16_matches_the_float32_reference() -> None:
    expected, got = attend_both(DECODES_ONLY, None, dtype=torch.bfloat16)
    assert_close(expected, got, torch.bfloat16)


@pytest.mark.parametrize("seqs", [[(1, 1)], [(1, 5)], [(1, 70), (1, 2)], [(1, 33)] * 9], ids=str)
def test_decode_kernel_takes_any_batch_and_context(seqs: list[tuple[int, int]]) -> None:
    """One key, a partial last block, one long context beside a short one, many sequences."""
    expected, got = attend_both(seqs, None)
    assert_close(expected, got, torch.float32)


@pytest.mark.parametrize("window", [1, 4, 9, 200], ids=lambda w: f"window{w}")
def test_decode_kernel_windows_start_anywhere_in_a_block(window: int) -> None:
    """A window of one key, of exactly a block, cutting into a block, longer than the context."""
    expected, got = attend_both([(1, 70), (1, 3), (1, 17)], window)
    assert_close(expected, got, torch.float32)


def test_float16_decodes_run_the_reference() -> None:
    """The kernel reads float32 and bfloat16 only; float16 steps are not refused, they take the
    reference path."""
    batch, arena, q, _, _ = make_step(DECODES_ONLY, block_size=BLOCK_SIZE, dtype=torch.float16)
    fast = CpuAttentionBackend(BLOCK_SIZE)
    meta = fast.build_metadata(batch, q.device)
    expected = TorchAttentionBackend(BLOCK_SIZE).attend(q, arena[:, LAYER], meta, None)
    assert torch.equal(fast.attend(q, arena[:, LAYER], meta, None), expected)


def test_without_a_compiler_the_reference_runs(
    fresh_kernel_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.WARNING):
        fast = CpuAttentionBackend(BLOCK_SIZE)
    assert not fast.uses_kernel
    assert "using the torch reference" in caplog.text and "no C compiler" in caplog.text
    batch, arena, q, _, _ = make_step(DECODES_ONLY, block_size=BLOCK_SIZE)
    meta = fast.build_metadata(batch, q.device)
    expected = TorchAttentionBackend(BLOCK_SIZE).attend(q, arena[:, LAYER], meta, None)
    assert torch.equal(fast.attend(q, arena[:, LAYER], meta, None), expected)


def test_a_failing_build_says_what_failed(fresh_kernel_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(native.NativeBuildError, match="failed"):
        native.load_library("cpu_attention")
    assert not list(fresh_kernel_cache.glob("*.so"))  # nothing half-built is left to be loaded


def test_an_unwritable_cache_is_a_build_error(fresh_kernel_cache: Path) -> None:
    """Raised as NativeBuildError, so engines fall back to the reference instead of failing."""
    fresh_kernel_cache.parent.mkdir(parents=True, exist_ok=True)
    fresh_kernel_cache.write_text("a file where the cache directory should be")
    with pytest.raises(native.NativeBuildError, match="KUNSERVE_CACHE_DIR"):
        native.load_library("cpu_attention")


def test_a_built_kernel_is_reused_from_the_cache(fresh_kernel_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first process on a machine compiles; later ones load the cached library."""
    if not CpuAttentionBackend(BLOCK_SIZE).uses_kernel:
        pytest.skip("the C decode kernel could not be built here (no C compiler?)")
    (library,) = fresh_kernel_cache.glob("cpu_attention-*.so")
    native.load_library.cache_clear()

    def no_build(*args: object) -> None:
        raise AssertionError("rebuilt a cached kernel")

    monkeypatch.setattr(native, "_build", no_build)
    assert CpuAttentionBackend(BLOCK_SIZE).uses_kernel
    assert list(fresh_kernel_cache.glob("*.so")) == [library]


def test_a_changed_header_builds_a_new_library(
    fresh_kernel_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache key covers the headers the sources include, not only the sources."""
    if not CpuAttentionBackend(BLOCK_SIZE).uses_kernel:
        pytest.skip("the C decode kernel could not be built here (no C compiler?)")
    sources = tmp_path / "csrc"
    shutil.copytree(native.SOURCE_DIR, sources)
    monkeypatch.setattr(native, "SOURCE_DIR", sources)
    native.load_library.cache_clear()
    native.load_library("cpu_attention")
    before = set(fresh_kernel_cache.glob("cpu_attention-*.so"))
    with (sources / "dtype.h").open("a") as header:
        header.write("\n/* changed */\n")
    native.load_library.cache_clear()
    native.load_library("cpu_attention")
    assert len(before) == 1 and len(set(fresh_kernel_cache.glob("cpu_attention-*.so")) - before) == 1


def test_loading_the_kernel_keeps_denormal_floats() -> None:
    """-ffast-math reaches the compiler only: linked into the library, it would switch the whole
    process to flush denormals to zero when the library loads."""
    skip_unless_built(CpuAttentionBackend(BLOCK_SIZE))
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 2).item() > 0 and (tiny / 2).item() > 0


def test_cpu_engines_use_the_decode_kernel_by_default() -> None:
    assert isinstance(make_attention_backend("auto", BLOCK_SIZE, torch.device("cpu")), CpuAttentionBackend)
    assert type(make_attention_backend("torch", BLOCK_SIZE, torch.device("cpu"))) is TorchAttentionBackend


def test_the_cpu_kernel_on_a_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="runs on CPU devices"):
        make_attention_backend("cpu", BLOCK_SIZE, torch.device("cuda"))


def test_an_unknown_attention_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="inductor")


def test_the_config_accepts_exactly_the_registered_attention_backends_and_auto() -> None:
    assert set(ATTENTION_BACKENDS) == {"auto", *backends.ATTENTION_BACKENDS}


def test_an_unregistered_attention_backend_name_is_refused_by_the_registry() -> None:
    with pytest.raises(ValueError, match="attention_backend"):
        make_attention_backend("inductor", BLOCK_SIZE, torch.device("cpu"))


def test_the_kv_write_fills_the_slots_as_the_reference_does() -> None:
    batch, arena, _, k, v = make_step(MIXED, block_size=BLOCK_SIZE)
    ref, fast = TorchAttentionBackend(BLOCK_SIZE), CpuAttentionBackend(BLOCK_SIZE)
    skip_unless_built(fast)
    ref_arena, fast_arena = arena.clone(), arena.clone()
    ref.write_kv(ref_arena[:, LAYER], k, v, ref.build_metadata(batch, k.device))
    fast.write_kv(fast_arena[:, LAYER], k, v, fast.build_metadata(batch, k.device))
    assert torch.equal(fast_arena, ref_arena)  # the other layers' KV untouched too


# ---- fused elementwise steps in C -------------------------------------------------------------

FUSED_DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-5


@pytest.fixture
def c_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """fused.* through the C kernels (raising where they would not run)."""
    if not cpu_fused.available():
        pytest.skip("the fused C kernels could not be built here (no C compiler?)")
    monkeypatch.setattr(fused, "BACKEND", "cpu")


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
def test_c_add_rms_norm_matches_torch(dtype: torch.dtype, c_fused: None) -> None:
    """The residual sum is rounded as torch rounds it (bit-identical); the norm differs only by
    the order its squares are summed in."""
    x, residual = randn(9, 176, dtype=dtype, seed=1), randn(9, 176, dtype=dtype, seed=2, scale=4.0)
    weight = randn(176, dtype=dtype, seed=3, scale=0.1, shift=1.0)
    expected_normed, expected_residual = fused.add_rms_norm_torch(x, residual, weight, EPS)
    normed, new_residual = fused.add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(new_residual, expected_residual)
    assert_close(expected_normed.float(), normed, dtype)


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
def test_c_rms_norm_of_strided_rows_matches_torch(dtype: torch.dtype, c_fused: None) -> None:
    wide = randn(5, 300, dtype=dtype, seed=4)
    x, weight = wide[:, 20:276], randn(256, dtype=dtype, seed=5, shift=1.0)
    assert_close(fused.rms_norm_torch(x, weight, EPS).float(), fused.rms_norm(x, weight, EPS), dtype)


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
def test_c_rotary_is_bit_identical_to_torch_in_place_inside_qkv(dtype: torch.dtype, c_fused: None) -> None:
    """Products rounded before they are added, as torch's separate ops: no tolerance. q and k are
    the column slices of a fused qkv output that the decoder rotates in place."""
    tokens, q_heads, kv_heads, head_dim = 11, 4, 2, 16
    qkv = randn(tokens, q_heads + 2 * kv_heads, head_dim, dtype=dtype, seed=6)
    cos_sin = randn(64, head_dim, dtype=torch.float32, seed=7)
    positions = torch.randint(0, 64, (tokens,), generator=torch.Generator().manual_seed(8))
    expected = qkv.clone()
    fused.rotary_qk_torch(*expected.split([q_heads, kv_heads, kv_heads], dim=1)[:2], cos_sin, positions)
    q, k, _ = qkv.split([q_heads, kv_heads, kv_heads], dim=1)
    fused.rotary_qk(q, k, cos_sin, positions)
    assert torch.equal(qkv, expected)  # v untouched


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
def test_c_silu_mul_matches_torch(dtype: torch.dtype, c_fused: None) -> None:
    for rows in (0, 3, 700):  # none, a decode step's few, a prefill's many (split over threads)
        gate_up = randn(rows, 2 * 344, dtype=dtype, seed=9 + rows, scale=3.0)
        assert_close(fused.silu_mul_torch(gate_up).float(), fused.silu_mul(gate_up), dtype)


def test_auto_takes_the_c_kernels_for_cpu_tensors_they_read(monkeypatch: pytest.MonkeyPatch) -> None:
    if not cpu_fused.available():
        pytest.skip("the fused C kernels could not be built here (no C compiler?)")
    calls = []
    monkeypatch.setattr(cpu_fused, "silu_mul", lambda gate_up: calls.append(gate_up.dtype) or gate_up[..., :1])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        fused.silu_mul(torch.ones(2, 4, dtype=dtype))
    assert calls == [torch.float32, torch.bfloat16]  # float16 stays with torch


def test_asking_for_the_c_kernels_where_they_do_not_run_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="BACKEND is 'cpu'"):
        fused.silu_mul(torch.ones(2, 4, dtype=torch.float16))


def test_without_a_compiler_the_torch_versions_run(fresh_kernel_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    cpu_fused._kernels.cache_clear()
    try:
        gate_up = randn(3, 8, dtype=torch.float32, seed=12)
        assert not cpu_fused.available()
        assert torch.equal(fused.silu_mul(gate_up), fused.silu_mul_torch(gate_up))
    finally:
        cpu_fused._kernels.cache_clear()


def test_greedy_generation_with_the_c_kernels_matches_torch(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through the decoder (qkv views, positions, residual stream), prefill chunked
    so steps mix decodes and prefill chunks: fused steps and attention in C against torch."""
    if not cpu_fused.available():
        pytest.skip("the fused C kernels could not be built here (no C compiler?)")
    prompts = make_prompts(512, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    runs = []
    for backend in ("cpu", "torch"):
        monkeypatch.setattr(fused, "BACKEND", backend)
        llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=128, max_num_batched_tokens=16, attention_backend=backend)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1]


LINEARS = ("onednn", "onednn-packed")


def make_test_linear(name: str) -> Linear:
    return onednn_linear if name == "onednn" else PackedLinear()


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("name", LINEARS)
def test_onednn_linears_match_f_linear(name: str, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=gen)
    bias = torch.randn(48, generator=gen) if with_bias else None
    linear = make_test_linear(name)
    for rows in (0, 1, 7, 300):
        x = torch.randn(rows, 32, generator=gen)
        torch.testing.assert_close(linear(x, weight, bias, "w"), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LINEARS)
def test_onednn_linears_take_a_strided_input(name: str) -> None:
    """The attention output reaches the o projection as a reshaped view."""
    gen = torch.Generator().manual_seed(1)
    weight, wide = torch.randn(16, 32, generator=gen), torch.randn(5, 64, generator=gen)
    x = wide[:, ::2]
    assert not x.is_contiguous()
    torch.testing.assert_close(make_test_linear(name)(x, weight, None, "w"), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_the_in_place_onednn_linear_reads_the_weight_as_it_is_now() -> None:
    """No copy is kept: a weight view into an arena slot is read at each call, so a restore
    that writes new bytes into the slot is seen at once."""
    gen = torch.Generator().manual_seed(4)
    arena, x = torch.randn(1000, generator=gen), torch.randn(3, 8, generator=gen)
    weight = arena[200:264].view(8, 8)
    onednn_linear(x, weight, None, (0, "o"))
    weight.mul_(-2.0)
    torch.testing.assert_close(onednn_linear(x, weight, None, (0, "o")), F.linear(x, weight), rtol=1e-5, atol=1e-5)


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


def test_float32_cpu_workers_use_onednn_in_place_by_default() -> None:
    """Packing keeps a second copy of the weights beside the arena, so it is asked for by name."""
    cpu = torch.device("cpu")
    assert EngineConfig().linear_backend == "auto"
    assert make_linear("auto", cpu, torch.float32) is onednn_linear
    assert make_linear("auto", cpu, torch.bfloat16) is plain_linear
    assert make_linear("auto", torch.device("cuda"), torch.float32) is plain_linear
    assert make_linear("torch", cpu, torch.float32) is plain_linear
    assert isinstance(make_linear("onednn-packed", cpu, torch.float32), PackedLinear)


@pytest.mark.parametrize("name", LINEARS)
@pytest.mark.parametrize(("device", "dtype"), [("cpu", torch.bfloat16), ("cuda", torch.float32)])
def test_onednn_linears_elsewhere_than_float32_on_cpu_are_refused(name: str, device: str, dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="runs float32 on CPU"):
        make_linear(name, torch.device(device), dtype)


def test_an_unknown_linear_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="linear_backend"):
        EngineConfig(linear_backend="mkl")


def test_the_fast_cpu_paths_give_the_reference_engines_greedy_tokens(llama_dir: Path) -> None:
    """The C decode kernel and packed linears against the torch reference paths, end to end,
    through prefill, decodes and growing block tables. (The in-place oneDNN linear is the float32
    CPU default, so every other engine test here runs it.)"""
    prompts = make_prompts(512, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    runs = []
    for fast in (True, False):
        options = (
            {"attention_backend": "cpu", "linear_backend": "onednn-packed"}
            if fast
            else {"attention_backend": "torch", "linear_backend": "torch"}
        )
        llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=128, **options)
        model = llm.engine.executor.worker.model
        assert isinstance(model.linear, PackedLinear) == fast
        assert isinstance(model.backend, CpuAttentionBackend) == fast
        if fast:
            skip_unless_built(model.backend)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1]
