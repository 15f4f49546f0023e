"""The lookahead's sums per candidate, from counts (kunserve/engine/lookahead.py), against their
plain definition: a StepShape per chunk, added up, and the cost model asked of each sum. On
varied cost models (tensor parallel, the decode straggler), sequences (prefills, decodes,
chunks in flight, decodes ahead of their token) and targets, a prediction from counts is the
cost model's of their shape, the budget's sums are its chunks' shapes added up, and the cycle
target is the same number, to the bit."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from kunserve.engine.cost_model import CostModel, StagePredictor, StepCoefficients, StepShape
from kunserve.engine.lookahead import LookaheadBudget, cycle_target_s
from kunserve.engine.sequence import Sequence
from kunserve.model.presets import resolve_model
from kunserve.sampling_params import SamplingParams

EXAMPLES = settings(max_examples=300, deadline=None, derandomize=True)
BASE = CostModel.default(resolve_model("tiny-llama").spec, "tiny-llama")
Predictor = Callable[[StepShape], float]


# ---- the plain definition ------------------------------------------------------------------------

def plain_chunk(seq: Sequence, num_tokens: int) -> StepShape:
    start = seq.num_scheduled_tokens
    return StepShape.of_chunk(start, num_tokens, start + num_tokens >= len(seq))


def plain_cycle_target_s(predict: Predictor, in_flight: Iterable[StepShape], running: Iterable[Sequence],
                         waiting: Iterable[Sequence], num_stages: int, max_num_batched_tokens: int) -> float:
    cycle_tokens = num_stages * max_num_batched_tokens
    shape = StepShape()
    for step in in_flight:
        shape += step
    for seq in itertools.chain(running, waiting):
        if shape.num_tokens >= cycle_tokens:
            break
        if seq.awaits_token:
            continue
        remaining = len(seq) - seq.num_scheduled_tokens
        shape += plain_chunk(seq, min(remaining, cycle_tokens - shape.num_tokens))
    return predict(shape.scaled(1 / num_stages))


# ---- what is drawn ---------------------------------------------------------------------------------

rate = st.one_of(st.just(0.0), st.floats(1e-12, 1e-3))
coefficients = st.builds(
    StepCoefficients, step_s=rate, layer_s=rate, knee_tokens=st.integers(0, 512), layer_token_s=rate,
    layer_context_s=rate, layer_attention_s=st.one_of(st.just(0.0), st.floats(1e-15, 1e-9)), sample_s=rate,
    layer_prefill_s=rate, layer_longest_s=rate, decode_split_width=st.integers(0, 64),
    max_decode_splits=st.integers(1, 16),
)


@st.composite
def stage_predictors(draw: st.DrawFn) -> StagePredictor:
    cost = replace(BASE, step=draw(coefficients)).for_tensor_parallel(draw(st.integers(1, 4)))
    return StagePredictor(cost, draw(st.integers(1, 32)))


@st.composite
def sequences(draw: st.DrawFn) -> Sequence:
    """A prompt not started, part computed, with chunks in flight, or a decode (ahead of its
    token in flight, too)."""
    length = draw(st.integers(1, 600))
    seq = Sequence("s", list(range(length)), SamplingParams(max_tokens=4), length + 4)
    seq.num_computed_tokens = draw(st.integers(0, length))
    seq.num_in_flight_tokens = draw(st.integers(0, length - seq.num_computed_tokens))
    return seq


shapes = st.builds(StepShape, st.integers(0, 2000), st.integers(0, 10**6), st.integers(0, 10**7),
                   st.integers(0, 300), st.integers(0, 8000))


# ---- the properties --------------------------------------------------------------------------------

@EXAMPLES
@given(stage_predictors(), st.integers(0, 2000), st.integers(0, 10**6), st.integers(0, 10**7), st.integers(0, 300))
def test_a_stage_predictor_of_counts_is_the_cost_model_of_their_shape(
    predict: StagePredictor, tokens: int, context: int, pairs: int, samples: int
) -> None:
    expected = predict.cost_model.step_time(StepShape(tokens, context, pairs, samples), predict.layers)
    assert predict.of_counts(tokens, context, pairs, samples) == expected
    assert predict(StepShape(tokens, context, pairs, samples)) == expected


@EXAMPLES
@given(stage_predictors(), st.lists(st.tuples(sequences(), st.integers(1, 600), st.integers(0, 600)), max_size=24),
       shapes, st.floats(0.0, 2.0), st.integers(1, 64))
def test_the_budgets_shape_is_the_sum_of_its_committed_chunks_shapes(
    predict: StagePredictor, candidates: list[tuple[Sequence, int, int]], reference: StepShape, share: float,
    min_chunk: int,
) -> None:
    """Candidate by candidate, committing what was granted (the sum the grant tried last) or,
    now and then, another count; so every grant is decided on the plain sum's prediction."""
    budget = LookaheadBudget(predict, predict(reference) * share, min_chunk)
    plain = StepShape()
    for seq, wanted_draw, other in candidates:
        wanted = max(1, min(wanted_draw, len(seq) - seq.num_scheduled_tokens))
        granted = budget.grant(seq, wanted)
        committed = other if other and other <= wanted else granted
        if committed:
            budget.commit(seq, committed)
            plain += plain_chunk(seq, committed)
        assert budget.shape == plain


@EXAMPLES
@given(stage_predictors(), st.lists(shapes, max_size=3), st.lists(sequences(), max_size=24),
       st.lists(sequences(), max_size=8), st.integers(1, 4), st.integers(1, 1024))
def test_the_cycle_target_is_its_plain_definition(
    predict: StagePredictor, in_flight: list[StepShape], running: list[Sequence], waiting: list[Sequence],
    num_stages: int, token_budget: int,
) -> None:
    expected = plain_cycle_target_s(predict, in_flight, running, waiting, num_stages, token_budget)
    assert cycle_target_s(predict, in_flight, running, waiting, num_stages, token_budget) == expected
