"""A worker as a Ray actor: one device, one pipeline stage, on any node of a Ray cluster.

The stage is set up and its commands handled as in a worker process
(kunserve/worker/worker_process.py): a command arrives as a call of `handle` (the actor runs
its calls one at a time, in the order the driver made them) and the call returns the
command's reply, or None where it has none. kunserve/executor/ray_executor.py makes the
class an actor, so this module imports Ray only inside the actor.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any

import torch

from kunserve.config import EngineConfig
from kunserve.layout import ArenaLayout
from kunserve.logs import configure_worker
from kunserve.model.presets import ResolvedModel
from kunserve.worker.protocol import Command, Reply, StageAssignment
from kunserve.worker.worker_process import CommandHandler, start_worker


class RayWorker:
    def __init__(self, config: EngineConfig, model: ResolvedModel, stage: StageAssignment) -> None:
        import ray

        configure_worker(stage.log_name)
        if torch.device(stage.device).type == "cuda":
            # The actor sees all of the node's GPUs (ray_executor.py), so that it can map its
            # peers' arenas: it picks the one Ray gave it.
            stage = dataclasses.replace(stage, device=f"cuda:{visible_index(ray.get_gpu_ids()[0])}")
        self.worker = start_worker(config, model, stage)
        self.handler = CommandHandler(self.worker, stage)
        self.node_id: str = ray.get_runtime_context().get_node_id()

    def ready(self) -> tuple[str, ArenaLayout]:
        return Reply.READY, self.worker.layout

    def identity(self) -> tuple[str, int]:
        """The Ray node this worker runs on, and its process id."""
        return self.node_id, os.getpid()

    def handle(self, message: bytes) -> tuple[str, Any] | None:
        """One pickled (command, argument) of the driver; "shutdown" unmaps the peers' memory
        (the driver then ends the actor)."""
        command, argument = pickle.loads(message)
        if command == Command.SHUTDOWN:
            self.handler.close()
            return None
        return self.handler.handle(command, argument)


def visible_index(gpu_id: int | str) -> int:
    """Torch's index of the node's GPU `gpu_id` (Ray's id: among CUDA_VISIBLE_DEVICES where the
    node was started with it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",").index(str(gpu_id)) if visible else int(gpu_id)
