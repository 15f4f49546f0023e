"""The lookahead budget's own time per micro-batch, on the CPU: one pass of `LookaheadBudget`
over `--candidates` decodes (contexts 32 to 32 + candidates), every grant committed as the
scheduler does, with a target that takes `--take` of them (the rest refused: a micro-batch
that fills before its candidates run out, as when a prompt's chunk or a cycle's share is
smaller than the decodes ready). On tiny-llama's nominal cost model, half its layers.

    python benchmarks/lookahead_budget.py --candidates 32 64 128 --take 0.5 1.0
"""

from __future__ import annotations

import argparse
import functools
import timeit

from kunserve.engine.cost_model import CostModel, StagePredictor, StepShape
from kunserve.engine.lookahead import LookaheadBudget
from kunserve.engine.sequence import Sequence
from kunserve.model.presets import resolve_model
from kunserve.sampling_params import SamplingParams

FIRST_CONTEXT = 32
MIN_CHUNK_TOKENS = 32  # EngineConfig.lookahead_min_chunk_tokens' default
PASSES, ROUNDS = 2000, 5


def decodes(count: int) -> list[Sequence]:
    seqs = []
    for i in range(count):
        seq = Sequence(str(i), list(range(FIRST_CONTEXT + i + 1)), SamplingParams(max_tokens=16), 4096)
        seq.num_computed_tokens = FIRST_CONTEXT + i
        seqs.append(seq)
    return seqs


def one_pass(predict: StagePredictor, target_s: float, candidates: list[Sequence]) -> int:
    budget = LookaheadBudget(predict, target_s, MIN_CHUNK_TOKENS)
    for seq in candidates:
        if granted := budget.grant(seq, 1):
            budget.commit(seq, granted)
    return int(budget.shape.num_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--take", type=float, nargs="+", default=[0.5, 1.0], help="fractions the target takes")
    args = parser.parse_args()
    spec = resolve_model("tiny-llama").spec
    predict = StagePredictor(CostModel.default(spec, "tiny-llama"), spec.num_layers // 2)
    print("| candidates | target takes | granted | us per micro-batch |\n| ---: | ---: | ---: | ---: |")
    for count in args.candidates:
        candidates = decodes(count)
        for take in args.take:
            taken = max(1, round(take * count))
            target_s = predict(sum((StepShape.of_chunk(s.num_computed_tokens, 1, True) for s in candidates[:taken]),
                                   StepShape()))
            timed = functools.partial(one_pass, predict, target_s, candidates)
            seconds = min(timeit.repeat(timed, number=PASSES, repeat=ROUNDS)) / PASSES
            granted = one_pass(predict, target_s, candidates)
            print(f"| {count} | {take:g} | {granted} | {seconds * 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
