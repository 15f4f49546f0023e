"""A pipeline scheduling ahead: with every stage busy, the engine schedules and submits the
next micro-batch while the oldest is still in flight; that micro-batch's decodes take their
input tokens from the oldest's sampled ones, which the last stage sends back to the first
(gloo worker processes here). Specified: outputs are those of a pipeline stepping one
micro-batch at a time, for a static pipeline and for a group fused by a drop, whatever
stops or aborts a request meanwhile."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_prompts
from engine_steps import run_steps

from kunserve import LLM, EngineConfig, LLMEngine, SamplingParams
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.transitions import fuse, split
from kunserve.sampling_params import RequestOutputKind

MAX_MODEL_LEN = 128
PROMPT_LENGTHS = (3, 40, 17, 90, 1, 64, 25)
MAX_TOKENS = (12, 30, 5, 20, 25, 1, 16)
STAGES = 2


def _pipeline(llama_dir: Path, async_scheduling: str, **overrides: object) -> LLM:
    settings: dict = {"max_model_len": MAX_MODEL_LEN, "max_num_batched_tokens": 32, "max_num_seqs": 8,
                      "pipeline_parallel_size": STAGES, "worker_threads": 1}
    settings.update(overrides)
    return LLM(str(llama_dir), async_scheduling=async_scheduling, **settings)


def _tokens(llm: LLM, params: list[SamplingParams]) -> list[list[int]]:
    try:
        outputs = llm.generate(make_prompts(256, PROMPT_LENGTHS), params, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    return [o.outputs[0].token_ids for o in outputs]


def _greedy(**extra: object) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **extra) for n in MAX_TOKENS]


def _seeded() -> list[SamplingParams]:
    return [SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=n, ignore_eos=True)
            for i, n in enumerate(MAX_TOKENS)]


@pytest.fixture(scope="module")
def one_at_a_time(llama_dir: Path) -> list[list[int]]:
    return _tokens(_pipeline(llama_dir, "off"), _greedy())


def test_a_full_pipeline_keeps_one_micro_batch_beyond_its_stages_in_flight(llama_dir: Path) -> None:
    in_flight = {}
    for mode in ("on", "off"):
        llm = _pipeline(llama_dir, mode)
        engine = llm.engine
        try:
            for i in range(4):
                engine.add_request(str(i), [1, 2, 3 + i], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
            for _ in range(6):
                engine.step()
            in_flight[mode] = (engine.num_in_flight, engine.scheduler.num_steps_ahead > 0)
        finally:
            engine.shutdown()
    assert in_flight == {"on": (STAGES, True), "off": (STAGES - 1, False)}


def test_greedy_tokens_equal_a_pipeline_stepping_once_at_a_time(
    llama_dir: Path, one_at_a_time: list[list[int]]
) -> None:
    assert _tokens(_pipeline(llama_dir, "on"), _greedy()) == one_at_a_time


def test_seeded_tokens_equal_a_pipeline_stepping_once_at_a_time(llama_dir: Path) -> None:
    assert _tokens(_pipeline(llama_dir, "on"), _seeded()) == _tokens(_pipeline(llama_dir, "off"), _seeded())


def test_a_request_stopped_by_a_token_drops_the_micro_batch_run_ahead_of_it(
    llama_dir: Path, one_at_a_time: list[list[int]]
) -> None:
    stop_token = one_at_a_time[1][10]  # request 1 stops at its 11th token (or earlier, if it repeats)
    params = _greedy(stop_token_ids=[stop_token])
    expected = _tokens(_pipeline(llama_dir, "off"), params)
    assert len(expected[1]) <= 11 < MAX_TOKENS[1]
    assert _tokens(_pipeline(llama_dir, "on"), params) == expected


def test_a_request_stopped_by_a_string_ends_where_it_does_stepping_once_at_a_time(llama_dir: Path) -> None:
    llm = _pipeline(llama_dir, "off")
    text = llm.generate(make_prompts(256, PROMPT_LENGTHS[:1]), _greedy()[0], use_tqdm=False)[0].outputs[0].text
    llm.engine.shutdown()
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop
    params = _greedy(stop=[stop])
    assert _tokens(_pipeline(llama_dir, "on"), params) == _tokens(_pipeline(llama_dir, "off"), params)


def test_aborting_a_request_while_a_micro_batch_runs_ahead_leaves_the_others_intact(
    llama_dir: Path, one_at_a_time: list[list[int]]
) -> None:
    llm = _pipeline(llama_dir, "on")
    engine = llm.engine
    finished = {}
    try:
        for i, (prompt, params) in enumerate(zip(make_prompts(256, PROMPT_LENGTHS), _greedy(), strict=True)):
            engine.add_request(str(i), prompt, params)
        aborted = None
        for step in range(400):
            if step == 8:
                assert engine.num_in_flight == STAGES
                aborted = engine.abort_request("1")
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.outputs[0].token_ids
            if not engine.has_unfinished_requests():
                break
        free, total = engine.block_manager.num_free_blocks, engine.block_manager.num_total_blocks
    finally:
        engine.shutdown()
    assert aborted is not None and aborted.outputs[0].finish_reason == "abort" and "1" not in finished
    kept = [i for i in range(len(PROMPT_LENGTHS)) if i != 1]
    assert [finished[str(i)] for i in kept] == [one_at_a_time[i] for i in kept]
    assert free == total


# ---- a group fused by a drop -------------------------------------------------------------

GROUP_PROMPTS = [[(7 * i + 13 * j) % 500 for j in range(n)] for i, n in enumerate((3, 19, 70, 45, 8, 33))]


def _group_params(seeded: bool) -> SamplingParams:
    return SamplingParams(temperature=1.0 if seeded else 0.0, seed=7 if seeded else None, max_tokens=30,
                          ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)


@pytest.fixture(scope="module")
def replicas(llama_dir: Path) -> Iterator[list[LLMEngine]]:
    config = EngineConfig(model=str(llama_dir), max_model_len=256, num_kv_blocks=96, max_num_seqs=3,
                          max_num_batched_tokens=64, worker_threads=1, async_scheduling="on")
    cluster = Cluster.launch(config, num_replicas=STAGES)
    cluster.open_links()
    yield cluster.engines
    cluster.shutdown()


def _through_a_drop(replicas: list[LLMEngine], params: SamplingParams) -> tuple[dict[str, list[int]], int]:
    """Requests started on the replicas, dropped into a group that decodes ahead, restored."""
    for i, prompt in enumerate(GROUP_PROMPTS):
        replicas[i % STAGES].add_request(f"r{i}", prompt, params)
    finished: dict[str, list[int]] = {}
    run_steps(replicas, 4, finished)
    for engine in replicas:
        finished.update({out.request_id: out.outputs[0].token_ids for out in engine.drain()})
    group, _ = fuse(replicas)
    run_steps([group], 20, finished)
    ahead = group.scheduler.num_steps_ahead
    finished.update({out.request_id: out.outputs[0].token_ids for out in split(group, replicas)[0]})
    while any(engine.has_unfinished_requests() for engine in replicas):
        run_steps(replicas, 1, finished)
    return finished, ahead


def _single_device(llama_dir: Path, params: SamplingParams) -> dict[str, list[int]]:
    outputs = LLM(str(llama_dir), max_model_len=256).generate(GROUP_PROMPTS, params, use_tqdm=False)
    return {f"r{i}": out.outputs[0].token_ids for i, out in enumerate(outputs)}


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_a_fused_group_scheduling_ahead_keeps_the_tokens(
    replicas: list[LLMEngine], llama_dir: Path, seeded: bool
) -> None:
    finished, ahead = _through_a_drop(replicas, _group_params(seeded))
    assert ahead > 0
    assert finished == _single_device(llama_dir, _group_params(seeded))


def test_a_four_stage_group_on_the_graph_decode_path_scheduling_ahead_keeps_the_tokens(llama_dir: Path) -> None:
    # The buffers CUDA graphs replay (Triton kernels under the interpreter on CPU): only the
    # first stage takes tokens; the others, middle stages too, take activations.
    g = 4
    prompts = GROUP_PROMPTS[:4]
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    expected = [o.outputs[0].token_ids for o in LLM(str(llama_dir), max_model_len=256).generate(
        prompts, p, use_tqdm=False)]
    config = EngineConfig(model=str(llama_dir), max_model_len=256, num_kv_blocks=64, attention_backend="triton",
                          worker_threads=1, async_scheduling="on")
    cluster = Cluster.launch(config, num_replicas=g)
    try:
        cluster.open_links()
        engines = cluster.engines
        for i, prompt in enumerate(prompts):
            engines[i % g].add_request(f"r{i}", prompt, p)
        finished: dict[str, list[int]] = {}
        run_steps(engines, 2, finished)
        for engine in engines:
            finished.update({out.request_id: out.outputs[0].token_ids for out in engine.drain()})
        group, _ = fuse(engines)
        while group.has_unfinished_requests():
            run_steps([group], 1, finished)
        assert group.scheduler.num_steps_ahead > 0
    finally:
        cluster.shutdown()
    assert [finished[f"r{i}"] for i in range(len(prompts))] == expected
