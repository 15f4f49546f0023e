"""The Triton attention backend agrees with the torch reference backend.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported), on CPU tensors, at tiny shapes. Each case builds a random step: shuffled,
non-contiguous block ids, decodes first and then prefill chunks with prior context, and the KV
cache of one layer taken as `kv_cache[:, layer]` of a block-major 6-D arena, as the worker does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from attention_steps import DECODES_ONLY, MIXED, PREFILLS_ONLY, make_step

from kunserve.kernels.attention import TorchAttentionBackend
from kunserve.kernels.triton_attention import KernelConfig, TritonAttentionBackend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

def run_both(
    seqs: list[tuple[int, int]],
    window: int | None,
    *,
    layer: int = 1,
    decode_splits: int | None = None,
    tiles: KernelConfig | None = None,
    **step_args,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Writes the step's K/V and attends with both backends; returns (reference output,
    triton output, reference arena, triton arena). The reference runs in float32 on the same
    (rounded) inputs."""
    block_size = step_args.get("block_size", 4)
    batch, arena, q, k, v = make_step(seqs, device=DEVICE, **step_args)
    ref, tri = TorchAttentionBackend(block_size), TritonAttentionBackend(block_size, decode_splits=decode_splits, tiles=tiles)
    ref_arena, tri_arena = arena.float(), arena.clone()
    ref_meta = ref.build_metadata(batch, DEVICE)
    tri_meta = tri.build_metadata(batch, DEVICE)
    ref.write_kv(ref_arena[:, layer], k.float(), v.float(), ref_meta)
    tri.write_kv(tri_arena[:, layer], k, v, tri_meta)
    expected = ref.attend(q.float(), ref_arena[:, layer], ref_meta, window)
    got = tri.attend(q, tri_arena[:, layer], tri_meta, window)
    return expected, got, ref_arena, tri_arena


