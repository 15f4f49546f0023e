"""One device: its memory arena, the layers it holds, the runner of its steps, and the device
calls (kunserve/worker/protocol.py) that drops, restores and migrations make on it. Under
tensor parallelism a device is one rank of a stage: it holds its shard of the stage's layers
and its KV heads, and talks to the same rank of its peers."""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections import deque

import numpy as np
import torch

from kunserve.arch.spec import ModelSpec, parse_dtype
from kunserve.config import EngineConfig
from kunserve.kernels.backends import make_attention_backend
from kunserve.kernels.cpu_linear import make_linear
from kunserve.layout import ArenaLayout, arena_layout, format_size, stage_layers
from kunserve.model.decoder import DecoderStage
from kunserve.model.parallel import SINGLE, TensorParallel
from kunserve.model.presets import ResolvedModel
from kunserve.model.rotary import cos_sin_cache
from kunserve.model.weights import CheckpointWeights, DummyWeights, WeightSource
from kunserve.step import StepInput
from kunserve.worker import drop
from kunserve.worker.arena import MemoryArena
from kunserve.worker.busy_clock import BusyClock
from kunserve.worker.cuda_graphs import DecodeGraphs
from kunserve.worker.model_runner import ModelRunner, PendingTokens
from kunserve.worker.peers import PeerLinks, digest
from kunserve.worker.prompt_graphs import PromptGraphs
from kunserve.worker.protocol import DeviceCalls, SamplerStates
from kunserve.worker.swap import SwapSpace

logger = logging.getLogger(__name__)


def build_worker(
    config: EngineConfig,
    model: ResolvedModel,
    layer_range: tuple[int, int],
    device: torch.device,
    pipe: tuple[int | None, int | None] = (None, None),
    tp: TensorParallel = SINGLE,
    pipe_back: int | None = None,
    peers: PeerLinks | None = None,
) -> Worker:
    """The worker of one device holding layers `layer_range` of `model` (its shard, as rank
    `tp.rank` of a tensor-parallel stage), weights loaded; `pipe`: the global ranks of a static
    pipeline's previous and next stages (the same tensor-parallel rank of each); `pipe_back`:
    of its first stage, the last stage's, and of its last stage, the first's; `peers`: its
    links to other workers (None: it links to nobody)."""
    spec = model.spec
    dtype = spec.dtype if config.dtype == "auto" else parse_dtype(config.dtype)
    weights: WeightSource
    if config.load_format == "dummy":
        weights = DummyWeights(spec, config.seed, tp.rank, tp.size)
    elif model.weights_dir is None:
        raise ValueError(f"load_format: preset {model.name!r} has no weights; use load_format='dummy'")
    else:
        weights = CheckpointWeights(model.weights_dir, spec, tp.rank, tp.size)
    max_model_len = config.max_model_len or spec.max_position_embeddings
    return Worker(spec, weights, config, layer_range, max_model_len, dtype, device, pipe, tp, pipe_back, peers)


