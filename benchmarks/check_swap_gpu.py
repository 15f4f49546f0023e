"""GPU check of the swap preemption path (pinned host pool, side-stream copies): requests
preempted by swapping give the tokens of an unloaded run, and swapping costs what it costs.

1. Tiny random Llama (float32, built locally): greedy tokens with a KV cache so small that
   requests swap equal those with a large cache (recompute too, for comparison).
2. Dummy Llama-3-8B in bf16, 64 requests of 1k-token prompts and 256 output tokens on a KV
   cache for about half of them: wall time, swap-outs and preemptions for swap vs recompute,
   (and auto), and how many requests' tokens equal those without pressure (in bf16 a request that runs in
   other batches may see other GEMM kernels and flip a near-tie: counted, not required).

    python benchmarks/check_swap_gpu.py --out $OUT/check_swap.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import make_prompts

from kunserve import LLM, SamplingParams
from kunserve.model.tiny import make_tiny_model

TINY_LENGTHS = (1, 5, 17, 40, 100, 200, 300, 64)
TINY_SMALL_KV = 30  # blocks of 16 tokens: the 8 tiny requests take turns
LARGE_REQUESTS, LARGE_PROMPT, LARGE_OUTPUT = 64, 1024, 256
LARGE_KV_BLOCKS = 2400  # about half of what the 64 requests grow to (64 x 80 blocks)
# auto: swap or recompute per victim by the cost model, scheduling ahead while nothing is swapped.
MODES = ("swap", "auto", "recompute")


def tokens(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], time.perf_counter() - start


def check_tiny(root: Path) -> dict:
    model_dir = make_tiny_model(root / "tiny", "llama")
    prompts = make_prompts(256, TINY_LENGTHS)
    reference, _ = tokens(LLM(str(model_dir), num_kv_blocks=256, max_model_len=400), prompts, 32)
    row = {}
    for mode in MODES:
        llm = LLM(str(model_dir), num_kv_blocks=TINY_SMALL_KV, max_model_len=400, preemption_mode=mode)
        got, _ = tokens(llm, prompts, 32)
        scheduler = llm.engine.scheduler
        row[mode] = {"identical": sum(a == b for a, b in zip(got, reference)), "prompts": len(prompts),
                     "preemptions": scheduler.num_preemptions, "swap_outs": scheduler.num_swap_outs}
    return row


def check_large(model: str) -> dict:
    prompts = make_prompts(128256, (LARGE_PROMPT,) * LARGE_REQUESTS, seed=3)
    common = {"load_format": "dummy", "dtype": "bfloat16", "max_model_len": LARGE_PROMPT + LARGE_OUTPUT}
    reference, unloaded_s = tokens(LLM(model, **common), prompts, LARGE_OUTPUT)
    torch.cuda.empty_cache()
    row: dict = {"unloaded_s": unloaded_s}
    for mode in MODES:
        llm = LLM(model, num_kv_blocks=LARGE_KV_BLOCKS, preemption_mode=mode, **common)
        got, seconds = tokens(llm, prompts, LARGE_OUTPUT)
        scheduler = llm.engine.scheduler
        row[mode] = {"identical": sum(a == b for a, b in zip(got, reference)), "prompts": len(prompts),
                     "seconds": seconds, "preemptions": scheduler.num_preemptions,
                     "swap_outs": scheduler.num_swap_outs}
        del llm
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--out", default="results/check_swap.json")
    args = parser.parse_args()
    report: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as tmp:
        report["tiny"] = check_tiny(Path(tmp))
    report["large"] = check_large(args.model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{report['device']}")
    print(f"{'model':<12} {'mode':<10} {'identical':>10} {'preemptions':>12} {'swap-outs':>10} {'seconds':>8}")
    for name in ("tiny", "large"):
        for mode in MODES:
            r = report[name][mode]
            print(f"{name:<12} {mode:<10} {r['identical']:>7}/{r['prompts']} {r['preemptions']:>12} "
                  f"{r['swap_outs']:>10} {r.get('seconds', float('nan')):>8.2f}")
    print(f"large, unloaded: {report['large']['unloaded_s']:.2f} s")
    ok = all(report["tiny"][mode]["identical"] == report["tiny"][mode]["prompts"] for mode in MODES)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
