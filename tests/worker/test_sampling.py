"""Sampling and stopping, specified at two levels.

The sampler on hand-made logits: greedy, top-k, top-p, min-p, temperature and per-request
seeds, each checked against its definition over many draws. The engine through
`LLM.generate` on the tiny llama: seeds reproduce outputs, and a request ends exactly where
its stop token, stop string, eos token, max_tokens or max_model_len says, reporting why.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from kunserve import LLM, SamplingParams
from kunserve.step import SamplingBatch
from kunserve.worker.sampler import Sampler

CPU = torch.device("cpu")


# ---- sampler unit level --------------------------------------------------------------------


def sampling_batch(
    rows: int,
    temperature: float | list[float] = 1.0,
    top_p: float | list[float] = 1.0,
    top_k: int | list[int] = 0,
    min_p: float | list[float] = 0.0,
    seeded: list[tuple[int, str, int]] | None = None,
) -> SamplingBatch:
    """A batch of `rows` rows; a scalar setting applies to every row, a list gives one per row."""

    def column(value, dtype) -> np.ndarray:
        return np.broadcast_to(np.asarray(value, dtype=dtype), (rows,)).copy()

    return SamplingBatch(
        temperature=column(temperature, np.float32),
        top_p=column(top_p, np.float32),
        top_k=column(top_k, np.int64),
        min_p=column(min_p, np.float32),
        seeded=seeded or [],
    )


def random_logits(rows: int, vocab: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


@pytest.fixture(autouse=True)
def _fixed_global_seed() -> None:
    # Unseeded rows draw from the global generator: fix it so every draw is reproducible.
    torch.manual_seed(0)


def test_greedy_rows_return_argmax_while_other_rows_sample() -> None:
    rows = 2000
    logits = random_logits(rows, 64, scale=0.5)  # flat: a sampled row rarely hits the argmax
    temperature = [0.0 if i % 2 == 0 else 1.5 for i in range(rows)]
    tokens = Sampler(CPU)(logits, sampling_batch(rows, temperature=temperature))
    assert torch.equal(tokens[0::2], logits[0::2].argmax(dim=-1))


def test_top_k_1_returns_argmax_at_any_temperature() -> None:
    rows = 1000
    logits = random_logits(rows, 64)
    temperature = [(0.01, 1.0, 10.0, 1000.0)[i % 4] for i in range(rows)]
    tokens = Sampler(CPU)(logits, sampling_batch(rows, temperature=temperature, top_k=1))
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    rows = 1000
    logits = random_logits(rows, 64)
    tokens = Sampler(CPU)(logits, sampling_batch(rows, temperature=5.0, top_p=1e-6))
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_min_p_1_keeps_only_the_most_probable_token() -> None:
    rows = 1000
    logits = random_logits(rows, 64)
    tokens = Sampler(CPU)(logits, sampling_batch(rows, temperature=5.0, min_p=1.0))
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_k_samples_exactly_the_k_largest_logits() -> None:
    draws, k = 4000, 5
    logits = random_logits(1, 50, scale=0.5).expand(draws, -1)
    tokens = Sampler(CPU)(logits, sampling_batch(draws, temperature=2.0, top_k=k))
    assert set(tokens.tolist()) == set(logits[0].topk(k).indices.tolist())


def test_top_p_samples_exactly_the_nucleus() -> None:
    # Sorted masses 0.30, 0.25, 0.20 first reach top_p = 0.7 at the third token: the nucleus
    # is those three tokens, wherever they sit in the vocabulary.
    draws = 4000
    probs = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.05, 0.04, 0.03, 0.02, 0.01])
    perm = torch.randperm(len(probs), generator=torch.Generator().manual_seed(1))
    logits = probs.log()[perm].expand(draws, -1)
    tokens = Sampler(CPU)(logits, sampling_batch(draws, temperature=1.0, top_p=0.7))
    nucleus = {int(perm.tolist().index(i)) for i in (0, 1, 2)}
    assert set(tokens.tolist()) == nucleus


def test_temperature_sampling_frequencies_match_softmax_of_scaled_logits() -> None:
    # Half the rows at T=0.5, half at T=2: each half must follow its own softmax(logits / T).
    draws = 20000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    temperature = [0.5] * draws + [2.0] * draws
    tokens = Sampler(CPU)(logits.expand(2 * draws, -1), sampling_batch(2 * draws, temperature=temperature))
    for half, t in ((tokens[:draws], 0.5), (tokens[draws:], 2.0)):
        freq = torch.bincount(half, minlength=len(logits)).float() / draws
        expected = (logits / t).softmax(dim=-1)
        assert (freq - expected).abs().max().item() < 0.015, (t, freq, expected)


def seeded_stream(sampler: Sampler, logits: torch.Tensor, batch: SamplingBatch, row: int, steps: int) -> list[int]:
    return [int(sampler(logits, batch)[row]) for _ in range(steps)]


TARGET_LOGITS = random_logits(1, 64, seed=7)


def test_seeded_row_stream_does_not_depend_on_the_other_rows_or_its_position() -> None:
    alone = seeded_stream(
        Sampler(CPU), TARGET_LOGITS, sampling_batch(1, temperature=1.0, seeded=[(0, "target", 1234)]), 0, 20
    )
    # The same request as row 2 of 4, next to an unseeded row, a greedy row and another
    # seeded row, with other logits, temperatures and top-k/top-p settings around it.
    others = random_logits(3, 64, seed=8)
    logits = torch.cat([others[:2], TARGET_LOGITS, others[2:]])
    batch = sampling_batch(
        4,
        temperature=[0.8, 0.0, 1.0, 1.3],
        top_k=[5, 0, 0, 0],
        top_p=[1.0, 1.0, 1.0, 0.9],
        seeded=[(2, "target", 1234), (3, "other", 99)],
    )
    crowded = seeded_stream(Sampler(CPU), logits, batch, 2, 20)
    assert crowded == alone


def test_different_seeds_give_different_streams() -> None:
    logits = TARGET_LOGITS.expand(2, -1)
    batch = sampling_batch(2, temperature=1.0, seeded=[(0, "a", 1), (1, "b", 2)])
    sampler = Sampler(CPU)
    streams = [sampler(logits, batch).tolist() for _ in range(20)]
    assert [s[0] for s in streams] != [s[1] for s in streams]


def test_seeded_request_draws_fresh_noise_every_step() -> None:
    # Same logits every step: a stream that restarted each step would repeat one token.
    batch = sampling_batch(1, temperature=1.0, seeded=[(0, "a", 5)])
    stream = seeded_stream(Sampler(CPU), TARGET_LOGITS, batch, 0, 20)
    assert len(set(stream)) > 1


def test_forget_restarts_the_stream_of_a_reused_request_id() -> None:
    sampler = Sampler(CPU)
    batch = sampling_batch(1, temperature=1.0, seeded=[(0, "a", 5)])
    first = seeded_stream(sampler, TARGET_LOGITS, batch, 0, 10)
    sampler.forget(["a"])
    again = seeded_stream(sampler, TARGET_LOGITS, batch, 0, 10)
    assert again == first


# ---- engine level --------------------------------------------------------------------------

PROMPTS = ["The lighthouse keeper wrote", "Cooking is mostly patience.", "Questions and answers:"]
SEEDED = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
REF_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=REF_TOKENS, ignore_eos=True)


def completion(llm: LLM, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), num_kv_blocks=256, max_model_len=512)


@pytest.fixture(scope="module")
def greedy_ref(llm: LLM) -> list:
    """Each prompt's greedy continuation, run to REF_TOKENS without any stop."""
    return completion(llm, PROMPTS, GREEDY)


