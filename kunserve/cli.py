"""The `kunserve` command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

import kunserve
from kunserve.arch.registry import TINY_ARCHS
from kunserve.bench.demo import run_demo
from kunserve.bench.launch import add_launch_arguments, run_launch
from kunserve.bench.run import add_bench_arguments, require_server, run_bench
from kunserve.cluster_args import add_cluster_arguments, coordinator_config
from kunserve.engine_args import HELP, HelpFormatter, add_engine_arguments, engine_config
from kunserve.exit_codes import EXIT_INTERRUPTED, EXIT_REQUESTS_FAILED, EXIT_USAGE
from kunserve.logs import DEFAULT_LOG_LEVEL, LOG_LEVELS, configure
from kunserve.model.tiny import make_tiny_model
from kunserve.server.limits import DEFAULT_MAX_REQUEST_BYTES
from kunserve.sim.run import add_simulate_arguments, run_simulate

logger = logging.getLogger(__name__)



def _make_tiny_model(args: argparse.Namespace) -> None:
    path = make_tiny_model(args.dir, args.arch, seed=args.seed, num_layers=args.num_layers, hidden_size=args.hidden_size)
    print(f"wrote a tiny random {args.arch} model to {path}")


def _generate(args: argparse.Namespace) -> None:
    from kunserve import LLM, SamplingParams

    synthetic = args.input_len is not None
    config = engine_config(args, skip_tokenizer_init=args.skip_tokenizer_init or synthetic)
    with LLM(**dataclasses.asdict(config)) as llm:
        if synthetic:
            # Synthetic load: fixed-length token-id prompts, outputs forced to full length.
            vocab = llm.engine.spec.vocab_size
            prompts = [[(7 * i + 13 * j) % vocab for j in range(args.input_len)] for i in range(args.num_prompts)]
            params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        else:
            prompts = args.prompt or ["The quick brown fox", "Once upon a time", "Serving large language models"]
            params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                                    seed=args.seed)
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
        coordinator=coordinator_config(args),
        log_level=args.log_level.lower(),
    )
    run_server(engine_config(args, model=serve_model(args)), server)


def serve_model(args: argparse.Namespace) -> str | None:
    """`kunserve serve MODEL` or, as vLLM also takes it, `kunserve serve --model MODEL`."""
    if args.model is not None and args.model_option is not None and args.model != args.model_option:
        raise ValueError(f"model: given twice, {args.model!r} and --model {args.model_option!r}")
    return args.model or args.model_option


def _bench(args: argparse.Namespace) -> None:
    if args.demo:
        record = run_demo(args)
    elif args.launch:
        record = run_launch(args)
    elif args.compare or args.out_dir is not None:
        raise SystemExit("kunserve bench: --compare and --out-dir need --launch (or --demo)")
    else:
        require_server(args.base_url)
        record = {"runs": [{"summary": run_bench(args)}]}
    failed = sum(run["summary"]["failed"] for run in record["runs"])
    if failed:
        print(f"kunserve bench: {failed} request(s) failed; the causes and their fixes are logged above",
              file=sys.stderr)
        raise SystemExit(EXIT_REQUESTS_FAILED)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kunserve", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"kunserve {kunserve.__version__}")
    log_help = "DEBUG also shows the traceback of an error"
    parser.add_argument("--log-level", default=DEFAULT_LOG_LEVEL, type=str.upper, choices=LOG_LEVELS, help=log_help)
    # Also after the command, as vLLM takes it; unset there, the value before it stands.
    after_command = argparse.ArgumentParser(add_help=False)
    after_command.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper, choices=LOG_LEVELS,
                               help=f"{log_help} (default: {DEFAULT_LOG_LEVEL})")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter,
                              parents=[after_command])

    tiny = command("make-tiny-model", "write a tiny random model with a locally trained tokenizer")
    tiny.add_argument("dir", help="the directory to write")
    tiny.add_argument("--arch", choices=TINY_ARCHS, default="llama", help="architecture")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.add_argument("--num-layers", type=int, default=4, help="decoder layers")
    tiny.add_argument("--hidden-size", type=int, default=64, help="hidden size")
    tiny.set_defaults(run=_make_tiny_model)

    gen = command("generate", "offline generation (default: the embedded tiny model)")
    gen.add_argument("--model", default=None, help=HELP["model"])
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for several (default: three examples)")
    gen.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling's probability mass")
    gen.add_argument("--num-prompts", type=int, default=64, help="with --input-len: synthetic prompt count")
    gen.add_argument("--input-len", type=int, default=None,
                     help="synthetic token-id prompts of this length, outputs forced to --max-tokens (default: none)")
    add_engine_arguments(gen)
    gen.set_defaults(run=_generate)

    serve = command("serve", "the OpenAI-compatible server (default: the embedded tiny model)")
    serve.add_argument("model", nargs="?", default=None, help=HELP["model"])
    serve.add_argument("--model", dest="model_option", default=None, help="the same as the positional MODEL, as vLLM "
                       "takes it (default: none)")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (checked before the model loads)")
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer <key>` on /v1/*")
    serve.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                       help="refuse larger request bodies with 413 (default: 16 MiB)")
    serve.add_argument("--metrics-need-key", action="store_true", help="/metrics, too, requires the --api-key")
    serve.add_argument("--served-model-name", nargs="+", default=None, help="names clients use (default: MODEL)")
    serve.add_argument("--max-waiting-requests", type=int, default=None,
                       help="per replica; beyond it: 503 + Retry-After (default: no limit)")
    serve.add_argument("--retry-after-s", type=int, default=1, help="the Retry-After a 503 suggests")
    add_cluster_arguments(serve, default_replicas=1)
    add_engine_arguments(serve)
    serve.set_defaults(run=_serve)

    bench = command(
        "bench", "replay a trace or synthetic arrivals against a server (or --launch a cluster); report latencies"
    )
    add_bench_arguments(bench)
    add_launch_arguments(bench)
    bench.set_defaults(run=_bench)

    simulate = command(
        "simulate", "a trace or synthetic workload on N simulated GPUs per overload policy (same outputs as bench)"
    )
    add_simulate_arguments(simulate)
    simulate.set_defaults(run=run_simulate)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(args.log_level)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"kunserve {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except ValueError as error:  # bad input (a model, a flag's value): its message says which
        if args.log_level == "DEBUG":
            raise
        parser.exit(EXIT_USAGE, f"kunserve {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
