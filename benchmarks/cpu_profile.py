"""Where kunserve's time goes on CPU, on benchmarks/cpu_offline.py's workload (tiny Llama,
float32, 64 prompts x 128 tokens, 64 output tokens, greedy), and the machine's GEMM rate on the
shapes of its linear layers, so the profile's linear time can be set against what the cores do.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/cpu_profile.py
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch

from kunserve import LLM, SamplingParams
from kunserve.kernels.cpu_linear import Linear, PackedLinear, plain_linear
from kunserve.model.tiny import make_tiny_model

TOP_FUNCTIONS = 12
GEMM_REPEATS = 200


def linear_shapes(llm: LLM) -> list[tuple[int, int]]:
    """(in, out) of a decoder layer's linears (qkv, o, gate_up, down) and the LM head."""
    spec = llm.engine.spec
    return [(spec.hidden_size, spec.q_size + 2 * spec.kv_size), (spec.q_size, spec.hidden_size),
            (spec.hidden_size, 2 * spec.intermediate_size), (spec.intermediate_size, spec.hidden_size),
            (spec.hidden_size, spec.vocab_size)]


def gemm_gflops(rows: int, shapes: list[tuple[int, int]], linear: Linear) -> float:
    """`linear`'s rate summed over one pass of `shapes` with `rows` input rows."""
    weights = [torch.randn(n, k) for k, n in shapes]
    inputs = [torch.randn(rows, k) for k, _ in shapes]
    for _ in range(GEMM_REPEATS // 10):
        for i, (x, w) in enumerate(zip(inputs, weights, strict=True)):
            linear(x, w, None, i)
    start = time.perf_counter()
    for _ in range(GEMM_REPEATS):
        for i, (x, w) in enumerate(zip(inputs, weights, strict=True)):
            linear(x, w, None, i)
    seconds = (time.perf_counter() - start) / GEMM_REPEATS
    return sum(2 * rows * k * n for k, n in shapes) / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--attention-backend", default="inductor", choices=("inductor", "torch"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(tempfile.mkdtemp(prefix="kunserve-profile-")) / "tiny-llama"
    make_tiny_model(model_dir, "llama", hidden_size=256, num_layers=4)
    llm = LLM(str(model_dir), dtype="float32", seed=0, max_model_len=1024, num_kv_blocks=1024,
              attention_backend=args.attention_backend)
    vocab = llm.engine.spec.vocab_size
    prompts = [[(97 * i + 31 * j) % vocab for j in range(args.input_len)] for i in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    print(f"one run: {time.perf_counter() - start:.3f} s ({args.num_prompts * args.output_len} output tokens)")
    profile = cProfile.Profile()
    profile.enable()
    llm.generate(prompts, params, use_tqdm=False)
    profile.disable()
    stats = pstats.Stats(profile)
    print(f"profiled run: {stats.total_tt:.3f} s; the functions taking the most time of their own:")
    stats.sort_stats("tottime").print_stats(TOP_FUNCTIONS)
    shapes = linear_shapes(llm)
    for rows in (args.num_prompts, 2048):
        for name, linear in (("F.linear", plain_linear), ("oneDNN-packed", PackedLinear())):
            print(f"{name} on the model's shapes with {rows} rows: {gemm_gflops(rows, shapes, linear):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
