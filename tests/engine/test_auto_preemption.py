"""Preemption mode "auto": the scheduler chooses per victim between swapping its KV to host
memory and recomputing it, whichever the cost model says takes less time, counting the swap
traffic already ahead on the host link; without host room it recomputes.

The cost model here makes the crossover known: recomputing costs RECOMPUTE_TOKEN_S a token
(one layer, no fixed cost), 12 ms a block; a swap costs, each way, LATENCY_S plus BLOCK_S a
block: 20 ms + 4 ms a block out and back. Short victims recompute, long ones swap."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_prompts
from engine_steps import complete_step, make_sequence

from kunserve import LLM
from kunserve.engine.block_manager import BlockManager
from kunserve.engine.cost_model import CostModel, Link, StepCoefficients
from kunserve.engine.preemption import HostLinkLoad, SwapOrRecompute
from kunserve.engine.scheduler import Scheduler, SchedulerOutput
from kunserve.engine.sequence import Sequence, SequenceStatus
from kunserve.sampling_params import SamplingParams

BLOCK = 4  # tokens per KV block
BLOCK_BYTES = 1000
LATENCY_S = 0.010  # the host link's, each way
BLOCK_S = 0.002  # the host link's time per block, each way
RECOMPUTE_TOKEN_S = 0.003  # a token's prefill on the one layer
# Swap: 2 * (LATENCY_S + BLOCK_S * b) = 20 ms + 4 ms * b; recompute: 12 ms * b. Equal at b = 2.5 blocks.
SHORT_TOKENS = 8  # 2 blocks: swap 28 ms > recompute 24 ms
LONG_TOKENS = 40  # 10 blocks: swap 60 ms < recompute 120 ms
HOST_BLOCKS = 64


def crossover_cost_model() -> CostModel:
    step = StepCoefficients(step_s=0.0, layer_s=0.0, knee_tokens=0, layer_token_s=RECOMPUTE_TOKEN_S,
                            layer_context_s=0.0, layer_attention_s=0.0, sample_s=0.0)
    return CostModel("crossover", "test", step, {"host": Link(BLOCK_BYTES / BLOCK_S, LATENCY_S)})


def pricer() -> SwapOrRecompute:
    return SwapOrRecompute(crossover_cost_model(), layers=1, block_bytes=BLOCK_BYTES, chunk_tokens=1000)


def _full_pool_with_victim(victim_tokens: int, host_blocks: int = HOST_BLOCKS) -> tuple[Scheduler, Sequence]:
    """An old 4-token prompt and a younger victim prefilled into a pool they fill exactly: the
    old one's next token needs a block, so the victim is preempted at the next step."""
    device_blocks = 1 + victim_tokens // BLOCK
    scheduler = Scheduler(BlockManager(BLOCK, range(device_blocks)), max_num_seqs=8, max_num_batched_tokens=1000,
                          swap_pool=BlockManager(BLOCK, range(host_blocks)), swap_or_recompute=pricer())
    old, victim = make_sequence("old", BLOCK), make_sequence("victim", victim_tokens)
    scheduler.add(old)
    scheduler.add(victim)
    complete_step(scheduler, scheduler.schedule())
    return scheduler, victim


def test_the_prices_cross_where_the_cost_model_says() -> None:
    choice, idle = pricer(), HostLinkLoad(0, 0)
    assert choice.swap_s(2, idle) == pytest.approx(0.028) and choice.recompute_s(SHORT_TOKENS) == pytest.approx(0.024)
    assert choice.swap_s(10, idle) == pytest.approx(0.060) and choice.recompute_s(LONG_TOKENS) == pytest.approx(0.120)


def test_a_long_victim_is_swapped_out() -> None:
    scheduler, victim = _full_pool_with_victim(LONG_TOKENS)
    out = scheduler.schedule()
    assert out.preempted == [victim] and victim.status is SequenceStatus.SWAPPED
    assert len(out.swap_out) == LONG_TOKENS // BLOCK and victim.num_computed_tokens == LONG_TOKENS


def test_a_short_victim_is_recomputed() -> None:
    scheduler, victim = _full_pool_with_victim(SHORT_TOKENS)
    out = scheduler.schedule()
    assert out.preempted == [victim] and victim.status is SequenceStatus.WAITING
    assert not out.swap_out and victim.num_computed_tokens == 0 and scheduler.num_swap_outs == 0


def test_swaps_under_way_on_the_host_link_turn_a_swap_into_a_recompute() -> None:
    scheduler, victim = _full_pool_with_victim(LONG_TOKENS)
    # A step in flight copies 40 blocks in: the victim's KV would come back behind them
    # (10 + 2 * 50 ms), its swap then dearer (140 ms) than its recompute (120 ms).
    scheduler.launch(SchedulerOutput([], swap_in=[(i, i) for i in range(40)]))
    out = scheduler.schedule()
    assert victim.status is SequenceStatus.WAITING and not out.swap_out


def test_kv_already_in_host_memory_turns_a_swap_into_a_recompute() -> None:
    scheduler, victim = _full_pool_with_victim(LONG_TOKENS)
    scheduler.swap_pool.take(40)  # another request's KV, swapped out earlier: it comes back first
    out = scheduler.schedule()
    assert victim.status is SequenceStatus.WAITING and not out.swap_out


