"""Profile step times on this device and fit the cost model (kunserve/engine/cost_model.py).

Two stages are profiled: the whole model (it samples) and its first half (as a drop's
stage 0 holds it). A quarter of the points (seeded) is held out of the fit; the table shows
the fit's relative error on them (target < 10%). Writes the cost model (fitted on the other
points) to `--out`, and every point with its prediction to `--points`.

    python benchmarks/profile_steps.py --model llama-3-8b --out $OUT/llama-3-8b.json --points $OUT/points.json
    python benchmarks/profile_steps.py --model tiny-llama --device cpu --out /tmp/tiny.json   # on CPU
Copy the result to kunserve/engine/profiles/<model>.json to make it the model's default.

(The issue names it benchmarks/profile.py; a script of that name would shadow the standard
library's `profile` module for every script in this folder, which transformers imports.)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
from pathlib import Path

import numpy as np
import torch

from kunserve import EngineConfig
from kunserve.bench.profiler import ProfileCase, profile_grid, profile_worker, split_holdout
from kunserve.engine.cost_model import CostModel, ProfilePoint, fit_step_coefficients, relative_errors
from kunserve.model.presets import resolve_model
from kunserve.worker.worker import build_worker

HOLDOUT_EVERY = 4

GRIDS = {  # decode batches, contexts, prefill chunk tokens
    "gpu": ([1, 8, 32, 64, 128, 192, 256], [256, 1024, 4096], [64, 256, 512, 1024, 2048, 4096]),
    "cpu": ([1, 4, 16], [32, 128], [16, 64, 128]),
}


def profile_stage(config: EngineConfig, layers: int, cases: list[ProfileCase], repeats: int) -> list[ProfilePoint]:
    model = resolve_model(config.model)
    worker = build_worker(config, model, (0, layers), config.resolve_device())
    try:
        return profile_worker(worker, cases, config.block_size, repeats)
    finally:
        del worker
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--points", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = EngineConfig(model=args.model, load_format="dummy", device=args.device, skip_tokenizer_init=True,
                          max_num_batched_tokens=8192, max_num_seqs=256, max_model_len=8192,
                          gpu_memory_utilization=0.85)
    device = config.resolve_device()
    spec = resolve_model(args.model).spec
    cases = profile_grid(*GRIDS["gpu" if device.type == "cuda" else "cpu"])
    points = []
    for layers in (spec.num_layers, spec.num_layers // 2):
        points += profile_stage(config, layers, cases, args.repeats)
    fit, held = split_holdout(points, HOLDOUT_EVERY)
    coefficients = fit_step_coefficients(fit)
    held_errors = relative_errors(coefficients, held)
    fit_errors = relative_errors(coefficients, fit)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    default = CostModel.default(spec, args.model)
    model = CostModel(args.model, name, coefficients, default.links, float(held_errors.mean()),
                      default.layer_bytes, default.kv_bytes_per_token_layer, default.activation_bytes_per_token,
                      {"source": "benchmarks/profile_steps.py", "points": str(len(points)),
                       "links": "nominal; measured transfer rates: benchmarks/kv_exchange.py, docs/benchmarks.md"})
    model.save(args.out)

    print(f"{'layers':>6} {'tokens':>6} {'dec ctx':>9} {'pre pairs':>11} {'measured ms':>12} "
          f"{'predicted ms':>13} {'err %':>6} set")
    for point in points:
        predicted = coefficients.predict(point.shape, point.layers, point.samples)
        print(f"{point.layers:>6} {point.shape.num_tokens:>6} {point.shape.decode_context:>9} "
              f"{point.shape.prefill_pairs:>11} {point.seconds * 1e3:>12.3f} {predicted * 1e3:>13.3f} "
              f"{abs(predicted - point.seconds) / point.seconds * 100:>6.1f} {'held' if point in held else 'fit'}")
    print(f"\n{name}, {args.model}: {len(fit)} points fitted, {len(held)} held out")
    print(f"relative error on held-out points: mean {held_errors.mean() * 100:.1f}%, "
          f"max {held_errors.max() * 100:.1f}% (fitted points: mean {fit_errors.mean() * 100:.1f}%)")
    print(f"coefficients: {coefficients}")
    if args.points:
        rows = [{"layers": p.layers, "samples": p.samples, "shape": vars(p.shape), "seconds": p.seconds,
                 "predicted": coefficients.predict(p.shape, p.layers, p.samples), "held_out": p in held}
                for p in points]
        args.points.parent.mkdir(parents=True, exist_ok=True)
        args.points.write_text(json.dumps({"device": name, "model": args.model, "rows": rows,
                                           "holdout_mean_error": float(np.mean(held_errors)),
                                           "holdout_max_error": float(np.max(held_errors))}, indent=1))


if __name__ == "__main__":
    main()
