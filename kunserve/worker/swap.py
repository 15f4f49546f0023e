"""Host memory for the KV of swapped-out requests (the `swap` preemption mode), and the
copies a step carries between it and the arena's KV blocks.

A step's swap-outs and swap-ins are batched: consecutive block pairs are coalesced into
one copy each. On a GPU the host pool is pinned and each direction has its own copy stream,
so the two directions overlap each other and a swap-out overlaps the step's compute unless
the step writes into one of the blocks it is reading out. The step's compute waits only for
what it needs: its swap-ins (it reads that KV), and the swap-outs whose blocks it or a later
step overwrites. On CPU (tests) the copies are plain and immediate: the same code path.
"""

from __future__ import annotations

import numpy as np
import torch


class SwapSpace:
    def __init__(self, kv_cache: torch.Tensor, num_blocks: int) -> None:
        """`kv_cache`: the arena's [blocks, ...] view; the host pool holds `num_blocks` of them."""
        self.kv_cache = kv_cache
        device = kv_cache.device
        self.cuda = device.type == "cuda"
        self.host = torch.empty((num_blocks, *kv_cache.shape[1:]), dtype=kv_cache.dtype, pin_memory=self.cuda)
        self._out_stream = torch.cuda.Stream(device) if self.cuda else None
        self._in_stream = torch.cuda.Stream(device) if self.cuda else None
        self._out_done: torch.cuda.Event | None = None  # the last swap-out's copies
        self._in_done: torch.cuda.Event | None = None

    @property
    def num_blocks(self) -> int:
        return self.host.shape[0]

    def regroup(self, kv_cache: torch.Tensor) -> None:
        """Address the arena as `kv_cache` from now on (a drop's stage sees it as sub-blocks of
        its layers, kunserve/worker/drop.py): the host pool's bytes are seen the same way, so
        it holds as many more (smaller) blocks. Only while it holds no swapped KV: the control
        plane hands swapped requests over for recompute before a group forms or changes."""
        if self.cuda:
            torch.cuda.synchronize(kv_cache.device)  # copies under way finish under the old view
        self.kv_cache = kv_cache
        self.host = self.host.view(-1, *kv_cache.shape[1:])

    def apply(self, swap_out: np.ndarray, swap_in: np.ndarray, written_blocks: np.ndarray) -> None:
        """Start the step's copies (`swap_out`: [n, 2] device → host pairs; `swap_in`: host →
        device); the step's compute, queued after this call, sees every block it reads or
        writes (`written_blocks`: the device blocks its KV writes go to) in order."""
        if not self.cuda:
            _copy_runs(self.kv_cache, swap_out[:, 0], self.host, swap_out[:, 1])
            _copy_runs(self.host, swap_in[:, 0], self.kv_cache, swap_in[:, 1])
            return
        assert self._out_stream is not None and self._in_stream is not None
        compute = torch.cuda.current_stream()
        previous_out = self._out_done
        if len(swap_out):
            # The KV read out was written by steps already queued; its host blocks may have
            # been read by an earlier swap-in.
            self._out_done = _copy_on(self._out_stream, compute, self._in_done,
                                      self.kv_cache, swap_out[:, 0], self.host, swap_out[:, 1])
        if len(swap_in):
            # The host blocks read were written by earlier swap-outs (never this step's: a
            # sequence swapped out in a step does not come back in it).
            self._in_done = _copy_on(self._in_stream, compute, previous_out,
                                     self.host, swap_in[:, 0], self.kv_cache, swap_in[:, 1])
            compute.wait_event(self._in_done)
        # Blocks swapped out by earlier steps may be reused from now on; this step's only
        # where it writes into them.
        if previous_out is not None:
            compute.wait_event(previous_out)
        if len(swap_out) and np.isin(swap_out[:, 0], written_blocks).any():
            assert self._out_done is not None
            compute.wait_event(self._out_done)


def _copy_on(
    stream: torch.cuda.Stream,
    compute: torch.cuda.Stream,
    after: torch.cuda.Event | None,
    src: torch.Tensor,
    src_ids: np.ndarray,
    dst: torch.Tensor,
    dst_ids: np.ndarray,
) -> torch.cuda.Event:
    """Queue the copies on `stream` behind the work queued on `compute` and the `after`
    event; returns the event marking them done."""
    stream.wait_stream(compute)
    if after is not None:
        stream.wait_event(after)
    with torch.cuda.stream(stream):
        _copy_runs(src, src_ids, dst, dst_ids)
        done = torch.cuda.Event()
        done.record()
    return done


def _copy_runs(src: torch.Tensor, src_ids: np.ndarray, dst: torch.Tensor, dst_ids: np.ndarray) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]], one copy per run of pairs that step by one on
    both sides (blocks are handed out in runs, so a request's blocks mostly form a few)."""
    if len(src_ids) == 0:
        return
    order = np.argsort(src_ids, kind="stable")
    src_sorted, dst_sorted = src_ids[order], dst_ids[order]
    breaks = np.flatnonzero((np.diff(src_sorted) != 1) | (np.diff(dst_sorted) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(src_sorted)]))
    for start, end in zip(starts.tolist(), ends.tolist()):
        s, d, n = int(src_sorted[start]), int(dst_sorted[start]), end - start
        dst[d : d + n].copy_(src[s : s + n], non_blocking=True)
