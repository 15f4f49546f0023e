"""The `kunserve` command."""

from __future__ import annotations

import argparse
import logging
import time

from kunserve.model.tiny import TINY_ARCHS, make_tiny_model


def _make_tiny_model(args: argparse.Namespace) -> None:
    path = make_tiny_model(args.dir, args.arch, seed=args.seed, num_layers=args.num_layers, hidden_size=args.hidden_size)
    print(f"wrote a tiny random {args.arch} model to {path}")


def _generate(args: argparse.Namespace) -> None:
    from kunserve import LLM, SamplingParams

    llm = LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        skip_tokenizer_init=args.input_len is not None,
    )
    if args.input_len is not None:
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
    if args.input_len is None:
        for out in outputs:
            print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    print(f"{len(outputs)} requests, {generated} tokens in {elapsed:.2f} s: {generated / elapsed:.1f} output tok/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kunserve", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", help="logging level (INFO shows the memory plan)")
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
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--max-num-batched-tokens", type=int, default=2048)
    gen.add_argument("--num-prompts", type=int, default=64, help="with --input-len: synthetic prompt count")
    gen.add_argument("--input-len", type=int, default=None, help="synthetic token-id prompts of this length")
    gen.set_defaults(run=_generate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.run(args)


if __name__ == "__main__":
    main()
