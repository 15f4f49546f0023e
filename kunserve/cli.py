"""The `kunserve` command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from kunserve.arch.registry import TINY_ARCHS
from kunserve.bench.demo import run_demo
from kunserve.bench.launch import add_launch_arguments, run_launch
from kunserve.bench.run import add_bench_arguments, run_bench
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.dispatcher import DISPATCH_POLICIES
from kunserve.cluster.policies.registry import OVERLOAD_POLICIES
from kunserve.config import EXECUTOR_BACKENDS
from kunserve.engine_args import add_engine_arguments, engine_config
from kunserve.model.tiny import make_tiny_model
from kunserve.server.protocol import DEFAULT_MAX_REQUEST_BYTES
from kunserve.sim.run import add_simulate_arguments, run_simulate


def _make_tiny_model(args: argparse.Namespace) -> None:
    path = make_tiny_model(args.dir, args.arch, seed=args.seed, num_layers=args.num_layers, hidden_size=args.hidden_size)
    print(f"wrote a tiny random {args.arch} model to {path}")


def _generate(args: argparse.Namespace) -> None:
    from kunserve import LLM, SamplingParams

    synthetic = args.input_len is not None
    config = engine_config(args, skip_tokenizer_init=args.skip_tokenizer_init or synthetic)
    llm = LLM(**dataclasses.asdict(config))
    if synthetic:
        # Synthetic load: fixed-length token-id prompts, outputs forced to full length.
        vocab = llm.engine.spec.vocab_size
        prompts = [[(7 * i + 13 * j) % vocab for j in range(args.input_len)] for i in range(args.num_prompts)]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    else:
        prompts = args.prompt or ["The quick brown fox", "Once upon a time", "Serving large language models"]
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    if not synthetic:
        for out in outputs:
            print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    print(f"{len(outputs)} requests, {generated} tokens in {elapsed:.2f} s: {generated / elapsed:.1f} output tok/s")


def _serve(args: argparse.Namespace) -> None:
    from kunserve.server.api_server import ServerConfig, run_server

    server = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_request_bytes=args.max_request_bytes,
        metrics_need_key=args.metrics_need_key,
        served_model_names=args.served_model_name or [],
        max_waiting_requests=args.max_waiting_requests,
        retry_after_s=args.retry_after_s,
        num_replicas=args.replicas,
        dispatch_policy=args.dispatch_policy,
        coordinator=CoordinatorConfig(
            overload_policy=args.overload_policy, max_group_size=args.max_group_size,
            drop_after_s=args.drop_after_s,
            restore_after_s=args.restore_after_s,
        ),
        log_level=args.log_level.lower(),
    )
    run_server(engine_config(args), server)


def _bench(args: argparse.Namespace) -> None:
    if args.demo:
        run_demo(args)
    elif args.launch:
        run_launch(args)
    elif args.compare or args.out_dir is not None:
        raise SystemExit("kunserve bench: --compare and --out-dir need --launch (or --demo)")
    else:
        run_bench(args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kunserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level: DEBUG, INFO (the default), WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random model with a locally trained tokenizer")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", choices=TINY_ARCHS, default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--num-layers", type=int, default=4)
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.set_defaults(run=_make_tiny_model)

    gen = sub.add_parser("generate", help="offline generation (default: the embedded tiny model)")
    gen.add_argument("--model", default=None, help="model directory or preset (default: tiny-llama)")
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--num-prompts", type=int, default=64, help="with --input-len: synthetic prompt count")
    gen.add_argument("--input-len", type=int, default=None, help="synthetic token-id prompts of this length")
    add_engine_arguments(gen)
    gen.set_defaults(run=_generate)

    serve = sub.add_parser("serve", help="the OpenAI-compatible server (default: the embedded tiny model)")
    serve.add_argument("model", nargs="?", default=None, help="model directory or preset (default: tiny-llama)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer <key>` on /v1/*")
    serve.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                       help="refuse larger request bodies with 413 (default: 16 MiB)")
    serve.add_argument("--metrics-need-key", action="store_true", help="/metrics, too, requires the --api-key")
    serve.add_argument("--served-model-name", nargs="+", default=None, help="names clients use (default: MODEL)")
    serve.add_argument("--max-waiting-requests", type=int, default=None, help="beyond it: 503 + Retry-After")
    serve.add_argument("--retry-after-s", type=int, default=1, help="the Retry-After a 503 suggests")
    serve.add_argument("--replicas", type=int, default=1, help="data-parallel replicas, each on its own device(s)")
    serve.add_argument("--dispatch-policy", choices=DISPATCH_POLICIES, default="least_loaded")
    serve.add_argument("--overload-policy", choices=OVERLOAD_POLICIES, default="kunserve",
                       help="kunserve: drop replicated layers under KV overload; recompute: preempt and recompute (vLLM); "
                            "swap: preempt to host memory (InferCept); migrate: move running requests to lighter "
                            "replicas (Llumnix)")
    serve.add_argument("--max-group-size", type=int, default=None,
                       help="most replicas a drop fuses into one pipeline group (default: as many as needed)")
    serve.add_argument("--drop-after-s", type=float, default=0.2, help="overload lasting this long triggers a drop")
    serve.add_argument("--restore-after-s", type=float, default=2.0,
                       help="demand fitting the replicas this long triggers a restore")
    serve.add_argument("--pipeline-size", type=int, dest="pipeline_parallel_size", default=1,
                       help="pipeline stages per replica (same as --pipeline-parallel-size)")
    serve.add_argument("--executor", dest="distributed_executor_backend", choices=EXECUTOR_BACKENDS, default="auto",
                       help="mp: worker processes on this host; ray: Ray actors on the nodes of a Ray cluster "
                            "(--ray-address; pip install kunserve[ray]); same as --distributed-executor-backend")
    add_engine_arguments(serve)
    serve.set_defaults(run=_serve)

    bench = sub.add_parser(
        "bench", help="replay a trace or synthetic arrivals against a server (or --launch a cluster); report latencies"
    )
    add_bench_arguments(bench)
    add_launch_arguments(bench)
    bench.set_defaults(run=_bench)

    simulate = sub.add_parser(
        "simulate", help="a trace or synthetic workload on N simulated GPUs per overload policy (same outputs as bench)"
    )
    add_simulate_arguments(simulate)
    simulate.set_defaults(run=run_simulate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.run(args)


if __name__ == "__main__":
    main()
