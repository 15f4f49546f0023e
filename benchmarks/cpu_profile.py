"""Where kunserve's time goes on CPU, on benchmarks/cpu_offline.py's workload (tiny Llama,
float32, 64 prompts x 128 tokens, 64 output tokens, greedy), and the machine's GEMM rate on the
shapes of its linear layers, so the profile's linear time can be set against what the cores do.
With --peer, the same profile of vLLM's CPU build (its engine core in this process,
VLLM_ENABLE_V1_MULTIPROCESSING=0), so the two can be compared function by function.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/cpu_profile.py [--peer]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from cpu_offline import engine_env, vllm_peer

from kunserve import LLM, SamplingParams
from kunserve.kernels.cpu_linear import Linear, PackedLinear, onednn_linear, plain_linear
from kunserve.model.tiny import make_tiny_model

TOP_FUNCTIONS = 12
GEMM_REPEATS = 200

PEER_SCRIPT = r"""
import cProfile, pstats, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, vocab, num_prompts, input_len, output_len, top = sys.argv[1], *map(int, sys.argv[2:])
llm = LLM(model, dtype="float32", seed=0, max_model_len=1024)
prompts = [TokensPrompt(prompt_token_ids=[(97 * i + 31 * j) % vocab for j in range(input_len)]) for i in range(num_prompts)]
params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
llm.generate(prompts, params, use_tqdm=False)
start = time.perf_counter()
llm.generate(prompts, params, use_tqdm=False)
print(f"vLLM, one run: {time.perf_counter() - start:.3f} s")
profile = cProfile.Profile()
profile.enable()
llm.generate(prompts, params, use_tqdm=False)
profile.disable()
stats = pstats.Stats(profile)
print(f"vLLM, profiled run: {stats.total_tt:.3f} s; the functions taking the most time of their own:")
stats.sort_stats("tottime").print_stats(top)
"""


def linear_shapes(llm: LLM) -> list[tuple[int, int]]:
    """(in, out) of a decoder layer's linears (its family's schema: qkv, o, gate_up, down) and the LM head."""
    spec = llm.engine.spec
    layer = [(t.shape[1], t.shape[0]) for t in spec.layer_tensors() if t.is_matrix]
    return [*layer, (spec.hidden_size, spec.vocab_size)]


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
    parser.add_argument("--attention-backend", default="cpu", choices=("cpu", "torch"))
    parser.add_argument("--linear-backend", default="auto", choices=("auto", "onednn", "onednn-packed", "torch"))
    parser.add_argument("--peer", action="store_true", help="also profile vLLM's CPU build (benchmarks/cpu_offline.py's peer)")
    parser.add_argument("--peer-dir", default=os.environ.get("PEER_DIR", str(Path.home() / ".cache/kunserve-peers")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(tempfile.mkdtemp(prefix="kunserve-profile-")) / "tiny-llama"
    make_tiny_model(model_dir, "llama", hidden_size=256, num_layers=4)
    llm = LLM(str(model_dir), dtype="float32", seed=0, max_model_len=1024, num_kv_blocks=1024,
              attention_backend=args.attention_backend, linear_backend=args.linear_backend)
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
        for name, linear in (("F.linear", plain_linear), ("oneDNN", onednn_linear), ("oneDNN-packed", PackedLinear())):
            print(f"{name} on the model's shapes with {rows} rows: {gemm_gflops(rows, shapes, linear):.0f} GFLOP/s")
    peer = vllm_peer(Path(args.peer_dir), args.threads, engine_env(args.threads)) if args.peer else None
    if peer is not None:
        python, env = peer
        command = [python, "-c", PEER_SCRIPT, str(model_dir), str(vocab), str(args.num_prompts), str(args.input_len),
                   str(args.output_len), str(TOP_FUNCTIONS)]
        result = subprocess.run(command, env=dict(env, VLLM_ENABLE_V1_MULTIPROCESSING="0"), capture_output=True,
                                text=True, check=False)
        if result.returncode:
            raise RuntimeError(f"vLLM's profile failed:\n{result.stderr[-4000:]}")
        print(result.stdout)


if __name__ == "__main__":
    main()
