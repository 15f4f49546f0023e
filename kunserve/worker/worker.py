"""One device: its memory arena, the layers it holds, and the runner of its steps."""

from __future__ import annotations

import gc
import logging

import numpy as np
import torch

from kunserve.config import EngineConfig
from kunserve.kernels.attention import make_attention_backend
from kunserve.kernels.cpu_linear import make_linear
from kunserve.layout import ArenaLayout, layer_param_slices
from kunserve.model.decoder import DecoderStage
from kunserve.model.presets import ResolvedModel
from kunserve.model.rotary import cos_sin_cache
from kunserve.model.spec import ModelSpec, parse_dtype
from kunserve.model.weights import CheckpointWeights, DummyWeights, WeightSource
from kunserve.step import StepInput
from kunserve.worker.arena import MemoryArena
from kunserve.worker.cuda_graphs import DecodeGraphs
from kunserve.worker.model_runner import ModelRunner, PendingTokens
from kunserve.worker.swap import SwapSpace

logger = logging.getLogger(__name__)

# Scratch memory a step may take beyond the arena, per batched token: the widest
# activations of one layer (residual, normed input, qkv, attention output, gate_up, the
# SiLU product) with room for the allocator's rounding.
ACTIVATION_SAFETY_FACTOR = 2
# Logits are float32 and the sampler holds a few vocab-wide copies of them per sampled row.
SAMPLER_LOGIT_COPIES = 4


def build_worker(
    config: EngineConfig, model: ResolvedModel, layer_range: tuple[int, int], device: torch.device
) -> Worker:
    """The worker of one device holding layers `layer_range` of `model`, weights loaded."""
    spec = model.spec
    dtype = spec.dtype if config.dtype == "auto" else parse_dtype(config.dtype)
    weights: WeightSource
    if config.load_format == "dummy":
        weights = DummyWeights(spec, config.seed)
    elif model.weights_dir is None:
        raise ValueError(f"load_format: preset {model.name!r} has no weights; use load_format='dummy'")
    else:
        weights = CheckpointWeights(model.weights_dir, spec)
    max_model_len = config.max_model_len or spec.max_position_embeddings
    return Worker(spec, weights, config, layer_range, max_model_len, dtype, device)