def test_a_long_victim_is_recomputed_when_host_memory_has_no_room_for_it() -> None:
    scheduler, victim = _full_pool_with_victim(LONG_TOKENS, host_blocks=LONG_TOKENS // BLOCK - 1)
    out = scheduler.schedule()
    assert victim.status is SequenceStatus.WAITING and not out.swap_out


def test_a_swapped_victims_copies_count_as_in_flight_until_their_step_comes_back() -> None:
    scheduler, _ = _full_pool_with_victim(LONG_TOKENS)
    out = scheduler.schedule()
    scheduler.launch(out)
    assert scheduler.num_swap_out_in_flight == LONG_TOKENS // BLOCK and scheduler.swaps_pending
    scheduler.update(out, [7])
    assert scheduler.num_swap_out_in_flight == 0


def test_a_cost_model_without_a_host_link_is_refused_naming_it() -> None:
    no_host = CostModel("no-host", "test", crossover_cost_model().step, {})
    with pytest.raises(ValueError, match="host"):
        SwapOrRecompute(no_host, layers=1, block_bytes=BLOCK_BYTES, chunk_tokens=1000)


# ---- end to end: tokens through preemptions of both kinds ------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
LENGTHS = (1, 5, 17, 40, 100, 200, 300, 64)
# KV for 480 tokens: the 8 requests must take turns, so the youngest get preempted.
SMALL_KV = {"num_kv_blocks": 30, "max_model_len": 400}
# A profile whose crossover lies among those requests: a token's recompute costs 1 ms, a swap
# 40 ms and 0.5 ms a token out and back (the tiny model's blocks priced as 16 tokens).
TOKEN_RECOMPUTE_S = 1e-3
SWAP_LATENCY_S = 0.020
SWAP_TOKEN_S = 0.25e-3  # each way
ASYNC_SCHEDULING = ("off", "on")


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _mid_crossover_profile(path: Path, llm: LLM) -> Path:
    engine = llm.engine
    step = StepCoefficients(step_s=0.0, layer_s=0.0, knee_tokens=0,
                            layer_token_s=TOKEN_RECOMPUTE_S / engine.spec.num_layers, layer_context_s=0.0,
                            layer_attention_s=0.0, sample_s=0.0)
    token_bytes = engine.executor.layout.block_bytes / engine.config.block_size
    CostModel("tiny", "test", step, {"host": Link(token_bytes / SWAP_TOKEN_S, SWAP_LATENCY_S)}).save(path)
    return path


@dataclass
class AutoRun:
    tokens: list[list[int]]
    scheduler: Scheduler  # after the run
    ahead_while_swapping: int  # steps scheduled ahead while a request was swapped out or a swap in flight


@dataclass
class Runs:
    unloaded: list[list[int]]
    auto: dict[str, AutoRun]  # by async_scheduling


def _run_watching_steps_ahead(llm: LLM, prompts: list[list[int]]) -> AutoRun:
    scheduler = llm.engine.scheduler
    schedule, watched = scheduler.schedule, []

    def schedule_watched(*args: object, **kwargs: object) -> SchedulerOutput:
        watched.append(bool(kwargs.get("ahead")) and scheduler.swaps_pending)
        return schedule(*args, **kwargs)

    scheduler.schedule = schedule_watched
    return AutoRun(_tokens(llm, prompts), scheduler, sum(watched))


@pytest.fixture(scope="module")
def runs(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    unloaded = LLM(str(llama_dir), max_model_len=400, num_kv_blocks=256)
    prompts = make_prompts(unloaded.engine.spec.vocab_size, LENGTHS)
    profile = _mid_crossover_profile(tmp_path_factory.mktemp("auto") / "profile.json", unloaded)
    auto = {}
    for async_scheduling in ASYNC_SCHEDULING:
        llm = LLM(str(llama_dir), preemption_mode="auto", cost_profile=str(profile), async_scheduling=async_scheduling,
                  **SMALL_KV)
        auto[async_scheduling] = _run_watching_steps_ahead(llm, prompts)
    return Runs(_tokens(unloaded, prompts), auto)


@pytest.mark.parametrize("async_scheduling", ASYNC_SCHEDULING)
def test_outputs_through_swaps_and_recomputes_equal_an_unloaded_run(runs: Runs, async_scheduling: str) -> None:
    run = runs.auto[async_scheduling]
    scheduler = run.scheduler
    assert run.tokens == runs.unloaded
    assert 0 < scheduler.num_swap_outs < scheduler.num_preemptions  # both kinds happened
    assert scheduler.swap_pool.num_free_blocks == scheduler.swap_pool.num_total_blocks


def test_auto_schedules_ahead_while_nothing_is_swapped(runs: Runs) -> None:
    assert runs.auto["on"].scheduler.num_steps_ahead > 0


def test_auto_schedules_nothing_ahead_while_a_swap_is_pending(runs: Runs) -> None:
    assert runs.auto["on"].ahead_while_swapping == 0


def test_auto_without_a_host_link_to_price_swaps_swaps_as_swap_does_and_says_so(
        llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    profile = tmp_path / "no_host_link.json"
    CostModel("tiny", "test", crossover_cost_model().step, {}).save(profile)
    with caplog.at_level(logging.WARNING, logger="kunserve.engine.llm_engine"):
        engines = [LLM(str(llama_dir), preemption_mode="auto", cost_profile=str(profile), **SMALL_KV).engine
                   for _ in range(2)]
    assert all(e.scheduler.swap_pool is not None and e.scheduler.swap_or_recompute is None for e in engines)
    assert sum("preemption_mode='auto'" in record.getMessage() for record in caplog.records) == 1
