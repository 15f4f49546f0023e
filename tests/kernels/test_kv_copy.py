"""Copying whole KV sub-blocks between arenas (the KV exchange's data path)."""

import pytest
import torch

from kunserve.kernels import kv_copy
from kunserve.kernels.kv_copy import copy_sub_blocks

# The Triton kernel runs under Triton's interpreter on CPU, where triton is installed.
NEEDS_TRITON = pytest.mark.skipif(kv_copy.triton is None, reason="triton is not installed (pip install -e '.[triton]')")


def make_arenas() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(12, 2, 3, 8, generator=generator).to(torch.bfloat16)
    dst = torch.randn(9, 2, 3, 8, generator=generator).to(torch.bfloat16)
    return src, dst


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_TRITON)])
def test_copy_moves_exactly_the_named_rows(backend: str) -> None:
    src, dst = make_arenas()
    before = dst.clone()
    src_ids, dst_ids = torch.tensor([7, 0, 11, 3]), torch.tensor([2, 8, 0, 5])
    copy_sub_blocks(src, src_ids, dst, dst_ids, backend=backend)
    assert torch.equal(dst[dst_ids], src[src_ids])
    untouched = [i for i in range(dst.shape[0]) if i not in dst_ids.tolist()]
    assert torch.equal(dst[untouched], before[untouched])


def test_copy_in_many_small_chunks_equals_one_copy() -> None:
    src, dst = make_arenas()
    chunked = dst.clone()
    src_ids, dst_ids = torch.tensor([7, 0, 11, 3, 5]), torch.tensor([2, 8, 0, 5, 1])
    copy_sub_blocks(src, src_ids, dst, dst_ids, backend="torch")
    one_row = src[0].numel() * src.element_size()
    copy_sub_blocks(src, src_ids, chunked, dst_ids, backend="torch", staging_bytes=2 * one_row)
    assert torch.equal(chunked, dst)


@NEEDS_TRITON
def test_copy_within_one_arena_moves_rows_in_place() -> None:
    _, arena = make_arenas()
    expected = arena[[1, 2]].clone()
    copy_sub_blocks(arena, torch.tensor([1, 2]), arena, torch.tensor([6, 7]), backend="triton")
    assert torch.equal(arena[[6, 7]], expected)


def test_copy_refuses_rows_of_different_shapes() -> None:
    src, _ = make_arenas()
    with pytest.raises(ValueError, match="rows differ"):
        copy_sub_blocks(src, torch.tensor([0]), torch.zeros(4, 2, 3, 4, dtype=torch.bfloat16), torch.tensor([0]))
