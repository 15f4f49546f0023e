"""Driving engines and schedulers by hand in tests: every engine one step per round, finished
tokens kept; a scheduler's step completed as if the model had run it."""

from __future__ import annotations

from kunserve.engine.llm_engine import LLMEngine
from kunserve.engine.scheduler import Scheduler, SchedulerOutput
from kunserve.engine.sequence import Sequence
from kunserve.sampling_params import SamplingParams

SAMPLED_TOKEN = 7  # what the pretend model samples


def make_sequence(name: str, prompt_len: int) -> Sequence:
    """A request of `prompt_len` tokens that may generate 50 more."""
    return Sequence(name, list(range(prompt_len)), SamplingParams(max_tokens=50), max_total_tokens=prompt_len + 50)


def complete_step(scheduler: Scheduler, out: SchedulerOutput) -> None:
    """Launch `out` and report SAMPLED_TOKEN for every sequence whose prefill it finishes or decodes."""
    sampled = [SAMPLED_TOKEN for seq, n in out.scheduled if seq.num_computed_tokens + n == len(seq)]
    scheduler.launch(out)
    scheduler.update(out, sampled)


def run_steps(engines: list[LLMEngine], steps: int, finished: dict[str, list[int]]) -> None:
    """`steps` rounds of one step per engine; each finished request's tokens go into `finished`."""
    for _ in range(steps):
        for engine in engines:
            for out in engine.step():
                finished[out.request_id] = out.outputs[0].token_ids
