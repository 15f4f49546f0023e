"""A worker process: one device, one pipeline stage.

Commands come from the driver over a pipe (the light control channel: pickled host
arrays). Activations go from stage to stage through torch.distributed point-to-point
(gloo on CPU, NCCL on GPU); only the last stage answers a step, with its sampled tokens.
Every stage gets every step command, so each knows the batch's shape without asking.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from kunserve.config import EngineConfig
from kunserve.model.presets import ResolvedModel
from kunserve.step import StepInput
from kunserve.worker.worker import Worker, build_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageAssignment:
    rank: int
    num_stages: int
    layer_range: tuple[int, int]
    device: str
    dist_init_method: str  # where the stages of one group meet, e.g. tcp://127.0.0.1:port
    # Stages of a pipeline hold different layer counts, so their arenas place KV blocks at
    # different ids: the driver then speaks logical ids 0..B-1 and each stage adds its own
    # first KV block id. A single stage uses its physical ids (release/reclaim address them).
    logical_block_ids: bool


def worker_main(config: EngineConfig, model: ResolvedModel, stage: StageAssignment, conn: Connection) -> None:
    """The process's entry point: build the stage, report its layout, then serve commands."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker{stage.rank}: %(message)s")
    try:
        if config.worker_threads is not None:
            torch.set_num_threads(config.worker_threads)
        device = torch.device(stage.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if stage.num_stages > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=stage.dist_init_method, rank=stage.rank,
                                    world_size=stage.num_stages)
        worker = build_worker(config, model, stage.layer_range, device)
        conn.send(("ready", worker.layout))
        _serve(worker, stage, conn)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _serve(worker: Worker, stage: StageAssignment, conn: Connection) -> None:
    block_offset = worker.layout.initial_kv_blocks().start if stage.logical_block_ids else 0
    is_last = stage.rank == stage.num_stages - 1
    dtype = worker.arena.buffer.dtype
    while True:
        command, argument = conn.recv()
        if command == "execute":
            step: StepInput = argument
            if block_offset:
                step.batch.block_tables += block_offset
                step.batch.slot_mapping += block_offset * worker.layout.block_size
            hidden_in = None
            if stage.rank > 0:
                hidden_in = torch.empty((step.num_tokens, worker.spec.hidden_size), dtype=dtype, device=worker.device)
                dist.recv(hidden_in, src=stage.rank - 1)
            hidden = worker.runner.forward(step, hidden_in)
            if is_last:
                conn.send(("sampled", worker.runner.sample(step, hidden)))
            else:
                dist.send(hidden.contiguous(), dst=stage.rank + 1)
        elif command == "release":
            conn.send(("released", worker.release_layer(argument)))
        elif command == "reclaim":
            worker.reclaim_layer(argument)
            conn.send(("reclaimed", None))
        elif command == "shutdown":
            return
        else:
            raise ValueError(f"unknown worker command {command!r}")
