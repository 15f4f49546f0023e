"""A tensor-parallel stage's process group.

There is no world of all of a cluster's workers (kunserve/executor/rendezvous.py says why):
the t ranks of a stage open a group of their own for their collectives
(kunserve/model/parallel.py), a torch.distributed backend of t members built at the driver's
rendezvous store like a pair's link (kunserve/worker/peers.py), with the same timeout. It is
named by the stage's first global rank, which no other worker ever has, so a restarted
replica's new ranks make a new group, and its members alone wait for each other: replicas
start and stop without waiting for each other's groups. A member that dies fails the
others' collectives (at once where its connection drops, else at the timeout); its replica,
the unit that restarts, then restarts with all of them.
"""

from __future__ import annotations

from typing import cast

import torch

from kunserve.model.parallel import SINGLE, Collectives, TensorParallel
from kunserve.worker.peers import PeerLinks
from kunserve.worker.protocol import StageAssignment


def tensor_parallel_group(stage: StageAssignment, peers: PeerLinks, device: torch.device) -> TensorParallel:
    """This worker's tensor-parallel rank among its stage's ranks, their group made (at `peers`'
    rendezvous) and connected (one all-reduce: NCCL makes its communicator at the first
    collective, which must not be inside a CUDA graph's capture); SINGLE for a stage of one
    rank."""
    if stage.tp_size == 1:
        return SINGLE
    group = peers.open_group(f"tp/{stage.stage_ranks[0]}", stage.tp_rank, stage.tp_size)
    tp = TensorParallel(stage.tp_rank, stage.tp_size, cast(Collectives, group))
    tp.all_reduce(torch.zeros(1, device=device))
    return tp
