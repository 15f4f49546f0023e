"""Steps with prompt tokens replayed piecewise from CUDA graphs: each layer's half before
attention and half after it are graphs, attention runs eagerly between them.

A prompt step runs eagerly otherwise, and launching its kernels (six Triton kernels and four
GEMMs a layer, 26-39 µs each to launch from Python) takes the driver longer than a short
prompt's compute (docs/benchmarks.md, "What each kernel's launch costs"). Attention cannot be
in the graphs: its kernels' grids follow the step's sequences. Everything else depends only on
the step's token count, so a step of T tokens runs the graphs of the smallest captured size
>= T, its rows past T padding that no attention reads. The halves pass their results through
static buffers (the residual stream, the layer's output, qkv, attention's output), copied in
and out inside the graphs. Without CUDA the same buffers run eagerly: that is the CPU twin in
tests.
"""

from __future__ import annotations

import logging
import time

import torch

from kunserve.kernels.staging import PinnedRing
from kunserve.model.decoder import DecoderStage
from kunserve.step import StepInput
from kunserve.worker.cuda_graphs import fill_ahead_tokens

logger = logging.getLogger(__name__)

SMALLEST_SIZE = 16  # captured token counts: powers of two from this up to the largest


def prompt_graph_sizes(max_tokens: int) -> list[int]:
    sizes = {max_tokens}
    size = SMALLEST_SIZE
    while size < max_tokens:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


class PromptGraphs:
    def __init__(self, model: DecoderStage, max_tokens: int, device: torch.device) -> None:
        if max_tokens < 1:
            raise ValueError(f"prompt graphs: max_tokens must be >= 1, got {max_tokens}")
        if model.tp.size != 1:
            raise ValueError("prompt graphs: not under tensor parallelism (its all-reduces stay eager)")
        self.model = model
        self.max_tokens = max_tokens
        self.device = device
        self.sizes = prompt_graph_sizes(max_tokens)
        spec, dtype = model.spec, model.layers[0].qkv.dtype
        self._staging = PinnedRing(lambda: torch.zeros((2, max_tokens), dtype=torch.int64), device)
        self._inputs = self._staging.buffers[0].to(device)  # row 0: token ids, row 1: positions
        self._hidden = torch.zeros((max_tokens, spec.hidden_size), dtype=dtype, device=device)
        self._residual = torch.zeros_like(self._hidden)
        self._qkv = torch.zeros((max_tokens, sum(model.heads), spec.head_dim), dtype=dtype, device=device)
        self._attn = torch.zeros((max_tokens, model.heads[0], spec.head_dim), dtype=dtype, device=device)
        # Per size, per local layer: (the half before attention, the half after).
        self._graphs: dict[int, list[tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]]] = {}
        if device.type == "cuda":
            started = time.perf_counter()
            pool = torch.cuda.graph_pool_handle()
            for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
                self._graphs[size] = self._capture(size, pool)
            logger.info("prompt graphs: %d layer halves for each of %s tokens captured in %.1f s",
                        2 * len(model.layers), self.sizes, time.perf_counter() - started)

    def can_run(self, step: StepInput) -> bool:
        return 0 < step.num_tokens <= self.max_tokens

    def run(self, step: StepInput, hidden_in: torch.Tensor | None = None,
            previous_sampled: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's hidden states [T, hidden] for `step` (`hidden_in`: the previous stage's
        output on a later stage; `previous_sampled`: for decodes scheduled ahead)."""
        model, n = self.model, step.num_tokens
        size = next(s for s in self.sizes if s >= n)
        staging = self._staging.acquire()
        host = staging.numpy()
        host[0, :n] = step.token_ids
        host[1, :n] = step.positions
        host[:, n:size] = 0
        self._inputs[:, :size].copy_(staging[:, :size], non_blocking=True)
        self._staging.copied()
        if model.is_first:
            fill_ahead_tokens(self._inputs[0], step, previous_sampled)
            self._hidden[:size].copy_(model.embed(self._inputs[0, :size]))
        else:
            assert hidden_in is not None
            self._hidden[:n].copy_(hidden_in)
        meta = model.backend.build_metadata(step.batch, self.device)
        graphs = self._graphs.get(size)
        for local in range(len(model.layers)):
            if graphs is None:
                self._before_attention(local, size)
            else:
                graphs[local][0].replay()
            q, k, v = model.split_qkv(self._qkv[:n])
            kv_layer = model.kv_layers[local]
            model.backend.write_kv(kv_layer, k, v, meta)
            window = model.spec.sliding_windows[model.start + local]
            self._attn[:n].copy_(model.backend.attend(q, kv_layer, meta, window))
            if graphs is None:
                self._after_attention(local, size)
            else:
                graphs[local][1].replay()
        return self._hidden[:n] + self._residual[:n]

    def _before_attention(self, local: int, size: int) -> None:
        residual = None if local == 0 else self._residual[:size]
        qkv, residual = self.model.attention_inputs(local, self._hidden[:size], residual, self._inputs[1, :size])
        self._qkv[:size].copy_(qkv)
        self._residual[:size].copy_(residual)

    def _after_attention(self, local: int, size: int) -> None:
        hidden, residual = self.model.attention_output(local, self._attn[:size], self._residual[:size])
        self._hidden[:size].copy_(hidden)
        self._residual[:size].copy_(residual)

    @torch.inference_mode()
    def _capture(self, size: int, pool: tuple[int, int]) -> list[tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]]:
        graphs = []
        for local in range(len(self.model.layers)):
            halves = []
            for half in (self._before_attention, self._after_attention):
                half(local, size)  # compiles the kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    half(local, size)
                halves.append(graph)
            graphs.append((halves[0], halves[1]))
        torch.cuda.synchronize()
        return graphs
