"""Driving engines by hand in tests: every engine one step per round, finished tokens kept."""

from __future__ import annotations

from kunserve.engine.llm_engine import LLMEngine


def run_steps(engines: list[LLMEngine], steps: int, finished: dict[str, list[int]]) -> None:
    """`steps` rounds of one step per engine; each finished request's tokens go into `finished`."""
    for _ in range(steps):
        for engine in engines:
            for out in engine.step():
                finished[out.request_id] = out.outputs[0].token_ids
