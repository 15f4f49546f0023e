"""Asynchronous scheduling: the engine schedules and submits the next step while the one on
the device runs, each decode of it taking its input token from that step's output on the
device. Outputs are those of scheduling one step at a time, whatever stops, preempts or
aborts a request meanwhile. On CPU the executor computes a step as it is submitted, so these
tests run the same control plane and token hand-over that a GPU overlaps."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_prompts

from kunserve import LLM, SamplingParams
from kunserve.engine.block_manager import BlockManager
from kunserve.engine.scheduler import Scheduler, SchedulerOutput
from kunserve.engine.sequence import Sequence
from kunserve.engine.step_builder import build_step_input

MAX_MODEL_LEN = 128
PROMPT_LENGTHS = (3, 40, 17, 90, 1, 64)
MAX_TOKENS = (12, 30, 5, 20, 25, 1)
BLOCK = 4


def _llm(llama_dir: Path, async_scheduling: str, **overrides: object) -> LLM:
    settings: dict = {"max_model_len": MAX_MODEL_LEN, "max_num_batched_tokens": 32, "max_num_seqs": 8}
    settings.update(overrides)
    return LLM(str(llama_dir), async_scheduling=async_scheduling, **settings)


def _tokens(llm: LLM, params: list[SamplingParams], prompts: list[list[int]] | None = None) -> list[list[int]]:
    prompts = prompts or make_prompts(256, PROMPT_LENGTHS)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _greedy(**extra: object) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **extra) for n in MAX_TOKENS]


@pytest.fixture(scope="module")
def synchronous(llama_dir: Path) -> list[list[int]]:
    return _tokens(_llm(llama_dir, "off"), _greedy())


def test_a_decoding_engine_keeps_one_step_on_the_device_between_steps(llama_dir: Path) -> None:
    in_flight = {}
    for mode in ("on", "off"):
        engine = _llm(llama_dir, mode).engine
        engine.add_request("r", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
        for _ in range(4):
            engine.step()
        in_flight[mode] = engine.num_in_flight
    assert in_flight == {"on": 1, "off": 0}


def test_greedy_tokens_equal_scheduling_one_step_at_a_time(llama_dir: Path, synchronous: list[list[int]]) -> None:
    assert _tokens(_llm(llama_dir, "on"), _greedy()) == synchronous


def test_the_static_decode_buffers_take_the_tokens_of_the_step_before(llama_dir: Path) -> None:
    # The path CUDA graphs replay (Triton kernels under the interpreter on CPU).
    pytest.importorskip("triton")
    prompts = make_prompts(256, (3, 20, 9))
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)] * 3
    outputs = {}
    for mode in ("on", "off"):
        llm = _llm(llama_dir, mode, attention_backend="triton", enforce_eager=False, num_kv_blocks=32, max_model_len=64)
        assert llm.engine.executor.worker.runner.graphs is not None
        outputs[mode] = _tokens(llm, params, prompts)
    assert outputs["on"] == outputs["off"]


def test_a_request_stopped_by_a_token_drops_the_step_run_ahead_of_it(
    llama_dir: Path, synchronous: list[list[int]]
) -> None:
    stop_token = synchronous[1][10]  # request 1 stops at its 11th token (or earlier, if it repeats)
    params = _greedy(stop_token_ids=[stop_token])
    expected = _tokens(_llm(llama_dir, "off"), params)
    assert len(expected[1]) <= 11 < MAX_TOKENS[1]
    assert _tokens(_llm(llama_dir, "on"), params) == expected


def test_seeded_sampling_draws_the_same_tokens(llama_dir: Path) -> None:
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=n, ignore_eos=True)
              for i, n in enumerate(MAX_TOKENS)]
    assert _tokens(_llm(llama_dir, "on"), params) == _tokens(_llm(llama_dir, "off"), params)


def test_under_kv_pressure_preempted_requests_keep_their_tokens(
    llama_dir: Path, synchronous: list[list[int]]
) -> None:
    llm = _llm(llama_dir, "on", num_kv_blocks=14, block_size=8)
    assert _tokens(llm, _greedy()) == synchronous
    engine = llm.engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_aborting_a_request_with_a_step_ahead_in_flight_leaves_the_others_intact(
    llama_dir: Path, synchronous: list[list[int]]
) -> None:
    engine = _llm(llama_dir, "on").engine
    prompts = make_prompts(256, PROMPT_LENGTHS)
    for i, (prompt, params) in enumerate(zip(prompts, _greedy(), strict=True)):
        engine.add_request(str(i), prompt, params)
    finished = {}
    for step in range(200):
        if step == 6:
            assert engine.num_in_flight == 1
            aborted = engine.abort_request("1")
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert aborted is not None and aborted.outputs[0].finish_reason == "abort" and "1" not in finished
    assert [finished[str(i)].outputs[0].token_ids for i in (0, 2, 3, 4, 5)] == [synchronous[i] for i in (0, 2, 3, 4, 5)]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


# ---- the scheduler's part ---------------------------------------------------------------


def _decoding(scheduler: Scheduler, name: str, prompt_len: int, max_tokens: int = 50) -> Sequence:
    """A sequence whose prompt was prefilled and whose first token came back (the running
    ones decoded a token in the same step)."""
    seq = Sequence(name, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens),
                   max_total_tokens=prompt_len + max_tokens)
    scheduler.add(seq)
    out = _launch(scheduler)
    scheduler.update(out, [7] * len(out.scheduled))
    return seq


def _launch(scheduler: Scheduler, ahead: bool = False) -> SchedulerOutput:
    out = scheduler.schedule(ahead=ahead)
    build_step_input(out.scheduled, BLOCK, [])
    scheduler.launch(out)
    return out


def test_a_decode_ahead_takes_its_input_from_its_row_of_the_step_before() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(16)), max_num_seqs=8, max_num_batched_tokens=100)
    first, second = _decoding(scheduler, "a", 3), _decoding(scheduler, "b", 6)
    _launch(scheduler)  # both decode; their tokens are in flight
    ahead = scheduler.schedule(ahead=True)
    step = build_step_input(ahead.scheduled, BLOCK, [])
    assert [(seq, n) for seq, n in ahead.scheduled] == [(first, 1), (second, 1)]
    assert step.positions.tolist() == [len(first), len(second)]  # the positions of the tokens in flight
    assert step.ahead_token_index.tolist() == [0, 1] and step.ahead_sample_rows.tolist() == [0, 1]
    assert step.sample_rows.tolist() == [0, 1]


def test_no_decode_runs_ahead_of_a_sequences_last_token() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(16)), max_num_seqs=8, max_num_batched_tokens=100)
    seq = _decoding(scheduler, "a", 3, max_tokens=2)  # the token in flight is its last
    _launch(scheduler)
    assert seq.in_flight and scheduler.schedule(ahead=True).is_empty


def test_a_step_ahead_is_empty_rather_than_preempting_when_blocks_run_short() -> None:
    scheduler = Scheduler(BlockManager(BLOCK, range(4)), max_num_seqs=8, max_num_batched_tokens=100)
    seqs = [_decoding(scheduler, name, 4) for name in ("a", "b")]
    _launch(scheduler)
    out = scheduler.schedule(ahead=True)
    assert out.is_empty and not out.preempted
    assert all(seq in scheduler.running for seq in seqs)
