"""What launching each kernel of a prompt step costs the driver's CPU, on a GPU.

A prompt step runs eagerly (decode steps replay CUDA graphs), so its launch is the host work of
every kernel of every layer: on an H200 a step with a 256-token prompt takes the driver about as
long to launch as the device to compute (benchmarks/launch_syncs.py). This times the launches
alone: the device is first kept busy by a long sleep kernel, so each call below returns as soon
as its kernel is queued, and the time per call is the host's. For each of the layer's kernels
(kunserve/kernels/fused.py's Triton kernels and the torch GEMMs of Llama-3-8B's shapes) and for
torch's own versions of the small ones, at `--tokens` rows.

    python benchmarks/launch_costs.py --tokens 256 2048 --out /tmp/launch_costs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kunserve.kernels import fused
from kunserve.model.presets import resolve_model

CALLS = 200  # launches timed per round: well under the device's queue of pending launches
ROUNDS = 5
SLEEP_CYCLES = 200_000_000  # ~0.1 s of the device: longer than a round's launches take


def per_call_us(launch: Callable[[], object]) -> float:
    """The median over rounds of the host's time per call, the device busy throughout."""
    rounds = []
    for _ in range(ROUNDS):
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        start = time.perf_counter()
        for _ in range(CALLS):
            launch()
        rounds.append((time.perf_counter() - start) / CALLS * 1e6)
        torch.cuda.synchronize()
    return statistics.median(rounds)


def kernels(tokens: int) -> dict[str, Callable[[], object]]:
    """A layer's kernels at `tokens` rows of Llama-3-8B, each a call with its inputs made once."""
    spec = resolve_model("llama-3-8b").spec
    device, dtype = torch.device("cuda"), torch.bfloat16
    hidden, head_dim = spec.hidden_size, spec.head_dim
    heads, kv_heads = spec.num_heads, spec.num_kv_heads
    inter = spec.intermediate_size
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    norm = torch.ones(hidden, device=device, dtype=dtype)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device=device, dtype=dtype)
    q, k, _ = qkv.split([heads, kv_heads, kv_heads], dim=1)
    cos_sin = torch.randn(8192, head_dim, device=device, dtype=torch.float32)
    positions = torch.arange(tokens, device=device)
    gate_up = torch.randn(tokens, 2 * inter, device=device, dtype=dtype)
    w_qkv = torch.randn((heads + 2 * kv_heads) * head_dim, hidden, device=device, dtype=dtype)
    w_down = torch.randn(hidden, inter, device=device, dtype=dtype)
    eps = spec.rms_norm_eps
    return {
        "triton rms_norm": lambda: fused.rms_norm(x, norm, eps),
        "triton add_rms_norm": lambda: fused.add_rms_norm(x, residual, norm, eps),
        "triton rotary_qk": lambda: fused.rotary_qk(q, k, cos_sin, positions),
        "triton silu_mul": lambda: fused.silu_mul(gate_up),
        "torch F.rms_norm": lambda: F.rms_norm(x, (hidden,), norm, eps),
        "torch add + F.rms_norm": lambda: F.rms_norm(x + residual, (hidden,), norm, eps),
        "torch silu(gate) * up": lambda: F.silu(gate_up[:, :inter]) * gate_up[:, inter:],
        "torch linear qkv": lambda: F.linear(x, w_qkv),
        "torch linear down": lambda: F.linear(gate_up[:, :inter], w_down),
        "torch.empty": lambda: torch.empty(tokens, hidden, device=device, dtype=dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("launch_costs.py needs a CUDA GPU")
    results: dict[str, dict[str, float]] = {}
    for tokens in args.tokens:
        for name, launch in kernels(tokens).items():
            launch()  # compiled and warm
            results.setdefault(name, {})[str(tokens)] = per_call_us(launch)
    header = ["kernel", *(f"{t} tokens (us per launch)" for t in args.tokens)]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for name, by_tokens in results.items():
        print(f"| {name} | " + " | ".join(f"{by_tokens[str(t)]:.1f}" for t in args.tokens) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "calls": CALLS, "rounds": ROUNDS, "us_per_launch": results}, indent=1))


if __name__ == "__main__":
    main()
