"""Which way a preempted request goes under preemption_mode "auto": its KV swapped to host
memory and back, or freed and recomputed later, whichever the cost model says takes less time.

A swap costs the host link's time to copy the victim's KV out, behind the swap-outs already
under way, and back in, behind every block already in host memory (swapped sequences come
back oldest first, so the victim's KV returns after theirs) and the swap-ins under way: a
busy host link makes a further swap dearer. A recompute costs what prefilling its computed
tokens again adds to the steps that carry it: the step predictor's time for those chunks over
an empty step's (a step's fixed cost is paid with or without them). Both are priced for one
device: a pipeline stage copies and recomputes only its own layers' part, side by side with
the other stages, each over its own host link.
"""

from __future__ import annotations

from dataclasses import dataclass

from kunserve.engine.cost_model import CostModel, StagePredictor, StepShape
from kunserve.engine.sequence import Sequence

HOST_LINK = "host"  # the cost model's link between (pinned) host memory and a device


@dataclass(frozen=True)
class HostLinkLoad:
    """Swap traffic ahead of a new swap on one device's host link, in KV blocks."""

    out_blocks: int  # swap-outs under way: the step being formed, and the steps in flight
    in_blocks: int  # to come back first: blocks held in host memory, and swap-ins in flight


class SwapOrRecompute:
    """Prices a victim's swap and its recompute on one stage of `layers` layers whose KV
    block (of all its layers) is `block_bytes`; recomputes are prefilled in chunks of at most
    `chunk_tokens` (the step's token budget)."""

    def __init__(self, cost_model: CostModel, layers: int, block_bytes: int, chunk_tokens: int) -> None:
        if HOST_LINK not in cost_model.links:
            raise ValueError(f"cost_model: has no {HOST_LINK!r} link to price swaps over (it has {sorted(cost_model.links)})")
        self.cost_model = cost_model
        self.predict = StagePredictor(cost_model, layers)
        self.block_bytes = block_bytes
        self.chunk_tokens = chunk_tokens
        self._empty_step_s = self.predict(StepShape())

    def swaps(self, seq: Sequence, load: HostLinkLoad) -> bool:
        """Whether swapping `seq` out (and back) costs less time than recomputing it."""
        return self.swap_s(len(seq.block_ids), load) < self.recompute_s(seq.num_computed_tokens)

    def swap_s(self, num_blocks: int, load: HostLinkLoad) -> float:
        """Until `num_blocks` blocks are out and back in, each way behind the link's load."""
        out = self.cost_model.transfer_time((load.out_blocks + num_blocks) * self.block_bytes, HOST_LINK)
        back = self.cost_model.transfer_time((load.in_blocks + num_blocks) * self.block_bytes, HOST_LINK)
        return out + back

    def recompute_s(self, num_tokens: int) -> float:
        """What prefilling `num_tokens` again, in chunks of the step's budget, adds to steps."""
        seconds = 0.0
        for start in range(0, num_tokens, self.chunk_tokens):
            chunk = StepShape.of_chunk(start, min(self.chunk_tokens, num_tokens - start), samples=False)
            seconds += self.predict(chunk) - self._empty_step_s
        return seconds
