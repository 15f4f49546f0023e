"""Decode steps replayed from CUDA graphs, one graph per bucketed batch size.

A decode step of a large model is hundreds of small kernel launches; replaying them as one
graph removes the launch cost that otherwise dominates small batches. Inputs live in static
device buffers (staged in pinned host memory, one copy each per step), a batch is padded up
to the next captured size, and the padding rows write no KV. Sampling stays outside the
graph. Without CUDA the same static-buffer path runs eagerly: that is its CPU twin in tests.
A replica captures every size when it starts; a stage formed by a drop captures each size
the first time a step needs it (`lazy`), so a drop does not wait for captures.
"""

from __future__ import annotations

import numpy as np
import torch

from kunserve.kernels.attention import DecodeGraphBuffers
from kunserve.kernels.staging import PinnedRing, to_device
from kunserve.model.decoder import DecoderStage
from kunserve.step import StepInput

# Captured batch sizes: every size up to 8 that is a power of two, then multiples of this.
GRAPH_BATCH_STRIDE = 16


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = {b for b in (1, 2, 4, 8) if b <= max_batch}
    sizes.update(range(GRAPH_BATCH_STRIDE, max_batch + 1, GRAPH_BATCH_STRIDE))
    sizes.add(max_batch)
    return sorted(sizes)


class DecodeGraphs:
    def __init__(self, model: DecoderStage, buffers: DecodeGraphBuffers, max_batch: int, max_blocks: int,
                 device: torch.device, lazy: bool = False) -> None:
        self.model = model
        self.buffers = buffers
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.sizes = graph_batch_sizes(max_batch)
        self._staging = PinnedRing(lambda: torch.zeros((2, max_batch), dtype=torch.int64), device)
        self._inputs = self._staging.buffers[0].to(device)  # row 0: token ids, row 1: positions
        # A later pipeline stage's input: the previous stage's hidden states.
        self._hidden_in = None if model.is_first else torch.zeros(
            (max_batch, model.spec.hidden_size), dtype=model.kv_layers[0].dtype, device=device
        )
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden: dict[int, torch.Tensor] = {}
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        if self._pool is not None and not lazy:
            for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
                self._capture(size)

    def can_run(self, step: StepInput) -> bool:
        batch = step.batch
        return (
            batch.num_decodes == batch.num_seqs <= self.max_batch
            and batch.block_tables.shape[1] <= self.max_blocks
        )

    def run(
        self, step: StepInput, hidden_in: torch.Tensor | None = None, previous_sampled: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states [num_seqs, hidden] of a decode-only step (`hidden_in`: the previous
        stage's output, on a later pipeline stage; `previous_sampled`: the tokens the step
        before sampled, for decodes scheduled ahead)."""
        n = step.batch.num_seqs
        size = next(s for s in self.sizes if s >= n)
        staging = self._staging.acquire()
        host = staging.numpy()
        host[0, :n] = step.token_ids
        host[1, :n] = step.positions
        host[:, n:] = 0
        self._inputs.copy_(staging, non_blocking=True)
        self._staging.copied()
        if self._hidden_in is None:  # the first stage embeds: tokens a step ahead go in
            fill_ahead_tokens(self._inputs[0], step, previous_sampled)
        else:
            assert hidden_in is not None
            self._hidden_in[:n].copy_(hidden_in)
        self.buffers.fill(step.batch)
        graph = self._graphs.get(size)
        if graph is None:
            if self._pool is None:  # no CUDA: the same buffers, eagerly
                return self._forward(size)[:n]
            graph = self._capture(size)  # its warm-up ran this step already; the replay repeats it exactly
        graph.replay()
        return self._hidden[size][:n]

    def _forward(self, size: int) -> torch.Tensor:
        inputs = self._inputs[0, :size] if self._hidden_in is None else self._hidden_in[:size]
        return self.model.forward(inputs, self._inputs[1, :size], self.buffers.metadata(size))

    @torch.inference_mode()
    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        self._forward(size)  # compiles the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._hidden[size] = self._forward(size)
        torch.cuda.synchronize()
        self._graphs[size] = graph
        return graph



def fill_ahead_tokens(token_ids: torch.Tensor, step: StepInput, previous_sampled: torch.Tensor | None) -> None:
    """Put the tokens sampled by the step before into the places of `step`'s decodes that were
    scheduled ahead of it (on the device: the host never sees those tokens first)."""
    k = len(step.ahead_token_index)
    if k == 0:
        return
    if previous_sampled is None:
        raise RuntimeError("the step decodes ahead of a step whose sampled tokens this device does not have")
    index = to_device(np.concatenate((step.ahead_token_index, step.ahead_sample_rows)), token_ids.device)
    token_ids[index[:k]] = previous_sampled[index[k:]]