class Worker:
    def __init__(
        self,
        spec: ModelSpec,
        weights: WeightSource,
        config: EngineConfig,
        layer_range: tuple[int, int],
        max_model_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        torch.manual_seed(config.seed)
        self.spec = spec
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
        )
        self.config, self.max_model_len = config, max_model_len
        self.runner = ModelRunner(self.model, device, self.decode_graphs(self.model, lazy=False))
        # Host memory for swapped-out KV: only for the swap preemption mode.
        self.swap_space = (SwapSpace(self.arena.kv_cache, layout.swap_blocks(config.swap_space_bytes))
                           if config.preemption_mode == "swap" else None)
        # While this device is a stage of a group (kunserve/worker/drop.py): (stage, group size).
        self.group: tuple[int, int] | None = None
        # Global ranks of the neighbour stages (None: none, this stage embeds / samples).
        self.pipe_prev: int | None = None
        self.pipe_next: int | None = None
        # Other workers' arenas mapped into this process, by global rank (kunserve/worker/drop.py).
        self.peer_arenas: dict[int, torch.Tensor] = {}
        self.replica_model, self.replica_runner = self.model, self.runner
        # The stage models a drop made, by (stage, group size): kept for the next drop, with
        # their captured graphs (their weights and KV views never move).
        self.stage_runners: dict[tuple[int, int], tuple[DecoderStage, ModelRunner]] = {}

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

    @property
    def layout(self) -> ArenaLayout:
        return self.arena.layout

    def execute(self, step: StepInput) -> np.ndarray:
        return self.launch(step).result()

    def launch(self, step: StepInput) -> PendingTokens:
        """Start a step; its sampled tokens come back through the result."""
        if self.arena.released and self.group is None:
            raise RuntimeError(f"layers {sorted(self.arena.released)} are released; this stage cannot run")
        self.swap(step)
        return self.runner.launch(step)

    def swap(self, step: StepInput) -> None:
        """Start the step's KV copies to and from host memory, ahead of its compute."""
        if not len(step.swap_out) and not len(step.swap_in):
            return
        if self.swap_space is None:
            raise RuntimeError("the step swaps KV, but this worker has no swap space (preemption_mode='swap')")
        written = np.unique(step.batch.slot_mapping // self.layout.block_size)
        self.swap_space.apply(step.swap_out, step.swap_in, written)

    def release_layer(self, layer: int) -> range:
        """Drop the weights of local layer `layer`; returns the block ids its bytes provide."""
        return self.arena.release(layer)

    def reclaim_layer(self, layer: int) -> None:
        """Take local layer `layer`'s slot back and refill its weights."""
        self.weights.load_layer(self.start + layer, self.arena.reclaim(layer))



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
        return f"The budget is memory_budget_bytes={config.memory_budget_bytes} ({_size(config.memory_budget_bytes)})."
    if device.type != "cuda":
        return f"On CPU without a budget the arena holds the layers and cpu_kv_cache_bytes={config.cpu_kv_cache_bytes}."
    free, total = torch.cuda.mem_get_info(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    in_use = total - free
    text = (
        f"The budget is gpu_memory_utilization={config.gpu_memory_utilization} of {device}'s {_size(total)}, less "
        f"the {_size(in_use)} in use there: {_size(allocated)} by live tensors of this process, "
        f"{_size(reserved - allocated)} cached by its allocator, {_size(in_use - reserved)} by other processes "
        "and CUDA contexts."
    )
    if allocated:
        return text + (" Another engine of this process still holds its memory: shut it down first "
                       "(`llm.shutdown()`, or `with LLM(...) as llm:`), or let go of every reference to it.")
    return text + " Free the device (nvidia-smi lists what uses it) or raise gpu_memory_utilization."


def _size(num_bytes: float) -> str:
    """Bytes in the unit a reader takes in at once (negative budgets included)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} bytes"


def arena_layout(
    spec: ModelSpec, config: EngineConfig, layer_range: tuple[int, int], elem_bytes: int, budget_bytes: int | None
) -> ArenaLayout:
    """The arena of a device holding `layer_range`: exactly `num_kv_blocks` KV blocks when
    set, else what `budget_bytes` leaves after the stage's other weights and a step's scratch
    memory (None: `cpu_kv_cache_bytes` of KV). Simulated devices use it too."""
    start, end = layer_range
    num_layers = end - start
    if config.num_kv_blocks is not None:
        return ArenaLayout.for_kv_blocks(spec, num_layers, config.block_size, elem_bytes, config.num_kv_blocks)
    _, layer_elems = layer_param_slices(spec, elem_bytes)
    if budget_bytes is None:
        arena_bytes = num_layers * layer_elems * elem_bytes + config.cpu_kv_cache_bytes
    else:
        first, last = start == 0, end == spec.num_layers
        vocab_rows = (first + (last and not (first and spec.tie_word_embeddings))) * spec.vocab_size
        stage_bytes = (vocab_rows + last) * spec.hidden_size * elem_bytes
        widest = 3 * spec.hidden_size + spec.q_size + 2 * spec.kv_size + 3 * spec.intermediate_size
        activations = ACTIVATION_SAFETY_FACTOR * config.max_num_batched_tokens * widest * elem_bytes
        logits = SAMPLER_LOGIT_COPIES * config.max_num_seqs * spec.vocab_size * 4
        arena_bytes = budget_bytes - stage_bytes - activations - logits
        least = ArenaLayout.bytes_for(spec, num_layers, config.block_size, elem_bytes, 1)
        if arena_bytes < least:
            raise ValueError(
                f"memory budget: {_size(budget_bytes)} leaves {_size(arena_bytes)} for the arena of {num_layers} "
                f"layers, which needs {_size(least)} for them and one KV block; the rest goes to the embeddings and "
                f"LM head ({_size(stage_bytes)}), "
                f"activations of max_num_batched_tokens={config.max_num_batched_tokens} ({_size(activations)}) and "
                f"the sampler's logits for max_num_seqs={config.max_num_seqs} ({_size(logits)})"
            )
    return ArenaLayout.build(spec, num_layers, config.block_size, elem_bytes, arena_bytes)
