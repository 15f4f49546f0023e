"""The fused Triton kernels (kunserve/kernels/fused.py) agree with the torch code they replace.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported) on CPU tensors. The references are written out here as the decoder computed
them before fusion, so they also pin the torch versions, which must equal them bit for bit.

The interpreter rounds float32 -> bfloat16 by truncation (compiled kernels round to nearest
even, as torch does), so bfloat16 results are compared with a tolerance. float32 and float16
casts round as torch does there: results that involve no reduction and no transcendental (the
residual sum, rotary) must be bit-identical in those dtypes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kunserve.kernels import fused
from kunserve.kernels.fused import apply_rotary

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}  # rtol = atol
EPS = 1e-5


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "BACKEND", "triton")


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, generator=g)).to(dtype=dtype, device=DEVICE)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def reference_rotary(x: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    cs = cos_sin[positions]
    return apply_rotary(x, cs[:, :half], cs[:, half:])


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


# ---- (add +) RMSNorm ---------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [80, 176, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_matches_add_then_norm(dtype: torch.dtype, hidden: int, triton_backend: None) -> None:
    x = randn(7, hidden, dtype=dtype, seed=1)
    residual = randn(7, hidden, dtype=dtype, seed=2, scale=4.0)
    weight = randn(hidden, dtype=dtype, seed=3, scale=0.1, shift=1.0)
    h = x + residual
    expected = reference_rms_norm(h, weight, EPS)
    normed, new_residual = fused.add_rms_norm(x, residual, weight, EPS)
    if dtype == torch.bfloat16:
        assert_close(new_residual, h)
    else:
        assert torch.equal(new_residual, h)
    assert_close(normed, expected)
    assert fused.add_rms_norm_torch(x, residual, weight, EPS)[0].equal(expected)


@pytest.mark.parametrize("hidden", [80, 176])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_reference(dtype: torch.dtype, hidden: int, triton_backend: None) -> None:
    x = randn(5, hidden, dtype=dtype, seed=4, scale=3.0)
    weight = randn(hidden, dtype=dtype, seed=5, scale=0.1, shift=1.0)
    expected = reference_rms_norm(x, weight, EPS)
    assert_close(fused.rms_norm(x, weight, EPS), expected)
    assert fused.rms_norm_torch(x, weight, EPS).equal(expected)


def test_rms_norm_strided_rows_and_float32_weight(triton_backend: None) -> None:
    """Rows of a wider buffer (a row stride != hidden); a float32 weight promotes the output
    to float32, as `weight * x` does in torch."""
    wide = randn(6, 100, dtype=torch.float16, seed=6)
    x = wide[:, 10:90]
    weight = randn(80, dtype=torch.float32, seed=7, scale=0.1, shift=1.0)
    got = fused.rms_norm(x, weight, EPS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference_rms_norm(x, weight, EPS), rtol=1e-5, atol=1e-5)


def test_zero_rows(triton_backend: None) -> None:
    x = torch.empty(0, 80, device=DEVICE)
    normed, residual = fused.add_rms_norm(x, x, torch.ones(80, device=DEVICE), EPS)
    assert normed.shape == residual.shape == (0, 80)
    assert fused.silu_mul(torch.empty(0, 32, device=DEVICE)).shape == (0, 16)


# ---- rotary -----------------------------------------------------------------------------------


def fused_qkv(tokens: int, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """A fused qkv projection output and its q, k views (column slices: non-contiguous)."""
    qkv = randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed, scale=2.0)
    heads = qkv.view(tokens, q_heads + 2 * kv_heads, head_dim)
    q, k, _ = heads.split([q_heads, kv_heads, kv_heads], dim=1)
    assert not q.is_contiguous() and not k.is_contiguous()
    return qkv, q, k


@pytest.mark.parametrize(
    "q_heads,kv_heads,head_dim", [(4, 2, 16), (6, 3, 24), (8, 1, 64)], ids=["gqa2", "pad-heads-and-dim", "mqa"]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_qk_in_place_on_qkv_views(
    dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int, triton_backend: None
) -> None:
    tokens, max_pos = 5, 64
    cos_sin = randn(max_pos, head_dim, dtype=torch.float32, seed=8)
    # Positions as the CUDA-graph path passes them: an int64 row of a [2, T] staging buffer.
    staged = torch.tensor([[0] * tokens, [3, 0, 63, 17, 3]], dtype=torch.int64, device=DEVICE)
    positions = staged[1]
    qkv, q, k = fused_qkv(tokens, q_heads, kv_heads, head_dim, dtype, seed=9)
    expected_q, expected_k = reference_rotary(q, cos_sin, positions), reference_rotary(k, cos_sin, positions)
    v_before = qkv[:, (q_heads + kv_heads) * head_dim :].clone()

    got_q, got_k = fused.rotary_qk(q, k, cos_sin, positions)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    if dtype == torch.bfloat16:
        assert_close(got_q, expected_q)
        assert_close(got_k, expected_k)
    else:  # every product rounded, as torch's separate multiplies: bit-identical
        assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)
    assert torch.equal(qkv[:, (q_heads + kv_heads) * head_dim :], v_before)  # v untouched

    _, q2, k2 = fused_qkv(tokens, q_heads, kv_heads, head_dim, dtype, seed=9)
    fused.rotary_qk_torch(q2, k2, cos_sin, positions)
    assert torch.equal(q2, expected_q) and torch.equal(k2, expected_k)


# ---- SiLU-mul ---------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", [176, 1100])  # not a power of two; more than one block per row
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_matches_reference(dtype: torch.dtype, inner: int, triton_backend: None) -> None:
    gate_up = randn(3, 2 * inner, dtype=dtype, seed=10, scale=3.0)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    assert_close(fused.silu_mul(gate_up), expected)
    assert fused.silu_mul_torch(gate_up).equal(expected)


# ---- dispatch and the decoder -----------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dispatch")
def test_auto_backend_runs_no_triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors take the C kernels or torch (tests/kernels/test_cpu_kernels.py), never the interpreter."""
    monkeypatch.setattr(fused, "BACKEND", "auto")
    monkeypatch.setattr(fused, "_norm_triton", None)  # would fail if called
    x = randn(3, 80, dtype=torch.bfloat16, seed=11)
    w = randn(80, dtype=torch.bfloat16, seed=12)
    assert_close(fused.add_rms_norm(x, x, w, EPS)[0], reference_rms_norm(x + x, w, EPS))
    monkeypatch.setattr(fused, "BACKEND", "cuda")
    with pytest.raises(ValueError, match="BACKEND"):
        fused.rms_norm(x, w, EPS)


