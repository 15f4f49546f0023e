"""A fault in one request's own output (its stop check, its text) fails that request alone:
its output says so, the other requests of the batch complete as they would have, its blocks
are freed, and the engine goes on serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from kunserve import LLM, SamplingParams
from kunserve.engine.sequence import Sequence
from kunserve.outputs import RequestOutput

FAULTY = [9, 8, 7]
OTHERS = [[1, 2, 3], [4, 5, 6, 7]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), num_kv_blocks=64, max_model_len=128)


def tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


@pytest.mark.parametrize("faulty_step", ["check_stop", "finished_output"])
def test_a_fault_in_one_requests_output_fails_that_request_alone(
    llm: LLM, monkeypatch: pytest.MonkeyPatch, faulty_step: str
) -> None:
    expected = tokens(llm.generate(OTHERS, PARAMS, use_tqdm=False))
    processor = llm.engine.output_processor
    real = getattr(processor, faulty_step)

    def faulty(seq: Sequence) -> object:
        if seq.prompt_token_ids == FAULTY:
            raise RuntimeError("injected fault")
        return real(seq)

    monkeypatch.setattr(processor, faulty_step, faulty)
    first, failed, second = llm.generate([OTHERS[0], FAULTY, OTHERS[1]], PARAMS, use_tqdm=False)
    assert failed.finished and failed.outputs[0].finish_reason == "error"
    assert failed.error is not None and "injected fault" in failed.error
    assert tokens([first, second]) == expected
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    monkeypatch.undo()
    assert tokens(llm.generate(OTHERS, PARAMS, use_tqdm=False)) == expected