def assert_close(expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == expected.shape
    assert got.dtype == dtype
    assert not torch.isnan(got).any()
    err = (got.float() - expected).abs().max().item()
    assert err < TOLERANCE[dtype], f"max abs error {err:.3g} >= {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_write_kv_fills_the_slots_of_one_layer_of_the_arena(dtype: torch.dtype) -> None:
    block_size = 4
    batch, arena, _, k, v = make_step(MIXED, dtype=dtype, block_size=block_size, device=DEVICE)
    backend = TritonAttentionBackend(block_size)
    expected = arena.clone()
    written = arena.clone()
    backend.write_kv(written[:, 2], k, v, backend.build_metadata(batch, DEVICE))
    slots = torch.from_numpy(batch.slot_mapping).to(DEVICE)
    expected[slots // block_size, 2, 0, slots % block_size] = k
    expected[slots // block_size, 2, 1, slots % block_size] = v
    assert torch.equal(written, expected)  # bit-exact, and the other layers untouched


def test_write_kv_reads_strided_k_and_v() -> None:
    """k and v come out of the fused qkv projection as column slices (non-contiguous)."""
    block_size = 4
    batch, arena, _, k, v = make_step(MIXED, block_size=block_size, device=DEVICE)
    tokens, heads, dim = k.shape
    fused = torch.randn(tokens, 3 * heads * dim, device=DEVICE)
    fused[:, heads * dim : 2 * heads * dim] = k.reshape(tokens, -1)
    fused[:, 2 * heads * dim :] = v.reshape(tokens, -1)
    k_view = fused[:, heads * dim : 2 * heads * dim].view(tokens, heads, dim)
    v_view = fused[:, 2 * heads * dim :].view(tokens, heads, dim)
    assert not k_view.is_contiguous()
    backend = TritonAttentionBackend(block_size)
    meta = backend.build_metadata(batch, DEVICE)
    a, b = arena.clone(), arena.clone()
    backend.write_kv(a[:, 0], k, v, meta)
    backend.write_kv(b[:, 0], k_view, v_view, meta)
    assert torch.equal(a, b)


@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
def test_mixed_batch_matches_reference(group: int, window: int | None) -> None:
    expected, got, ref_arena, tri_arena = run_both(MIXED, window, group=group)
    assert torch.equal(ref_arena, tri_arena)
    assert_close(expected, got, torch.float32)


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("splits", [2, 5], ids=lambda s: f"splits{s}")
def test_split_k_decode_matches_reference(splits: int, window: int | None) -> None:
    """Flash-decoding path: some splits of the short sequences see no key at all."""
    expected, got, _, _ = run_both(DECODES_ONLY, window, group=4, decode_splits=splits)
    assert_close(expected, got, torch.float32)


def test_forced_tiles_match_reference() -> None:
    """Tiles of a sweep (here 16 rows and keys, smaller than every sequence's span) leave the
    result as the tuned ones do."""
    tiles = KernelConfig(16, 16, 1, 1, 16, 1, 1)
    assert TritonAttentionBackend(4, tiles=tiles)._config(DEVICE, 16, torch.float32) is tiles
    expected, got, _, _ = run_both(MIXED, 7, group=2, decode_splits=2, tiles=tiles)
    assert_close(expected, got, torch.float32)


def test_graph_buffers_and_step_metadata_attend_to_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode batch padded to its graph bucket splits its keys as the eager step does, so a
    graph replay and an eager step give bit-identical attention (a GPU's SM count, emulated,
    makes the plan split)."""
    batch, arena, q, _, _ = make_step(DECODES_ONLY, device=DEVICE)
    backend = TritonAttentionBackend(4)
    monkeypatch.setattr(backend, "_sm_count", lambda device: 16)
    eager_meta = backend.build_metadata(batch, DEVICE)
    eager = backend.attend(q, arena[:, 1], eager_meta, None)
    bucket = 8
    buffers = backend.decode_graph_buffers(bucket, batch.block_tables.shape[1], DEVICE)
    buffers.fill(batch)
    graph_meta = buffers.metadata(bucket)
    padded_q = torch.zeros((bucket, *q.shape[1:]), dtype=q.dtype, device=DEVICE)
    padded_q[: len(q)] = q
    replayed = backend.attend(padded_q, arena[:, 1], graph_meta, None)
    assert eager_meta.decode_splits == graph_meta.decode_splits
    assert min(eager_meta.decode_splits.values()) > 1
    assert torch.equal(replayed[: len(q)], eager)


@pytest.mark.parametrize("window", [None, 1, 6, 1000], ids=["full", "window1", "window6", "window1000"])
def test_prefill_only_batch_matches_reference(window: int | None) -> None:
    expected, got, _, _ = run_both(PREFILLS_ONLY, window, group=2)
    assert_close(expected, got, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_matches_reference(dtype: torch.dtype) -> None:
    expected, got, _, _ = run_both(MIXED, 7, group=2, dtype=dtype, decode_splits=3)
    assert_close(expected, got, dtype)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_head_dims_match_reference(head_dim: int) -> None:
    seqs = [(1, 20), (1, 7), (5, 25)]
    expected, got, _, _ = run_both(seqs, None, group=2, head_dim=head_dim, decode_splits=2)
    assert_close(expected, got, torch.float32)


def test_block_size_16_and_one_kv_head() -> None:
    seqs = [(1, 33), (1, 16), (17, 40), (16, 16)]
    expected, got, _, _ = run_both(seqs, 20, block_size=16, num_kv_heads=1, group=4, num_layers=2, layer=0)
    assert_close(expected, got, torch.float32)


def test_metadata_is_int32_on_the_device() -> None:
    batch, *_ = make_step(MIXED, device=DEVICE)
    meta = TritonAttentionBackend(4).build_metadata(batch, DEVICE)
    for t in (meta.slot_mapping, meta.context_lens, meta.query_start_loc, meta.block_tables):
        assert t.dtype == torch.int32 and t.device.type == DEVICE.type
        assert t.data_ptr() % 16 == 0  # kernels specialize on pointer alignment
    assert meta.query_start_loc.tolist() == [0, *np.cumsum(batch.query_lens).tolist()]
    assert meta.block_tables.tolist() == batch.block_tables.tolist()
    assert (meta.num_decodes, meta.num_prefills, meta.max_prefill_query_len) == (4, 3, 13)


def test_greedy_generation_matches_torch_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through the real arena and decoder: a sliding-window model, chunked prefill
    (mixed decode + prefill steps), same greedy tokens as with the torch backend."""
    pytest.importorskip("transformers")
    from kunserve import LLM, SamplingParams
    from kunserve.config import EngineConfig
    from kunserve.model.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "mistral", "mistral", num_layers=2)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["sliding_window"] = 12
    config_path.write_text(json.dumps(config))
    prompts = [[5, 9, 100, 7, 3, 44, 81, 2, 17, 60, 33, 12, 90, 11, 4, 8, 70, 21, 5], [300, 2, 41], [77]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    args = {"max_model_len": 64, "num_kv_blocks": 32, "max_num_batched_tokens": 8, "block_size": 4}

    def generate(backend: str) -> list[list[int]]:
        if "attention_backend" in EngineConfig.__dataclass_fields__:
            engine_args = {**args, "attention_backend": backend}
        else:  # an engine that always builds the torch backend
            engine_args = args
            if backend == "triton":
                monkeypatch.setattr("kunserve.worker.worker.TorchAttentionBackend", TritonAttentionBackend)
        llm = LLM(str(model_dir), **engine_args)
        worker = getattr(llm.engine.executor, "worker", None)  # the in-process executor's
        if worker is not None:
            assert type(worker.model.backend).__name__ == f"{backend.capitalize()}AttentionBackend"
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outputs]

    assert generate("triton") == generate("torch")
