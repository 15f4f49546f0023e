"""Drop and restore on two GPUs (nvidia-h200-x2), dummy Llama-3-8B in bf16.

Two replicas decode `--batch` requests each with `--context`-token contexts; then they fuse
into a 2-stage pipeline (drop), decode as a group, and split back (restore). Measured:

  * drop time: decision to blocks usable (release layers, bind blocks, KV exchange);
  * KV exchange bandwidth: bytes of the running requests' other-stage KV moved between the
    GPUs / the exchange's wall time (target >= 300 GB/s);
  * stall of the running requests: from the last token before the drop to each request's
    first token after it (max over requests), against their normal inter-token time;
  * restore: total, and the refill of the dropped half of the weights from the peer
    (target <= 100 ms);
  * decode step time, replica mode against pipeline mode (per batch token).

    python benchmarks/drop_restore.py --out $OUT/drop_restore.json
    python benchmarks/drop_restore.py --model tiny-llama --device cpu --batch 4 --context 64 \\
        --out /tmp/drop_restore.json   # the same code path on CPU, as a dry run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from kunserve import EngineConfig, LLMEngine, SamplingParams
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.transitions import fuse, split
from kunserve.sampling_params import RequestOutputKind

DECODE_STEPS = 20


def decode_until_all_decoding(engines: list[LLMEngine]) -> None:
    while any(e.scheduler.waiting or any(s.num_computed_tokens < len(s) - 1 for s in e.scheduler.running)
              for e in engines):
        for engine in engines:
            engine.step()


def time_steps(engine: LLMEngine, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=64, help="running requests per replica")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    config = EngineConfig(model=args.model, load_format="dummy", dtype="bfloat16", device=args.device,
                          max_model_len=args.context + 512, max_num_batched_tokens=8192, skip_tokenizer_init=True,
                          gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.batch)
    cluster = Cluster.launch(config, num_replicas=2, coordinator=CoordinatorConfig("recompute"), open_links=False)
    engines = cluster.engines
    links_start = time.perf_counter()
    cluster.open_links()  # as a serving cluster does at launch (timed here)
    links_s = time.perf_counter() - links_start
    try:
        rng = np.random.default_rng(0)
        params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        for r, engine in enumerate(engines):
            for i in range(args.batch):
                engine.add_request(f"{r}-{i}", rng.integers(0, engine.spec.vocab_size, args.context).tolist(), params)
        decode_until_all_decoding(engines)
        for engine in engines:
            time_steps(engine, 2)  # warm-up
        replica_step = time_steps(engines[0], DECODE_STEPS)
        time_steps(engines[1], DECODE_STEPS)  # keep both replicas at the same context length

        layout = engines[0].executor.layout
        sub_block_bytes = layout.sub_block_elems(2) * layout.elem_bytes
        last_token_at = time.perf_counter()
        group, drop = fuse(engines)
        running = list(group.scheduler.running)
        lengths = {s.request_id: len(s) for s in running}
        first_after: dict[str, float] = {}
        while len(first_after) < len(running):
            group.step()
            now = time.perf_counter()
            for seq in running:
                if seq.request_id not in first_after and len(seq) > lengths[seq.request_id]:
                    first_after[seq.request_id] = now
        stall = max(first_after.values()) - last_token_at
        for _ in range(4):
            group.step()  # warm-up of the pipeline's shapes
        group_step = time_steps(group, 2 * DECODE_STEPS)  # two micro-batches per batch token

        _, restore = split(group, engines)
        for engine in engines:
            engine.step()  # the replicas decode again
        exchanged = drop.sub_blocks_moved * sub_block_bytes
        weight_bytes = layout.layer_bytes * layout.num_layers // 2  # each replica refills half its layers
        result = {
            "model": args.model, "batch_per_replica": args.batch, "context": args.context,
            "open_links_s": links_s, "drop_s": drop.duration_s, "kv_exchange_s": drop.exchange_s, "kv_exchanged_bytes": exchanged,
            "kv_exchange_gb_s": exchanged / drop.exchange_s / 1e9 if drop.exchange_s else None,
            "stall_s": stall, "replica_step_s": replica_step,
            "restore_s": restore.duration_s, "restore_kv_moves_s": restore.exchange_s,
            "restore_weights_s": restore.weights_s, "restore_weight_bytes_per_replica": weight_bytes,
            "restore_weights_gb_s": 2 * weight_bytes / restore.weights_s / 1e9,
            "group_ms_per_batch_token": 2 * group_step * 1e3, "replica_ms_per_batch_token": replica_step * 1e3,
        }
    finally:
        cluster.shutdown()
    for key, value in result.items():
        print(f"{key:34s} {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
