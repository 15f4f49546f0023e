"""A pipeline stage's decode step on one GPU, against the cost model: a lower bound of a
group's cycle, for the simulator's `group_stage_factor` (kunserve/sim/settings.py) when only
one GPU is lent.

A worker holds the first L/g layers of the model, as stage 0 of a drop's g-stage group does
(decode steps replay CUDA graphs, as a group's stages now capture them), and decodes a
micro-batch of a group's size: `--batch` sequences of `--context` tokens, split into g
micro-batches. Its measured step time over the cost model's for the same stage is the factor
one stage alone shows; a group also pays the activations' hop, the driver's work per
micro-batch and the bubble, which only benchmarks/drop_restore.py on two GPUs measures (then
benchmarks/group_step_factor.py fits the whole factor).

    python benchmarks/stage_step.py --model llama-3-8b --stages 2 --batch 128 --context 2048 --out $OUT/stage.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kunserve import EngineConfig
from kunserve.bench.profiler import ProfileCase, profile_worker
from kunserve.engine.cost_model import resolve_cost_model
from kunserve.model.presets import resolve_model
from kunserve.worker.worker import build_worker

CONTEXT_SPREAD = (0.5, 1.0, 2.0)  # contexts around --context: the factor should not hang on one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--stages", type=int, default=2, help="the group's size g: the stage holds L/g layers")
    parser.add_argument("--batch", type=int, default=128, help="the group's running requests (g micro-batches)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    spec = resolve_model(args.model).spec
    layers = spec.num_layers // args.stages
    micro = max(1, args.batch // args.stages)
    contexts = [max(16, int(args.context * f)) for f in CONTEXT_SPREAD]
    config = EngineConfig(model=args.model, load_format="dummy", device=args.device, skip_tokenizer_init=True,
                          max_num_seqs=max(micro, 1), max_model_len=max(contexts) + 512, gpu_memory_utilization=0.85)
    worker = build_worker(config, resolve_model(args.model), (0, layers), config.resolve_device())
    points = profile_worker(worker, [ProfileCase(micro, c) for c in contexts], config.block_size, args.repeats)
    cost = resolve_cost_model(None, spec, args.model, torch.finfo(worker.arena.buffer.dtype).bits // 8)
    rows = [{"layers": p.layers, "micro_batch": micro, "context": int(p.shape.decode_context) // micro,
             "measured_ms": p.seconds * 1e3, "predicted_ms": cost.step_time(p.shape, p.layers, samples=p.samples) * 1e3}
            for p in points]
    for row in rows:
        row["factor"] = row["measured_ms"] / row["predicted_ms"]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{name}, {args.model}: stage of {layers} layers, micro-batch {micro}, graphs "
          f"{'on' if worker.runner.graphs is not None else 'off'}")
    print(f"{'context':>8} {'measured ms':>12} {'predicted ms':>13} {'factor':>7}")
    for row in rows:
        print(f"{row['context']:>8} {row['measured_ms']:>12.3f} {row['predicted_ms']:>13.3f} {row['factor']:>7.3f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": name, "model": args.model, "stages": args.stages,
                                        "rows": rows, "source": "benchmarks/stage_step.py"}, indent=1))


if __name__ == "__main__":
    main()