def first_fresh_token(token_ids: list[int], tokenizer, min_index: int = 3) -> int:
    """Index of the first token at or after min_index that did not occur before it, has
    printable ASCII text and is not the model's eos; such a token stops generation there."""
    for k in range(min_index, len(token_ids)):
        t = token_ids[k]
        text = tokenizer.decode([t])
        if t not in token_ids[:k] and t != tokenizer.eos_token_id and re.fullmatch(r"[ -~]+", text):
            return k
    raise AssertionError(f"no usable token in {token_ids}")


# -- seeds

@pytest.fixture(scope="module")
def seeded_alone(llm: LLM):
    return completion(llm, [PROMPTS[0]], SEEDED)[0]


def test_same_seed_gives_identical_output_across_generate_calls(llm: LLM, seeded_alone) -> None:
    assert completion(llm, [PROMPTS[0]], SEEDED)[0].token_ids == seeded_alone.token_ids


@pytest.fixture(scope="module")
def seeded_in_crowd(llm: LLM) -> list:
    """PROMPTS[0] with SEEDED as the third of four requests, and with another seed as the fourth."""
    params = [
        SamplingParams(temperature=1.0, max_tokens=16),
        SamplingParams(temperature=0.0, max_tokens=16),
        SEEDED,
        dataclasses.replace(SEEDED, seed=4321),
    ]
    return completion(llm, [PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[0]], params)


