"""Engine settings. Names follow vLLM's engine arguments where the meaning is the same."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GiB = 1 << 30
PREEMPTION_MODES = ("recompute", "swap", "auto")
SWAPPING_MODES = frozenset({"swap", "auto"})  # the preemption modes that keep a host swap pool
ASYNC_SCHEDULING = ("auto", "on", "off")
EXECUTOR_BACKENDS = ("auto", "uni", "mp", "ray")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "cpu")
LINEAR_BACKENDS = ("auto", "torch", "onednn", "onednn-packed")
LOAD_FORMATS = ("auto", "dummy")  # safetensors from the model directory, or seeded random weights
# Ray's placement group strategies: STRICT_PACK puts all of a replica's devices on one node.
RAY_PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


@dataclass
class EngineConfig:
    model: str | None = None  # a local HF model directory or a preset name; None = the embedded tiny model
    tokenizer: str | None = None  # defaults to the model directory
    skip_tokenizer_init: bool = False  # prompts must then be token ids, and outputs carry no text
    dtype: str = "auto"  # "auto" = the checkpoint's dtype; float32 | float16 | bfloat16
    device: str = "auto"  # "auto" = cuda when available, else cpu
    load_format: str = "auto"  # "auto" = safetensors from the model directory; "dummy" = seeded random
    # "auto" = triton on CUDA, cpu on CPU (decode attention in a C kernel, built once per machine;
    # the torch reference where no C compiler is found); or "torch" (the reference) | "triton" | "cpu"
    attention_backend: str = "auto"
    # "auto" = onednn for float32 on CPU, torch elsewhere; "torch" (F.linear) | "onednn" (oneDNN's
    # matmul over the arena's weights) | "onednn-packed" (float32 on CPU: each weight packed once
    # into oneDNN's layout, faster GEMMs for a second copy of the weights beside the arena)
    linear_backend: str = "auto"
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    max_graph_batch_size: int = 256  # largest decode batch replayed from a CUDA graph
    # Steps with prompt tokens, up to this many tokens, replayed from CUDA graphs piecewise
    # around attention (kunserve/worker/prompt_graphs.py); 0: such steps run eagerly.
    prompt_graph_max_tokens: int = 0
    seed: int = 0
    # Memory: the arena (decoder-layer parameters + KV blocks) is sized from the first of these set.
    num_kv_blocks: int | None = None  # exact KV block count (tests, experiments)
    memory_budget_bytes: int | None = None  # absolute budget for all of this engine's device memory
    gpu_memory_utilization: float = 0.9  # fraction of the GPU's memory, as in vLLM
    cpu_kv_cache_bytes: int = GiB  # KV bytes on CPU when no budget is given (as VLLM_CPU_KVCACHE_SPACE)
    block_size: int = 16  # tokens per KV block
    # Scheduling.
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # per-step token budget; longer prompts are prefilled in chunks
    # What a preempted request loses: "recompute" frees its KV (recomputed when it runs again),
    # "swap" copies its KV to host memory and back (swap_space_bytes per device, pinned on GPUs);
    # "auto" chooses per request: swap where copying its KV out and back over the host link
    # costs less time than recomputing it, else recompute (kunserve/engine/preemption.py).
    preemption_mode: str = "recompute"
    # Schedule and stage a step while the previous one runs, so the host's work overlaps the
    # device's (one device, recompute preemption): "auto" = on CUDA devices, "on" | "off".
    async_scheduling: str = "auto"
    # A replica scheduling ahead forms the next step just before the running one's predicted
    # end, so that it takes the requests arriving meanwhile: this fraction of the running
    # step's time before it, beyond the driver's own time to form a step (a margin for the
    # prediction's error and the worker's time to start the step). 1: as soon as the running
    # step starts (a request arriving during a step then waits a step more).
    ahead_slack: float = 0.25
    swap_space_bytes: int = 4 * GiB
    # Pipelines: balance micro-batches by predicted step time (kunserve/engine/lookahead.py);
    # False splits the sequences evenly by count.
    lookahead_batching: bool = True
    lookahead_min_chunk_tokens: int = 32  # shortest prefill chunk a balanced micro-batch cuts
    cost_profile: str | None = None  # a cost-model file (benchmarks/profile_steps.py); None: packaged or estimated
    bubble_window_s: float = 5.0  # the pipeline bubble metric covers this much time
    # Devices.
    pipeline_parallel_size: int = 1  # stages of the model, one device (and worker process) each
    # Ranks splitting each stage's layers (Megatron-style tensor parallelism), one device (and
    # worker process) each: a replica has pipeline_parallel_size x tensor_parallel_size devices.
    tensor_parallel_size: int = 1
    # "uni": in this process; "mp": worker processes; "ray": Ray actors, on several hosts; auto: mp if > 1 device
    distributed_executor_backend: str = "auto"
    ray_address: str | None = None  # the Ray cluster "ray" attaches to; None: RAY_ADDRESS, else a new local one
    ray_placement_strategy: str = "STRICT_PACK"  # how a replica's (or pipeline's) devices spread over Ray nodes
    worker_threads: int | None = None  # torch CPU threads per worker process; None: torch's default
    # How long the driver waits for a worker's answer (a step's tokens, a device call's result)
    # before it counts the worker as hung, kills it and fails (then restarts) its replica; also
    # how long a link between two workers waits for its peer. Generous: a step takes
    # milliseconds to a few seconds, but a new shape's first step may compile kernels or capture
    # graphs (up to a minute on a GPU), and a false alarm costs a restart.
    worker_timeout_s: float = 120.0
    # The same for work that loads weights: a worker's start (checkpoint, kernels built once per
    # machine), and refilling released layers from the checkpoint; large models take minutes.
    worker_start_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.prompt_graph_max_tokens < 0:
            raise ValueError(f"prompt_graph_max_tokens: must be >= 0, got {self.prompt_graph_max_tokens}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len: must be >= 1, got {self.max_model_len}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend: expected one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend: expected one of {LINEAR_BACKENDS}, got {self.linear_backend!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode: expected one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if self.async_scheduling not in ASYNC_SCHEDULING:
            raise ValueError(f"async_scheduling: expected one of {ASYNC_SCHEDULING}, got {self.async_scheduling!r}")
        if not 0 <= self.ahead_slack <= 1:
            raise ValueError(f"ahead_slack: must be in [0, 1], got {self.ahead_slack}")
        if self.swap_space_bytes < 0:
            raise ValueError(f"swap_space_bytes: must be >= 0, got {self.swap_space_bytes}")
        if self.lookahead_min_chunk_tokens < 1:
            raise ValueError(f"lookahead_min_chunk_tokens: must be >= 1, got {self.lookahead_min_chunk_tokens}")
        if self.bubble_window_s <= 0:
            raise ValueError(f"bubble_window_s: must be > 0, got {self.bubble_window_s}")
        if self.worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s: must be > 0, got {self.worker_timeout_s}")
        if self.worker_start_timeout_s <= 0:
            raise ValueError(f"worker_start_timeout_s: must be > 0, got {self.worker_start_timeout_s}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size: must be >= 1, got {self.pipeline_parallel_size}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(
                f"distributed_executor_backend: expected one of {EXECUTOR_BACKENDS}, "
                f"got {self.distributed_executor_backend!r}"
            )
        if self.ray_placement_strategy not in RAY_PLACEMENT_STRATEGIES:
            raise ValueError(
                f"ray_placement_strategy: expected one of {RAY_PLACEMENT_STRATEGIES}, "
                f"got {self.ray_placement_strategy!r}"
            )
        if self.distributed_executor_backend == "uni" and self.devices_per_replica > 1:
            raise ValueError("distributed_executor_backend: 'uni' runs one device; pipelines and tensor "
                             "parallelism need 'mp' or 'ray'")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format: expected one of {LOAD_FORMATS}, got {self.load_format!r}")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def can_swap(self) -> bool:
        """Whether preemption may swap: the devices then keep a host swap pool."""
        return self.preemption_mode in SWAPPING_MODES

    @property
    def devices_per_replica(self) -> int:
        return self.pipeline_parallel_size * self.tensor_parallel_size

    def stage_device(self, rank: int) -> torch.device:
        """The device of a replica's device `rank` (stage s, tensor-parallel rank r: s·t + r):
        on CUDA, the device after `device` by `rank`."""
        device = self.resolve_device()
        if device.type != "cuda":
            return device
        return torch.device("cuda", (device.index or 0) + rank)

    def resolve_async_scheduling(self, device: torch.device) -> bool:
        """Whether an engine on `device` schedules a step ahead: only CUDA runs a step
        while the host goes on (on CPU it would only delay every output by a step)."""
        if self.async_scheduling == "auto":
            return device.type == "cuda"
        return self.async_scheduling == "on"

    def resolve_executor_backend(self) -> str:
        if self.distributed_executor_backend != "auto":
            return self.distributed_executor_backend
        return "uni" if self.devices_per_replica == 1 else "mp"
