"""The process groups a worker belongs to beyond the cluster's world.

Every worker of a cluster joins one torch.distributed world (worker_process.join_world);
pipeline activations, KV copies and weight refills go point to point within it. A
tensor-parallel stage's t ranks also form a group of their own for their collectives
(kunserve/model/parallel.py): its global ranks are consecutive (StageAssignment.stage_ranks),
and only its members create it (local synchronization), so replicas start and stop without
waiting for each other's groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kunserve.model.parallel import SINGLE, TensorParallel
from kunserve.worker.protocol import StageAssignment


def tensor_parallel_group(stage: StageAssignment, device: torch.device) -> TensorParallel:
    """This worker's tensor-parallel rank among its stage's ranks, their group made and
    connected (one all-reduce: NCCL makes its communicator at the first collective, which must
    not be inside a CUDA graph's capture); SINGLE for a stage of one rank."""
    if stage.tp_size == 1:
        return SINGLE
    group = dist.new_group(stage.stage_ranks, use_local_synchronization=True)
    tp = TensorParallel(stage.tp_rank, stage.tp_size, group)
    tp.all_reduce(torch.zeros(1, device=device))
    return tp
