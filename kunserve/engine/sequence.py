"""A request as the scheduler sees it: its tokens, how many have KV, and its block table."""

from __future__ import annotations

import enum
import itertools
import time

from kunserve.outputs import RequestMetrics
from kunserve.sampling_params import SamplingParams

# Requests in the order they arrived, process-wide: first come, first served across engines
# (a drop merges several replicas' queues) even where two arrivals read the same clock.
_ARRIVAL_ORDER = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted, its KV in host memory (host_block_ids)
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_total_tokens: int,
        prompt: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        # This request's row of a step's sampling arrays (top_k 0 = no cut), built once.
        p = sampling_params
        self.sampling_row = (p.temperature, p.top_p, max(p.top_k, 0), p.min_p)
        # Prompt plus output never exceeds this (max_tokens and max_model_len folded in).
        self.max_total_tokens = max_total_tokens
        self.num_computed_tokens = 0  # tokens whose KV is in this sequence's blocks
        self.block_ids: list[int] = []
        self.host_block_ids: list[int] = []  # while swapped out: where block_ids' KV went
        self.status = SequenceStatus.WAITING
        # Tokens in submitted steps not yet come back: a pipeline may run a prompt's next
        # chunk while the previous one is still in flight (each stage runs them in order).
        self.num_in_flight_tokens = 0
        # Its row among the sampled tokens of the last step it was launched in that samples it:
        # where a step scheduled ahead of that one finds its input token (kunserve/step.py).
        self.sample_row_in_flight = -1
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.metrics = RequestMetrics(arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        self.arrival_order = next(_ARRIVAL_ORDER)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def age_key(self) -> tuple[float, int]:
        """Orders running sequences as admitted (preemption takes the youngest)."""
        return (self.metrics.first_scheduled_time or 0.0, self.arrival_order)

    @property
    def in_flight(self) -> bool:
        return self.num_in_flight_tokens > 0

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens computed or in flight: where the next chunk starts."""
        return self.num_computed_tokens + self.num_in_flight_tokens

    @property
    def awaits_token(self) -> bool:
        """Its last scheduled chunk samples and has not come back: nothing to schedule."""
        in_flight = self.num_in_flight_tokens  # as in_flight and num_scheduled_tokens, read once (hot)
        return in_flight > 0 and self.num_computed_tokens + in_flight >= len(self.token_ids)

    @property
    def can_run_ahead(self) -> bool:
        """Its last scheduled chunk samples, that token is still in flight, and it may get
        another: a step scheduled ahead can decode it with that token taken on the device."""
        in_flight, length = self.num_in_flight_tokens, len(self.token_ids)  # read once (hot)
        return in_flight > 0 and self.num_computed_tokens + in_flight == length and length + 1 < self.max_total_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