def test_greedy_generation_with_fused_kernels_matches_torch(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through the decoder (qkv views, positions, residual stream), prefill chunked
    so steps mix decodes and prefill chunks."""
    from kunserve import LLM, SamplingParams

    prompts = [[5, 9, 100, 7, 3, 44, 81, 2, 17, 60, 33], [300, 2, 41], [77]]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    launches = {"norm": 0, "rotary": 0, "silu": 0}

    def counted(name: str, fn):  # type: ignore[no-untyped-def]
        def wrapper(*args):  # type: ignore[no-untyped-def]
            launches[name] += 1
            return fn(*args)

        return wrapper

    monkeypatch.setattr(fused, "_norm_triton", counted("norm", fused._norm_triton))
    monkeypatch.setattr(fused, "_rotary_triton", counted("rotary", fused._rotary_triton))
    monkeypatch.setattr(fused, "_silu_mul_triton", counted("silu", fused._silu_mul_triton))

    def generate(backend: str) -> list[list[int]]:
        monkeypatch.setattr(fused, "BACKEND", backend)
        llm = LLM(str(llama_dir), max_model_len=64, num_kv_blocks=32, max_num_batched_tokens=8, block_size=4)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    expected = generate("torch")
    assert launches == {"norm": 0, "rotary": 0, "silu": 0}
    assert generate("triton") == expected
    assert all(launches.values())
