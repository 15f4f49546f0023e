"""What the engine's outputs carry while a request runs, by output kind (as in vLLM):
FINAL_ONLY one output at the end, CUMULATIVE everything so far each step, DELTA only what
is new; and the per-step stats a metrics listener receives."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from kunserve import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from kunserve.engine.stats import StepStats
from kunserve.sampling_params import RequestOutputKind

PROMPT = "Once upon a time"
# Sampled at temperature 1 from a random model: the text is full of partial UTF-8 characters.
SAMPLED = SamplingParams(temperature=1.0, seed=3, max_tokens=48, ignore_eos=True)

_ids = itertools.count()


@pytest.fixture(scope="module")
def engine(llama_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(llama_dir), max_model_len=256))


def run(engine: LLMEngine, params: SamplingParams, kind: RequestOutputKind) -> list[RequestOutput]:
    request_id = f"r{next(_ids)}"
    engine.add_request(request_id, PROMPT, dataclasses.replace(params, output_kind=kind))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [out for out in engine.step() if out.request_id == request_id]
    return outputs


def test_final_only_gives_one_output_when_the_request_finishes(engine: LLMEngine) -> None:
    outputs = run(engine, SAMPLED, RequestOutputKind.FINAL_ONLY)
    assert len(outputs) == 1 and outputs[0].finished
    assert len(outputs[0].outputs[0].token_ids) == SAMPLED.max_tokens


def test_delta_outputs_carry_one_new_token_each(engine: LLMEngine) -> None:
    outputs = run(engine, SAMPLED, RequestOutputKind.DELTA)
    assert [len(out.outputs[0].token_ids) for out in outputs] == [1] * SAMPLED.max_tokens
    assert [out.finished for out in outputs] == [False] * (SAMPLED.max_tokens - 1) + [True]


def test_delta_outputs_add_up_to_the_final_output(engine: LLMEngine) -> None:
    final = run(engine, SAMPLED, RequestOutputKind.FINAL_ONLY)[0].outputs[0]
    deltas = [out.outputs[0] for out in run(engine, SAMPLED, RequestOutputKind.DELTA)]
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids


def test_cumulative_outputs_grow_by_extension_to_the_final_output(engine: LLMEngine) -> None:
    final = run(engine, SAMPLED, RequestOutputKind.FINAL_ONLY)[0].outputs[0]
    steps = [out.outputs[0] for out in run(engine, SAMPLED, RequestOutputKind.CUMULATIVE)]
    for before, after in itertools.pairwise(steps):
        assert after.text.startswith(before.text) and after.token_ids[:-1] == before.token_ids
    assert (steps[-1].text, steps[-1].token_ids) == (final.text, final.token_ids)


def test_delta_text_never_shows_a_stop_string(engine: LLMEngine) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    text = run(engine, greedy, RequestOutputKind.FINAL_ONLY)[0].outputs[0].text
    stop = text[20:24]
    deltas = [out.outputs[0].text for out in run(engine, dataclasses.replace(greedy, stop=[stop]),
                                                 RequestOutputKind.DELTA)]
    assert "".join(deltas) == text[: text.find(stop)]


def test_a_stats_listener_sees_every_token_and_the_finished_request(engine: LLMEngine) -> None:
    seen: list[StepStats] = []
    engine.stats_listener = seen.append
    try:
        outputs = run(engine, SAMPLED, RequestOutputKind.FINAL_ONLY)
    finally:
        engine.stats_listener = None
    n = SAMPLED.max_tokens
    assert sum(s.num_generation_tokens for s in seen) == n
    assert sum(s.num_prompt_tokens for s in seen) == len(outputs[0].prompt_token_ids)
    assert [len(s.time_to_first_token_s) for s in seen].count(1) == 1
    assert sum(len(s.inter_token_latency_s) for s in seen) == n - 1
    (finished,) = [f for s in seen for f in s.finished]
    assert (finished.finish_reason, finished.num_generation_tokens) == ("length", n)
    assert seen[-1].num_running == 0 and seen[-1].kv_cache_usage == 0.0
