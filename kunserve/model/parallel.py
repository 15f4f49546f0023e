"""The collectives a model stage's ranks run under tensor parallelism (Megatron-style).

Each of a stage's t ranks holds a shard of every layer (kunserve/arch/schema.py says which):
its column-parallel GEMMs (q/k/v, gate/up) give it whole heads and MLP channels, its
row-parallel ones (o, down) partial sums that one all-reduce per GEMM adds up, so every rank
holds the same hidden states between layers. The embedding and the LM head are split by vocab
rows: a rank embeds the ids in its slice (all-reduced: the others add zeros) and computes its
slice of the logits (gathered, since sampling needs a whole row). kunserve/worker/parallel.py
makes the process group; one rank alone runs none of this.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

SAMPLER_RANK = 0  # the rank that samples for its stage


class Collectives(Protocol):
    """What the ranks use of their group: a torch.distributed backend of their own (gloo's or
    NCCL's), outside any world, called directly."""

    def allreduce(self, tensors: list[torch.Tensor]) -> dist.Work: ...

    def allgather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor]) -> dist.Work: ...

    def broadcast(self, tensor: torch.Tensor, root: int) -> dist.Work: ...


class TensorParallel:
    """This rank's place among a stage's `size` ranks, and their collectives over `group`."""

    def __init__(self, rank: int = 0, size: int = 1, group: Collectives | None = None) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"tensor-parallel rank: {rank} is not in [0, {size})")
        if size > 1 and group is None:
            raise ValueError("tensor-parallel ranks need a process group")
        self.rank, self.size, self.group = rank, size, group

    @property
    def samples(self) -> bool:
        """Whether this rank samples (and answers) for its stage: rank 0."""
        return self.rank == SAMPLER_RANK

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' partial sums added up, in place."""
        if self.group is not None:
            self.group.allreduce([x]).wait()
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, n] on each rank -> [rows, t·n]: the ranks' columns side by side, rank order."""
        if self.group is None:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=-1)

    def broadcast_from_sampler(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank (in place; the others pass a buffer of its shape)."""
        if self.group is not None:
            self.group.broadcast(x, SAMPLER_RANK).wait()
        return x

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel embedding: this rank's `table` holds the rows of ids [r·n, (r+1)·n)
        (ModelSpec.vocab_per_rank); it looks up the ids in its slice, zeros for the others,
        and the all-reduce puts every row together."""
        if self.size == 1:
            return torch.nn.functional.embedding(ids, table)
        rows = table.shape[0]
        local = ids - self.rank * rows
        outside = (local < 0) | (local >= rows)
        hidden = torch.nn.functional.embedding(local.masked_fill(outside, 0), table)
        return self.all_reduce(hidden.masked_fill_(outside.unsqueeze(-1), 0))


SINGLE = TensorParallel()  # one rank: no collectives