class Worker(DeviceCalls):
    def __init__(
        self,
        spec: ModelSpec,
        weights: WeightSource,
        config: EngineConfig,
        layer_range: tuple[int, int],
        max_model_len: int,
        dtype: torch.dtype,
        device: torch.device,
        pipe: tuple[int | None, int | None] = (None, None),
        tp: TensorParallel = SINGLE,
        pipe_back: int | None = None,
        peers: PeerLinks | None = None,
    ) -> None:
        if tp.size != config.tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size: {config.tensor_parallel_size}, but this worker is one of {tp.size}")
        torch.manual_seed(config.seed)
        self.spec = spec
        self.tp = tp
        self.weights = weights
        self.device = device
        self.start, self.end = layer_range
        num_layers = self.end - self.start
        elem_bytes = torch.finfo(dtype).bits // 8
        try:
            layout = arena_layout(spec, config, layer_range, elem_bytes, device_budget_bytes(config, device))
        except ValueError as error:
            raise ValueError(f"{error}. {budget_origin(config, device)}") from None
        self.arena = MemoryArena(layout, dtype, device)
        for k, layer_weights in enumerate(self.arena.layers):
            weights.load_layer(self.start + k, layer_weights)
        stage = weights.load_stage(self.start == 0, self.end == spec.num_layers, dtype, device)
        logger.info(
            "arena: %.2f GiB on %s, %d layers of %.1f MiB, %d KV blocks of %.2f MiB (%d tokens)",
            layout.total_elems * elem_bytes / 2**30, device, num_layers, layout.layer_bytes / 2**20,
            layout.num_initial_kv_blocks, layout.block_bytes / 2**20, layout.num_initial_kv_blocks * layout.block_size,
        )
        self.model = DecoderStage(
            spec,
            self.start,
            self.end,
            self.arena.layers,
            stage,
            [self.arena.kv_layer(k) for k in range(num_layers)],
            cos_sin_cache(spec.rope, spec.head_dim, max_model_len, device),
            make_attention_backend(config.attention_backend, config.block_size, device),
            make_linear(config.linear_backend, device, dtype),
            tp,
        )
        self.config, self.max_model_len = config, max_model_len
        self.runner = ModelRunner(self.model, device, self.decode_graphs(self.model, lazy=False),
                                  self.prompt_graphs(self.model))
        # Host memory for swapped-out KV: only for the preemption modes that swap.
        self.swap_space = (SwapSpace(self.arena.kv_cache, layout.swap_blocks(config.swap_space_bytes))
                           if config.can_swap else None)
        # While this device is a stage of a drop's group: (stage, group size).
        self.group: tuple[int, int] | None = None
        # Global ranks of the neighbour stages (None: none, this stage embeds / samples).
        self.pipe_prev, self.pipe_next = pipe
        # The pipeline's other end (the last stage, for the first; the first, for the last):
        # the sampled tokens of a micro-batch go back along it to the first stage when a later
        # micro-batch decodes ahead of them (scheduled ahead: kunserve/engine/scheduler.py).
        self.pipe_back = pipe_back
        self._recent_sampled = self._sampled_history(config.pipeline_parallel_size)
        self.peers = peers or PeerLinks(device)
        self.replica_model, self.replica_runner = self.model, self.runner
        # The stage models a drop made, by (stage, group size): kept for the next drop, with
        # their captured graphs (their weights and KV views never move).
        self.stage_runners: dict[tuple[int, int], tuple[DecoderStage, ModelRunner]] = {}
        self.clock = BusyClock(device)

    def decode_graphs(self, model: DecoderStage, lazy: bool) -> DecodeGraphs | None:
        """CUDA graphs for `model`'s decode steps (None: eager), captured now or as sizes come."""
        config, max_model_len = self.config, self.max_model_len
        if config.enforce_eager:
            return None
        max_batch = min(config.max_graph_batch_size, config.max_num_seqs)
        max_blocks = -(-max_model_len // config.block_size)
        buffers = model.backend.decode_graph_buffers(max_batch, max_blocks, self.device)
        if buffers is None:
            return None
        return DecodeGraphs(model, buffers, max_batch, max_blocks, self.device, lazy)

    def prompt_graphs(self, model: DecoderStage) -> PromptGraphs | None:
        """Piecewise CUDA graphs for this device's steps with prompt tokens (None: eager, as
        under tensor parallelism and in the stages a drop makes; on a CPU their static buffers
        run eagerly, the twin that tests exercise)."""
        max_tokens = min(self.config.prompt_graph_max_tokens, self.config.max_num_batched_tokens)
        if self.config.enforce_eager or max_tokens == 0 or model.tp.size != 1:
            return None
        return PromptGraphs(model, max_tokens, self.device)

    @property
    def layout(self) -> ArenaLayout:
        return self.arena.layout

    # ---- steps -------------------------------------------------------------------------------

    def execute(self, step: StepInput) -> np.ndarray:
        return self.launch(step).result()

    def launch(self, step: StepInput) -> PendingTokens:
        """Start a whole model's step; its sampled tokens come back through the result."""
        self._check_runnable()
        self.swap(step)
        return self.runner.launch(step)

    def run_stage(self, step: StepInput) -> np.ndarray | None:
        """This device's part of a pipeline's step: the previous stage's hidden states in,
        this stage's layers, the next stage's input out; the last stage samples and returns
        the tokens (the others None; of a tensor-parallel stage, rank 0 returns them)."""
        self._check_runnable()
        self.swap(step)
        if step.num_tokens == 0:  # swaps only: nothing flows down the pipeline
            sampled = self.runner.execute(step) if self.pipe_next is None and self.tp.samples else None
            self._recent_sampled.append(None)
            return sampled
        if self.pipe_back is not None:
            # Before this step's activations: the pair's messages keep one order at both ends.
            step = self._feed_back(step)
        elif self.tp.size > 1 and len(step.ahead_token_index) and self.pipe_prev is None and self.pipe_next is None:
            self.runner.share_last_sampled(self.tp)  # one stage: its rank 0 sampled them
        hidden_in = None
        if self.pipe_prev is not None:
            hidden_in = torch.empty((step.num_tokens, self.spec.hidden_size), dtype=self.arena.buffer.dtype,
                                    device=self.device)
            self.peers.recv(hidden_in, self.pipe_prev)
        self.clock.begin()
        hidden = self.runner.forward(step, hidden_in)
        sampled = self.runner.sample(step, hidden) if self.pipe_next is None else None
        self.clock.end()
        if self.pipe_next is not None:
            self.peers.send(hidden.contiguous(), self.pipe_next)
        else:
            self._recent_sampled.append(self.runner.last_sampled)
        return sampled

    def _feed_back(self, step: StepInput) -> StepInput:
        """A pipeline's step with decodes scheduled ahead of the micro-batch that samples their
        input tokens, `step.ahead_steps_back` steps before it: the last stage sends those tokens
        to the first, which embeds them (its step then reads them as rows 0..k-1 of the step
        before). Every stage gets every step, so both ends know when a step needs them."""
        k = len(step.ahead_token_index)
        if k == 0:
            return step
        assert self.pipe_back is not None
        if self.pipe_next is None:  # the last stage: sampled them
            if step.ahead_steps_back > len(self._recent_sampled):
                raise RuntimeError(f"a step decodes ahead of the step {step.ahead_steps_back} back, "
                                   f"but this stage keeps the last {len(self._recent_sampled)}")
            source = self._recent_sampled[-step.ahead_steps_back]
            if source is None:
                raise RuntimeError("the step decodes ahead of a step this stage did not sample")
            tokens = source[torch.as_tensor(step.ahead_sample_rows, device=self.device)]
            self.peers.send(self.tp.broadcast_from_sampler(tokens), self.pipe_back)
            return step
        tokens = torch.empty(k, dtype=torch.int64, device=self.device)
        self.peers.recv(tokens, self.pipe_back)
        self.runner.last_sampled = tokens
        return dataclasses.replace(step, ahead_sample_rows=np.arange(k, dtype=np.int64))

    def take_busy_seconds(self) -> float:
        """Seconds this stage computed since the last take (the bubble metric)."""
        return self.clock.take()

    def swap(self, step: StepInput) -> None:
        """Start the step's KV copies to and from host memory, ahead of its compute."""
        if not len(step.swap_out) and not len(step.swap_in):
            return
        if self.swap_space is None:
            raise RuntimeError("the step swaps KV, but this worker has no swap space (preemption_mode='swap' or 'auto')")
        written = np.unique(step.batch.slot_mapping // self.layout.block_size)
        self.swap_space.apply(step.swap_out, step.swap_in, written)

    def _check_runnable(self) -> None:
        if self.arena.released and self.group is None:
            raise RuntimeError(f"layers {sorted(self.arena.released)} are released; this stage cannot run")

    # ---- device calls: memory ------------------------------------------------------------------

    def release_layer(self, layer: int) -> range:
        return self.arena.release(layer)

    def reclaim_layer(self, layer: int) -> None:
        self.weights.load_layer(self.start + layer, self.arena.reclaim(layer))

    # ---- device calls: role changes (kunserve/worker/drop.py) -----------------------------------

    def become_stage(self, stage: int, num_stages: int, prev_rank: int | None = None,
                     next_rank: int | None = None, refill_from: dict[int, int] | None = None,
                     back_rank: int | None = None) -> list[int]:
        if self.layout.num_layers != self.spec.num_layers:
            raise RuntimeError("only a device holding the whole model (a replica) can drop layers")
        missing = set(stage_layers(self.spec.num_layers, stage, num_stages)) & self.arena.released
        if not missing <= set(refill_from or {}):
            raise RuntimeError(f"stage {stage} of {num_stages} needs layers {sorted(missing)}, released here: "
                               f"name where to refill them from")
        drop.reclaim_layers(self.arena, self.peers, {layer: (refill_from or {})[layer] for layer in missing})
        released = drop.release_other_layers(self.arena, stage, num_stages)
        self._run_with(*self._stage_runner(stage, num_stages))
        self.runner.sampler = self.replica_runner.sampler  # seeded requests keep their generators
        if self.swap_space is not None:  # a group swaps its stages' sub-blocks
            self.swap_space.regroup(self.arena.stage_kv_cache(num_stages))
        self.group = (stage, num_stages)
        self.pipe_prev = None if prev_rank is None else self._peer(prev_rank)
        self.pipe_next = None if next_rank is None else self._peer(next_rank)
        self.pipe_back = None if back_rank is None else self._peer(back_rank)
        self._recent_sampled = self._sampled_history(num_stages)
        return released

    def become_replica(self, refill_from: dict[int, int] | None, over_network: list[int] | None = None) -> None:
        if self.group is None:
            raise RuntimeError("not a stage of a group")
        refill = None if refill_from is None else {layer: self._peer(r) for layer, r in refill_from.items()}
        remote = None if over_network is None else [self._peer(r) for r in over_network]
        drop.refill_layers(self.arena, self.weights, self.peers, refill, remote)
        self._run_with(self.replica_model, self.replica_runner)
        if self.swap_space is not None:
            self.swap_space.regroup(self.arena.kv_cache)
        self.group = None
        self.pipe_prev = self.pipe_next = self.pipe_back = None
        self._recent_sampled = self._sampled_history(1)

    def prepare_stages(self, group_sizes: list[int]) -> None:
        if self.layout.num_layers != self.spec.num_layers:
            raise RuntimeError("only a device holding the whole model (a replica) has stages to prepare")
        for num_stages in group_sizes:
            for stage in range(num_stages):
                self._stage_runner(stage, num_stages, capture_now=True)

    def _stage_runner(self, stage: int, num_stages: int, capture_now: bool = False
                      ) -> tuple[DecoderStage, ModelRunner]:
        """Stage `stage`'s model and runner, kept once made: made by `prepare_stages` with its
        graphs captured (before any drop), or else at the first drop into it, its graphs then
        captured as batch sizes come (a capture never runs inside a drop's stall)."""
        if (stage, num_stages) not in self.stage_runners:
            model = drop.stage_model(self.replica_model, self.arena, stage, num_stages)
            graphs = self.decode_graphs(model, lazy=not capture_now)
            self.stage_runners[(stage, num_stages)] = (model, ModelRunner(model, self.device, graphs))
        return self.stage_runners[(stage, num_stages)]

    def _run_with(self, model: DecoderStage, runner: ModelRunner) -> None:
        self.model, self.runner = model, runner

    @staticmethod
    def _sampled_history(num_stages: int) -> deque[torch.Tensor | None]:
        """The last stage's sampled tokens of its latest steps, newest last: a step scheduled
        ahead decodes behind at most as many steps as the pipeline has stages in flight."""
        return deque(maxlen=num_stages)

    # ---- device calls: links and KV copies (kunserve/worker/peers.py) ---------------------------

    def _peer(self, stage_rank: int) -> int:
        """The global rank this device talks to in the peer stage whose first rank is
        `stage_rank`: the same tensor-parallel rank, which holds the same shard."""
        return stage_rank + self.tp.rank

    def export_arena(self) -> bytes:
        return self.peers.export(self.arena)

    def open_peer(self, peer: int, handle: bytes) -> None:
        self.peers.open(self._peer(peer), handle)

    def warm_link(self, peer: int, send: bool) -> None:
        self.peers.warm(self._peer(peer), send, self.arena.buffer.dtype)

    def close_peer(self, peer: int) -> None:
        self.peers.close_peer(self._peer(peer))

    def kv_view(self) -> torch.Tensor:
        """The KV cache as this device addresses it now: blocks, or a stage's sub-blocks."""
        return self.arena.kv_cache if self.group is None else self.arena.stage_kv_cache(self.group[1])

    def pull_kv(self, peer: int, src_ids: list[int], dst_ids: list[int], staging_bytes: int | None = None) -> None:
        self.peers.pull_kv(self.kv_view(), self._peer(peer), src_ids, dst_ids, staging_bytes)

    def send_kv(self, peer: int, ids: list[int], staging_bytes: int | None = None) -> None:
        self.peers.send_kv(self.kv_view(), self._peer(peer), ids, staging_bytes)

    def recv_kv(self, peer: int, ids: list[int], staging_bytes: int | None = None) -> None:
        self.peers.recv_kv(self.kv_view(), self._peer(peer), ids, staging_bytes)

    def move_kv(self, src_ids: list[int], dst_ids: list[int]) -> None:
        self.peers.move_kv(self.kv_view(), src_ids, dst_ids)

    # ---- device calls: sampler state and checks ---------------------------------------------

    def take_sampler_states(self, request_ids: list[str]) -> SamplerStates:
        return self.replica_runner.sampler.take_states(request_ids)

    def give_sampler_states(self, states: SamplerStates) -> None:
        self.replica_runner.sampler.give_states(states)

    def kv_digests(self, ids: list[int]) -> list[str]:
        view = self.kv_view()
        return [digest(view[i]) for i in ids]

    def weight_digests(self) -> list[str]:
        return [digest(self.arena.slot(layer)) for layer in range(self.layout.num_layers)]

    def close(self) -> None:
        """Unmap the peers' memory and close the links before the process exits."""
        self.peers.close()


def device_budget_bytes(config: EngineConfig, device: torch.device) -> int | None:
    """The bytes this engine may take on `device`: the configured budget, or (on a GPU)
    `gpu_memory_utilization` of it less what is already in use; None on CPU without a budget.
    Engines of this process that nothing holds any more (a deleted LLM, perhaps in reference
    cycles) are collected first and torch's cache emptied, so their memory counts as free."""
    if config.memory_budget_bytes is not None:
        return config.memory_budget_bytes
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return int(total * config.gpu_memory_utilization) - (total - free)


def budget_origin(config: EngineConfig, device: torch.device) -> str:
    """Where `device_budget_bytes` came from, what uses the device, and what to do: the second
    half of a too-small budget's error."""
    if config.memory_budget_bytes is not None:
        return f"The budget is memory_budget_bytes={config.memory_budget_bytes} ({format_size(config.memory_budget_bytes)})."
    if device.type != "cuda":
        return f"On CPU without a budget the arena holds the layers and cpu_kv_cache_bytes={config.cpu_kv_cache_bytes}."
    free, total = torch.cuda.mem_get_info(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    in_use = total - free
    text = (
        f"The budget is gpu_memory_utilization={config.gpu_memory_utilization} of {device}'s {format_size(total)}, less "
        f"the {format_size(in_use)} in use there: {format_size(allocated)} by live tensors of this process, "
        f"{format_size(reserved - allocated)} cached by its allocator, {format_size(in_use - reserved)} by other processes "
        "and CUDA contexts."
    )
    if allocated:
        return text + (" Another engine of this process still holds its memory: shut it down first "
                       "(`llm.shutdown()`, or `with LLM(...) as llm:`), or let go of every reference to it.")
    return text + " Free the device (nvidia-smi lists what uses it) or raise gpu_memory_utilization."
