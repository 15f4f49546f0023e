"""Prompt steps replayed piecewise from CUDA graphs (kunserve/worker/prompt_graphs.py) against
eager steps on a GPU, greedy:

1. Dummy Llama-3-8B in bf16, each request alone (max_num_seqs 1) with a prompt of exactly a
   captured size: every step runs the same shapes either way, so the tokens must be identical.
2. The same with prompts of other lengths: a step padded to a captured size runs its GEMMs at
   other shapes, whose bf16 results may differ in their last bits (reported, not required).
3. A tiny random Llama in float32, eight requests at once, every prompt step padded: identical.

    python benchmarks/check_prompt_graphs.py --out $OUT/check_prompt_graphs.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import build_model_dir, make_prompts

from kunserve import LLM, SamplingParams

MAX_TOKENS = 512


def tokens(prompts: list[list[int]], eager: bool) -> list[list[int]]:
    llm = LLM("llama-3-8b", load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=1,
              enforce_eager=eager, prompt_graph_max_tokens=0 if eager else MAX_TOKENS,
              max_num_batched_tokens=MAX_TOKENS)
    out = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32,
                                                                                ignore_eos=True), use_tqdm=False)]
    del llm
    torch.cuda.empty_cache()
    return out


def tiny_tokens(model_dir: Path, prompts: list[list[int]], eager: bool) -> list[list[int]]:
    llm = LLM(str(model_dir), dtype="float32", max_model_len=1024, enforce_eager=eager,
              prompt_graph_max_tokens=0 if eager else MAX_TOKENS, max_num_batched_tokens=MAX_TOKENS)
    out = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32,
                                                                                ignore_eos=True), use_tqdm=False)]
    del llm
    torch.cuda.empty_cache()
    return out


def compared(eager: list[list[int]], graphed: list[list[int]], lengths: tuple[int, ...]) -> dict:
    first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(eager, graphed)]
    return {"lengths": lengths, "identical": sum(x == y for x, y in zip(eager, graphed)),
            "first_differing_token": first_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = {}
    for name, lengths in (("8b bf16, captured sizes", (16, 64, 256, 512)), ("8b bf16, padded", (5, 50, 300, 129))):
        prompts = make_prompts(128256, lengths=lengths, seed=4)
        report[name] = compared(tokens(prompts, True), tokens(prompts, False), lengths)
        print(name, report[name], flush=True)
    lengths = (5, 50, 300, 100, 17, 64, 129, 200)
    prompts = make_prompts(256, lengths=lengths, seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_model_dir(Path(tmp) / "llama", "llama", {}, {})
        report["tiny float32, padded"] = compared(tiny_tokens(tiny, prompts, True), tiny_tokens(tiny, prompts, False),
                                                  lengths)
    print("tiny float32, padded", report["tiny float32, padded"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    required = (report["8b bf16, captured sizes"], report["tiny float32, padded"])
    sys.exit(0 if all(r["identical"] == len(r["lengths"]) for r in required) else 1)


if __name__ == "__main__":
    main()