def test_same_seed_gives_identical_output_in_another_batch(seeded_alone, seeded_in_crowd) -> None:
    assert seeded_in_crowd[2].token_ids == seeded_alone.token_ids


def test_different_seeds_give_different_outputs(seeded_alone, seeded_in_crowd) -> None:
    assert seeded_in_crowd[3].token_ids != seeded_alone.token_ids


# -- stop_token_ids

@pytest.fixture(scope="module")
def stop_token_case(llm: LLM, greedy_ref):
    """Greedy PROMPTS[2] with stop_token_ids=[X], X a token its greedy continuation first
    produces at index k. Four requests: without and with an unrelated stop string (the text
    then comes from the incremental detokenizer), each dropping and keeping the stop text."""
    ref = greedy_ref[2].token_ids
    k = first_fresh_token(ref, llm.get_tokenizer())
    params = {
        (with_stop_strings, keep): dataclasses.replace(
            GREEDY,
            stop_token_ids=[ref[k]],
            stop=["never in this text"] if with_stop_strings else None,
            include_stop_str_in_output=keep,
        )
        for with_stop_strings in (False, True)
        for keep in (False, True)
    }
    outs = completion(llm, [PROMPTS[2]] * len(params), list(params.values()))
    return ref, k, dict(zip(params, outs))


def test_stop_token_ends_generation_right_after_it(stop_token_case) -> None:
    ref, k, outs = stop_token_case
    assert outs[False, False].token_ids == ref[: k + 1]


def test_stop_token_reports_stop_with_the_token_as_reason(stop_token_case) -> None:
    ref, k, outs = stop_token_case
    assert (outs[False, False].finish_reason, outs[False, False].stop_reason) == ("stop", ref[k])


WITH_STOP_STRINGS = pytest.mark.parametrize("with_stop_strings", [False, True], ids=["no-stop-strings", "stop-strings"])


@WITH_STOP_STRINGS
def test_stop_token_text_is_left_out_of_the_output_text(
    llm: LLM, stop_token_case, with_stop_strings: bool
) -> None:
    ref, k, outs = stop_token_case
    tokenizer = llm.get_tokenizer()
    assert tokenizer.decode(ref[:k]) != tokenizer.decode(ref[: k + 1])
    assert outs[with_stop_strings, False].text == tokenizer.decode(ref[:k])


@WITH_STOP_STRINGS
def test_include_stop_str_in_output_keeps_the_stop_token_text(
    llm: LLM, stop_token_case, with_stop_strings: bool
) -> None:
    ref, k, outs = stop_token_case
    assert outs[with_stop_strings, True].text == llm.get_tokenizer().decode(ref[: k + 1])


# -- stop strings

def completing_length(token_ids: list[int], tokenizer, stop: str) -> int:
    """The fewest leading tokens whose text contains `stop`."""
    return next(m for m in range(1, len(token_ids) + 1) if stop in tokenizer.decode(token_ids[:m]))


@dataclasses.dataclass
class StopStringCase:
    text: str  # PROMPTS[0]'s greedy text, generated without stop strings
    stop: str
    index: int  # where `stop` first occurs in `text`
    completing: int  # number of tokens up to the one completing that occurrence
    dropped: object  # completion with the stop string
    kept: object  # the same with include_stop_str_in_output=True


