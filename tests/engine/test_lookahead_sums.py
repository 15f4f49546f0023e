"""The lookahead's sums per candidate, from counts (kunserve/engine/lookahead.py), against their
plain definition: a StepShape per chunk, added up, and the cost model asked of each sum. On
varied cost models (tensor parallel, the decode straggler), sequences (prefills, decodes,
chunks in flight, decodes ahead of their token) and targets, a prediction from counts is the
cost model's of their shape, the budget's sums are its chunks' shapes added up, its grants are
those of the plain rules on those sums (though it predicts most decodes' fit from one proven
point ahead: the prediction never falls as a count grows), and the cycle target is the same
number, to the bit."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import replace

from hypothesis import assume, given, settings
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


def plain_grant(predict: Predictor, target_s: float, min_chunk: int, shape: StepShape, seq: Sequence,
                wanted: int) -> int:
    """LookaheadBudget.grant's rules, each chunk's fit predicted on its own shape."""
    def predicted(num_tokens: int) -> float:
        return predict(shape + plain_chunk(seq, num_tokens))

    if predicted(wanted) <= target_s:
        return wanted
    if wanted <= min_chunk and predicted(wanted) - target_s < target_s - predict(shape):
        return wanted
    floor = min(wanted, min_chunk)
    if shape.num_tokens and (wanted == 1 or predicted(floor) > target_s):
        return 0
    return max((n for n in range(floor, wanted) if predicted(n) <= target_s), default=floor)


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


def decode_at(context: int) -> Sequence:
    """A sequence whose next token is a decode at `context`."""
    seq = Sequence("d", list(range(context + 1)), SamplingParams(max_tokens=4), context + 5)
    seq.num_computed_tokens = context
    return seq


@st.composite
def decodes(draw: st.DrawFn) -> Sequence:
    """A sequence whose next token is a decode (its context drawn), most of a micro-batch."""
    return decode_at(draw(st.integers(0, 4000)))


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


@EXAMPLES
@given(stage_predictors(), st.lists(st.integers(0, 4000), min_size=8, max_size=8),
       st.lists(st.integers(0, 4000), min_size=4, max_size=4))
def test_a_predictor_that_grows_with_counts_never_predicts_less_for_more(
    predict: StagePredictor, low: list[int], more: list[int]
) -> None:
    low_counts, high_counts = low[:4], [a + b for a, b in zip(low[:4], more, strict=True)]
    assert predict.grows_with_counts
    assert predict.of_counts(*low_counts) <= predict.of_counts(*high_counts)


@given(stage_predictors(), st.sampled_from(["step_s", "layer_s", "layer_token_s", "layer_context_s",
                                            "layer_attention_s", "sample_s", "layer_prefill_s"]),
       st.sampled_from([-1e-6, float("nan"), float("inf")]))
def test_a_negative_or_unbounded_rate_is_not_trusted_to_grow(predict: StagePredictor, rate: str, value: float) -> None:
    cost = predict.cost_model
    assert not StagePredictor(replace(cost, step=replace(cost.step, **{rate: value})), predict.layers).grows_with_counts


@EXAMPLES
@given(stage_predictors(), st.lists(st.one_of(decodes(), decodes(), decodes(), sequences()), max_size=48),
       shapes, st.floats(0.0, 2.0), st.integers(1, 64))
def test_the_budgets_grants_are_the_plain_rules_on_its_sums(
    predict: StagePredictor, candidates: list[Sequence], reference: StepShape, share: float, min_chunk: int,
) -> None:
    """Mostly decodes, which the budget predicts from a point proven ahead of them; every grant
    committed, as the scheduler does."""
    target_s = predict(reference) * share
    budget = LookaheadBudget(predict, target_s, min_chunk)
    plain = StepShape()
    for seq in candidates:
        wanted = max(1, len(seq) - seq.num_scheduled_tokens)
        granted = budget.grant(seq, wanted)
        assert granted == plain_grant(predict, target_s, min_chunk, plain, seq, wanted)
        if granted:
            budget.commit(seq, granted)
            plain += plain_chunk(seq, granted)


@EXAMPLES
@given(stage_predictors(), st.lists(decodes(), min_size=1, max_size=16), shapes, st.floats(0.0, 2.0))
def test_a_refused_decode_refuses_no_shorter_one_the_plain_rules_take(
    predict: StagePredictor, committed: list[Sequence], reference: StepShape, share: float,
) -> None:
    """The budget remembers a refusal for the decodes after it (it costs three predictions each):
    at the context where the plain rules start refusing, one shorter still goes in."""
    target_s = predict(reference) * share
    budget = LookaheadBudget(predict, target_s, 1)
    plain = StepShape()
    for seq in committed:
        if granted := budget.grant(seq, 1):
            budget.commit(seq, granted)
            plain += plain_chunk(seq, granted)

    def refused(context: int) -> bool:
        return plain_grant(predict, target_s, 1, plain, decode_at(context), 1) == 0

    low, high = 0, 8000  # the shortest refused context: the rules refuse every longer one
    assume(refused(high))
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if refused(middle) else (middle + 1, high)
    assert budget.grant(decode_at(low), 1) == 0
    if low:
        assert budget.grant(decode_at(low - 1), 1) == 1
