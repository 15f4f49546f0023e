"""Command-line flags for EngineConfig, shared by the commands that build engines
(`kunserve generate`, `serve`, `bench --launch`, `simulate`), and the help format every
command uses: each option's help ends with its default.

Flags are named after the fields (`max_num_seqs` -> `--max-num-seqs`), with vLLM's spellings
where vLLM has the setting: sizes in GiB (`--swap-space 4`, not bytes), `-pp` for
`--pipeline-parallel-size`, `-tp` for `--tensor-parallel-size`."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from kunserve.arch.spec import DTYPE_NAMES
from kunserve.config import (
    ASYNC_SCHEDULING,
    ATTENTION_BACKENDS,
    EXECUTOR_BACKENDS,
    LINEAR_BACKENDS,
    LOAD_FORMATS,
    PREEMPTION_MODES,
    RAY_PLACEMENT_STRATEGIES,
    EngineConfig,
    GiB,
)

# Fields whose value is a size in bytes: their flag takes GiB (a float), as vLLM's do.
GIB_FLAGS = {
    "memory_budget_bytes": "--memory-budget",
    "cpu_kv_cache_bytes": "--cpu-kv-cache-space",
    "swap_space_bytes": "--swap-space",
}
# Other spellings of a field's flag (vLLM's short forms, and shorter names).
FLAG_ALIASES = {
    "pipeline_parallel_size": ("-pp", "--pipeline-size"),
    "tensor_parallel_size": ("-tp",),
    "distributed_executor_backend": ("--executor",),
}
CHOICES = {
    "dtype": ("auto", *DTYPE_NAMES),
    "load_format": LOAD_FORMATS,
    "attention_backend": ATTENTION_BACKENDS,
    "linear_backend": LINEAR_BACKENDS,
    "preemption_mode": PREEMPTION_MODES,
    "async_scheduling": ASYNC_SCHEDULING,
    "distributed_executor_backend": EXECUTOR_BACKENDS,
    "ray_placement_strategy": RAY_PLACEMENT_STRATEGIES,
}
HELP = {
    "model": "a local Hugging Face model directory, or a preset (tiny-llama, llama-3-8b, ...; "
             "default: the embedded tiny-llama)",
    "tokenizer": "tokenizer directory (default: the model directory's)",
    "skip_tokenizer_init": "load no tokenizer: prompts must be token ids and outputs carry no text",
    "dtype": "auto: the checkpoint's dtype",
    "device": "auto (cuda when available, else cpu), cpu, cuda or cuda:N",
    "load_format": "auto: safetensors from the model directory; dummy: seeded random weights (speed runs)",
    "attention_backend": "auto: triton on CUDA, the C kernels on CPU; torch: the reference",
    "linear_backend": "auto: onednn for float32 on CPU, torch elsewhere; onednn-packed: a packed second copy "
                      "of the weights (faster float32 GEMMs on CPU)",
    "enforce_eager": "no CUDA graphs for decode steps",
    "max_graph_batch_size": "largest decode batch replayed from a CUDA graph",
    "prompt_graph_max_tokens": "steps with prompt tokens, up to this many tokens, replayed from CUDA graphs "
                               "piecewise around attention (0: eager)",
    "seed": "seed of sampling and of dummy weights",
    "num_kv_blocks": "exactly this many KV blocks (overrides the memory settings)",
    "memory_budget_bytes": "GiB of device memory for all of this engine (weights, KV cache, activations) "
                           "(default: --gpu-memory-utilization of the GPU; on CPU --cpu-kv-cache-space of KV)",
    "gpu_memory_utilization": "fraction of the GPU's memory this engine may use, as in vLLM",
    "cpu_kv_cache_bytes": "GiB of KV cache on CPU when no --memory-budget is given (vLLM's VLLM_CPU_KVCACHE_SPACE)",
    "block_size": "tokens per KV block",
    "max_model_len": "longest prompt + output in tokens (default: the model's max_position_embeddings)",
    "max_num_seqs": "most requests in one step",
    "max_num_batched_tokens": "tokens per step; longer prompts are prefilled in chunks",
    "preemption_mode": "what a preempted request loses: recompute frees its KV, swap copies it to host memory, "
                       "auto swaps where that costs less time than recomputing (by the cost model)",
    "async_scheduling": "schedule the next step while this one runs (auto: on CUDA)",
    "ahead_slack": "a replica scheduling ahead forms the next step this fraction of the running step's "
                   "predicted time before its end, beyond the driver's time to form it (1: as the running one starts)",
    "swap_space_bytes": "GiB of host memory per device for swapped-out KV (--preemption-mode swap or auto), as vLLM's",
    "lookahead_batching": "pipelines: balance micro-batches by predicted step time (else by count)",
    "lookahead_min_chunk_tokens": "shortest prefill chunk a balanced micro-batch cuts",
    "cost_profile": "cost-model file (benchmarks/profile_steps.py) (default: the packaged one, else an estimate)",
    "bubble_window_s": "seconds the pipeline bubble metric covers",
    "pipeline_parallel_size": "pipeline stages per replica, one device (and worker process) each",
    "tensor_parallel_size": "devices each stage's layers are sharded over (heads, channels, vocabulary), one worker "
                            "process each",
    "distributed_executor_backend": "uni: in this process; mp: worker processes; ray: Ray actors on a Ray "
                                    "cluster (pip install kunserve[ray]); auto: mp when there are stages",
    "ray_address": "the Ray cluster to join (default: RAY_ADDRESS, else a new local one)",
    "ray_placement_strategy": "how a replica's devices spread over Ray nodes",
    "worker_threads": "torch CPU threads per worker process (default: torch's)",
    "worker_timeout_s": "seconds a worker may take to answer a step or a call (and a link its peer) before it "
                        "is killed as hung and its replica restarts",
    "worker_start_timeout_s": "seconds a worker may take to start, or to reload weights from the checkpoint",
}


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help states it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.default is argparse.SUPPRESS:
            return help_text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return help_text  # a required positional has no default
        return f"{help_text} (default: %(default)s)".lstrip()


def gib(text: str) -> int:
    """A flag's GiB (a float, as vLLM's --swap-space) as bytes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in GiB, e.g. 4 or 0.5, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a size in GiB must be >= 0, got {text!r}")
    return int(value * GiB)


def add_engine_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model",)) -> None:
    """One flag per EngineConfig field but those in `skip`; see kunserve/config.py."""
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        if f.name in skip:
            continue
        flags = (GIB_FLAGS.get(f.name, "--" + f.name.replace("_", "-")), *FLAG_ALIASES.get(f.name, ()))
        help_text = HELP.get(f.name, f.name.replace("_", " "))
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        elif f.name in GIB_FLAGS:
            # A string default goes through `type` too: shown in GiB, parsed to bytes.
            default = None if f.default is None else f"{f.default / GiB:g}"
            parser.add_argument(*flags, dest=f.name, type=gib, default=default, metavar="GIB", help=help_text)
        else:
            kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
            parser.add_argument(*flags, dest=f.name, type=kind, default=f.default, choices=CHOICES.get(f.name),
                                help=help_text)


def engine_config(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    """The EngineConfig of the parsed flags (fields without a flag keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    return EngineConfig(**{**values, **overrides})
