"""What an engine step did, for metrics: the engine fills these, a listener (the server's
Prometheus metrics) consumes them. Nothing is built unless a listener is set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kunserve.engine.sequence import Sequence


@dataclass
class FinishedRequestStats:
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency_s: float
    queue_time_s: float | None  # None: aborted before it was ever scheduled
    time_per_output_token_s: float | None  # None below two output tokens

    @classmethod
    def of(cls, seq: Sequence) -> FinishedRequestStats:
        m = seq.metrics
        assert m.finished_time is not None and seq.finish_reason is not None
        queue_time = None if m.first_scheduled_time is None else m.first_scheduled_time - m.arrival_time
        tpot = None
        if seq.num_output_tokens > 1 and m.first_token_time is not None:
            tpot = (m.finished_time - m.first_token_time) / (seq.num_output_tokens - 1)
        return cls(
            seq.finish_reason,
            seq.num_prompt_tokens,
            seq.num_output_tokens,
            m.finished_time - m.arrival_time,
            queue_time,
            tpot,
        )


@dataclass(frozen=True)
class PipelineBusy:
    """A pipeline's stage time over a period: computed (`busy_s`, summed over stages) and
    available (`stage_s`: stages x the time its steps were in flight). The rest is bubble."""

    busy_s: float = 0.0
    stage_s: float = 0.0

    def __add__(self, other: PipelineBusy) -> PipelineBusy:
        return PipelineBusy(self.busy_s + other.busy_s, self.stage_s + other.stage_s)

    @property
    def bubble_fraction(self) -> float | None:
        """Idle stage time / total; None when the pipeline had nothing in flight."""
        if self.stage_s <= 0:
            return None
        return min(1.0, max(0.0, 1.0 - self.busy_s / self.stage_s))


@dataclass
class StepStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks holding KV
    num_kv_blocks: int = 0  # the KV pool's size: it grows when parameters are released
    num_preemptions: int = 0  # in this step
    num_prompt_tokens: int = 0  # prompts of the requests that got their first token
    num_generation_tokens: int = 0
    time_to_first_token_s: list[float] = field(default_factory=list)
    inter_token_latency_s: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
    pipeline: PipelineBusy | None = None  # set when a bubble window (config.bubble_window_s) closes


StatsListener = Callable[[StepStats], None]


def group_stats_listener(listeners: list[StatsListener | None]) -> StatsListener | None:
    """Where a drop group's steps are reported: to its first member's listener (its loop runs
    the group) in full; to each other member's, whose requests now run in the group, no
    requests of its own but the group's KV figures (its device holds a share of that KV), so no
    member's series stands still while grouped. None when no member has a listener."""
    if all(listener is None for listener in listeners):
        return None

    def report(stats: StepStats) -> None:
        first, others = listeners[0], listeners[1:]
        if first is not None:
            first(stats)
        share = StepStats(kv_cache_usage=stats.kv_cache_usage, num_kv_blocks=stats.num_kv_blocks)
        for listener in others:
            if listener is not None:
                listener(share)

    return report