@pytest.fixture(scope="module")
def stop_string_case(llm: LLM, greedy_ref) -> StopStringCase:
    """A 3-character stop string from PROMPTS[0]'s greedy text that starts in one token and
    ends in a later one. Printable ASCII only, so never half of a multi-byte character."""
    tokenizer, ref, text = llm.get_tokenizer(), greedy_ref[0].token_ids, greedy_ref[0].text
    for match in re.finditer(r"(?=([A-Za-z ]{3}))", text):
        stop = match.group(1)
        index, completing = text.index(stop), completing_length(ref, tokenizer, stop)
        if index >= 3 and index < len(tokenizer.decode(ref[: completing - 1])):
            break
    else:
        raise AssertionError(f"no stop string spanning two tokens in {text!r}")
    params = [
        dataclasses.replace(GREEDY, stop=stop),
        dataclasses.replace(GREEDY, stop=[stop], include_stop_str_in_output=True),
    ]
    dropped, kept = completion(llm, [PROMPTS[0]] * 2, params)
    return StopStringCase(text, stop, index, completing, dropped, kept)


def test_stop_string_truncates_text_before_it(stop_string_case: StopStringCase) -> None:
    case = stop_string_case
    assert case.dropped.text == case.text[: case.index]


def test_stop_string_reports_stop_with_the_string_as_reason(stop_string_case: StopStringCase) -> None:
    case = stop_string_case
    assert (case.dropped.finish_reason, case.dropped.stop_reason) == ("stop", case.stop)


def test_stop_string_ends_generation_at_the_token_completing_it(greedy_ref, stop_string_case: StopStringCase) -> None:
    case = stop_string_case
    assert case.dropped.token_ids == greedy_ref[0].token_ids[: case.completing]


def test_include_stop_str_in_output_keeps_the_stop_string(stop_string_case: StopStringCase) -> None:
    case = stop_string_case
    assert case.kept.text == case.text[: case.index + len(case.stop)]


# -- eos

@pytest.fixture
def eos_case(llm: LLM, greedy_ref, monkeypatch: pytest.MonkeyPatch):
    """The engine's eos made X, a token PROMPTS[1]'s greedy continuation first produces at k."""
    ref = greedy_ref[1].token_ids
    k = first_fresh_token(ref, llm.get_tokenizer())
    monkeypatch.setattr(llm.engine.output_processor, "eos_token_ids", frozenset({ref[k]}))
    return ref, k


def test_eos_token_stops_generation_with_no_stop_reason(llm: LLM, eos_case) -> None:
    ref, k = eos_case
    out = completion(llm, [PROMPTS[1]], dataclasses.replace(GREEDY, ignore_eos=False))[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (ref[: k + 1], "stop", None)


def test_ignore_eos_generates_past_the_eos_token(llm: LLM, eos_case) -> None:
    ref, k = eos_case
    out = completion(llm, [PROMPTS[1]], dataclasses.replace(GREEDY, max_tokens=k + 3, ignore_eos=True))[0]
    assert (out.token_ids, out.finish_reason) == (ref[: k + 3], "length")


# -- length

MAX_TOKENS = [1, 3, 7]


@pytest.fixture(scope="module")
def max_tokens_outputs(llm: LLM) -> list:
    params = [dataclasses.replace(SEEDED, max_tokens=n) for n in MAX_TOKENS]
    return completion(llm, PROMPTS, params)


def test_max_tokens_gives_exactly_that_many_tokens(max_tokens_outputs) -> None:
    assert [len(o.token_ids) for o in max_tokens_outputs] == MAX_TOKENS


def test_max_tokens_reports_length(max_tokens_outputs) -> None:
    assert [o.finish_reason for o in max_tokens_outputs] == ["length"] * len(MAX_TOKENS)


SHORT_MODEL_LEN = 32


@pytest.fixture(scope="module")
def unbounded_output(llama_dir: Path):
    short = LLM(str(llama_dir), num_kv_blocks=4, max_model_len=SHORT_MODEL_LEN)
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    return short.generate(PROMPTS[0], params, use_tqdm=False)[0]


def test_max_tokens_none_runs_up_to_max_model_len(unbounded_output) -> None:
    total = len(unbounded_output.prompt_token_ids) + len(unbounded_output.outputs[0].token_ids)
    assert total == SHORT_MODEL_LEN


def test_max_tokens_none_reports_length(unbounded_output) -> None:
    assert unbounded_output.outputs[0].finish_reason == "length"
