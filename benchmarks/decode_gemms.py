"""The linears of a decode step at batch sizes where they turn from bandwidth- to compute-bound.

For each of a model's projections (fused qkv, o, fused gate/up, down, LM head) at 32..256 rows:
F.linear through cuBLAS and through cuBLASLt (`torch.backends.cuda.preferred_blas_library`),
timed replayed from a CUDA graph, and the sum over a step (every layer, one LM head); then
Inductor's max-autotune (Triton GEMM templates against cuBLAS) on three shapes at 256 rows.
The step sum is what a decode step spends in its GEMMs, which the HBM floor of
benchmarks/engine.py counts as the weight read alone.

    python benchmarks/decode_gemms.py --out $OUT/decode_gemms.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from kunserve.arch.spec import ModelSpec
from kunserve.model.presets import resolve_model

ROWS = (32, 64, 128, 192, 232, 256)
BLAS_LIBRARIES = ("cublas", "cublaslt")
AUTOTUNED_SHAPES = ("qkv", "gate_up", "down")
AUTOTUNED_ROWS = 256
REPEAT_MS = 50


def projection_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear of a layer (its family's schema), and the LM head's."""
    shapes = {t.name: (t.shape[0], t.shape[1]) for t in spec.layer_tensors() if t.is_matrix}
    return {**shapes, "lm_head": (spec.vocab_size, spec.hidden_size)}


def time_linear(linear, x: torch.Tensor, weight: torch.Tensor) -> float:
    return float(triton.testing.do_bench_cudagraph(lambda: linear(x, weight), rep=REPEAT_MS, return_mode="median"))


def sweep_blas(shapes: dict[str, tuple[int, int]], weights: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for library in BLAS_LIBRARIES:
        torch.backends.cuda.preferred_blas_library(library)
        for m in ROWS:
            for name, (n, k) in shapes.items():
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ms = time_linear(F.linear, x, weights[name])
                rows.append({"library": library, "rows": m, "shape": name, "ms": ms,
                             "TFLOPs": 2 * m * n * k / ms / 1e9, "weight_TBps": n * k * 2 / ms / 1e9})
    torch.backends.cuda.preferred_blas_library("cublas")
    return rows


def sweep_autotune(shapes: dict[str, tuple[int, int]], weights: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for name in AUTOTUNED_SHAPES:
        n, k = shapes[name]
        x = torch.randn(AUTOTUNED_ROWS, k, device="cuda", dtype=torch.bfloat16)
        compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
        compiled(x, weights[name])
        ms = time_linear(compiled, x, weights[name])
        rows.append({"library": "inductor-max-autotune", "rows": AUTOTUNED_ROWS, "shape": name, "ms": ms,
                     "TFLOPs": 2 * AUTOTUNED_ROWS * n * k / ms / 1e9})
        torch._dynamo.reset()
    return rows


def step_ms(rows: list[dict], library: str, m: int, num_layers: int) -> float:
    """GEMM time of one decode step: every layer's projections and one LM head."""
    return sum(r["ms"] * (1 if r["shape"] == "lm_head" else num_layers)
               for r in rows if r["library"] == library and r["rows"] == m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--out", default="results/decode_gemms.json")
    args = parser.parse_args()
    spec = resolve_model(args.model).spec
    shapes = projection_shapes(spec)
    weights = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for name, (n, k) in shapes.items()}
    blas = sweep_blas(shapes, weights)
    autotuned = sweep_autotune(shapes, weights)
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "model": args.model, "shapes": shapes, "blas": blas, "autotuned": autotuned,
              "step_ms": {lib: {m: step_ms(blas, lib, m, spec.num_layers) for m in ROWS} for lib in BLAS_LIBRARIES}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"\n{report['device']}, {args.model}: decode-step GEMMs (ms per step = {spec.num_layers} layers + LM head)")
    names = list(shapes)
    print(f"{'rows':>5} {'library':>9} {'step ms':>8} " + " ".join(f"{n + ' TF/s':>13}" for n in names))
    for m in ROWS:
        for library in BLAS_LIBRARIES:
            by_shape = {r["shape"]: r for r in blas if r["library"] == library and r["rows"] == m}
            print(f"{m:>5} {library:>9} {report['step_ms'][library][m]:>8.2f} "
                  + " ".join(f"{by_shape[n]['TFLOPs']:>13.0f}" for n in names))
    for r in autotuned:
        cublas = next(b for b in blas if b["library"] == "cublas" and b["rows"] == r["rows"] and b["shape"] == r["shape"])
        print(f"{r['shape']} at {r['rows']} rows: Inductor max-autotune {r['ms'] * 1e3:.1f} us, "
              f"cuBLAS {cublas['ms'] * 1e3:.1f} us")


if __name__ == "__main__":
    main()
