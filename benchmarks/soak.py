"""The long soak: thousands of greedy requests through the HTTP server while an operator drops
and restores the replicas back to back and some clients disconnect mid-stream, every answer
checked against an uninterrupted run (kunserve/bench/soak.py; tests/bench/test_soak.py runs a short
one). Prints the figures as a table and writes them as JSON.

    python benchmarks/soak.py --requests 5000 --transition-every 50 --out soak.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from pathlib import Path

from kunserve import EngineConfig
from kunserve.bench.soak import SoakSettings, run_soak
from kunserve.model.tiny import make_tiny_model

DEFAULT_MAX_MODEL_LEN = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SoakSettings()
    parser.add_argument("--model", default=None, help="a model directory with a tokenizer (default: a tiny random llama)")
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--transition-every", type=int, default=defaults.transition_every)
    parser.add_argument("--disconnect-every", type=int, default=defaults.disconnect_every)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--num-kv-blocks", type=int, default=48)
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = SoakSettings(requests=args.requests, concurrency=args.concurrency,
                            transition_every=args.transition_every, disconnect_every=args.disconnect_every,
                            max_tokens=args.max_tokens, replicas=args.replicas)
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or str(make_tiny_model(Path(scratch) / "tiny-llama", "llama"))
        config = EngineConfig(model=model, max_model_len=DEFAULT_MAX_MODEL_LEN, max_num_batched_tokens=64,
                              num_kv_blocks=args.num_kv_blocks, worker_threads=args.worker_threads)
        report = run_soak(config, settings)
    print(report.table())
    for message in report.errors:
        print(message)
    if args.out is not None:
        args.out.write_text(json.dumps({"settings": dataclasses.asdict(settings), **dataclasses.asdict(report)},
                                       indent=2))


if __name__ == "__main__":
    main()
