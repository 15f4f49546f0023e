"""Engine speed on one GPU against the hardware floor, in one run.

Dummy Llama-3-8B weights in bf16 (`load_format="dummy"`), measured together with the
device's copy bandwidth and bf16 GEMM rate so every ratio uses this run's ceilings:

  (a) decode step time at batch 1, 32, 128, 256 with 1k-token contexts, against the HBM
      floor = (weight bytes + KV bytes read) / measured copy bandwidth;
  (b) prefill throughput of 4k-token prompts against the measured GEMM rate;
  (c) end-to-end offline throughput: 256 requests, input and output lengths uniform in
      100..1024, ignore_eos;
  (d) with --parts d: workload (c) through transformers' continuous batching (generate_batch).

    python benchmarks/engine.py --parts abc --out $OUT/engine.json   # d: the peer, p: profile steps of (c)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kunserve import LLM, SamplingParams
from kunserve.sampling_params import RequestOutputKind

DECODE_BATCHES = (1, 32, 128, 256)
DECODE_CONTEXT = 1024
DECODE_STEPS = 30
PREFILL_LEN = 4096
E2E_REQUESTS = 256
E2E_MIN_LEN, E2E_MAX_LEN = 100, 1024
TOP_KERNELS = 10


def timed_cuda(fn, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` calls after a warm-up, timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes moved (read + written) per second by a large device-to-device copy."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed_cuda(lambda: dst.copy_(src), 10)


def gemm_rate() -> float:
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return 2 * n**3 / timed_cuda(lambda: a @ b, 10)


def weight_bytes(llm: LLM) -> int:
    """Bytes a decode step reads of the weights: every layer, the final norm and LM head
    (the embedding is gathered, a few rows per step)."""
    layout, spec = llm.engine.executor.layout, llm.engine.spec
    elem_bytes = layout.block_bytes // (layout.block_size * layout.num_layers * 2 * spec.kv_size)
    return layout.layer_bytes * layout.num_layers + (spec.vocab_size + 1) * spec.hidden_size * elem_bytes


def kv_bytes_per_token(llm: LLM) -> int:
    layout = llm.engine.executor.layout
    return layout.block_bytes // layout.block_size


def run_steps_until_decoding(llm: LLM) -> None:
    engine = llm.engine
    while any(s.num_computed_tokens < len(s) - 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()


def bench_decode(llm: LLM, bw: float) -> list[dict]:
    engine = llm.engine
    vocab = engine.spec.vocab_size
    rows = []
    for batch in DECODE_BATCHES:
        # Early requests decode while later ones still prefill: leave them room to keep going.
        params = SamplingParams(
            temperature=0.0, max_tokens=DECODE_CONTEXT, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY
        )
        rng = np.random.default_rng(batch)
        for i in range(batch):
            engine.add_request(f"d{batch}-{i}", rng.integers(0, vocab, DECODE_CONTEXT).tolist(), params)
        run_steps_until_decoding(llm)
        engine.step()  # warm-up decode
        running = engine.scheduler.running
        assert len(running) == batch, f"{len(running)} of {batch} requests are running"
        context_tokens = 0
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(DECODE_STEPS):
            context_tokens += sum(len(s) for s in running)
            engine.step()
        step_s = (time.perf_counter() - start) / DECODE_STEPS
        for i in range(batch):
            engine.abort_request(f"d{batch}-{i}")
        floor_bytes = weight_bytes(llm) + context_tokens / DECODE_STEPS * kv_bytes_per_token(llm)
        floor_s = floor_bytes / bw
        rows.append({"batch": batch, "mean_context": context_tokens / DECODE_STEPS / batch, "step_ms": step_s * 1e3,
                         "floor_ms": floor_s * 1e3, "ratio": step_s / floor_s})
    return rows


def bench_prefill(llm: LLM, gemm: float) -> dict:
    engine = llm.engine
    spec = engine.spec
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    rng = np.random.default_rng(0)
    times = []
    for i in range(4):
        engine.add_request(f"p{i}", rng.integers(0, spec.vocab_size, PREFILL_LEN).tolist(), params)
        torch.cuda.synchronize()
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    linear_params = engine.executor.layout.layer_elems * spec.num_layers
    attn_flops = 2 * 2 * spec.num_layers * spec.q_size * PREFILL_LEN * PREFILL_LEN / 2  # causal QK^T and PV
    flops = 2 * linear_params * PREFILL_LEN + attn_flops + 2 * spec.vocab_size * spec.hidden_size
    return {"tokens": PREFILL_LEN, "seconds": seconds, "tok_per_s": PREFILL_LEN / seconds,
                "tflops": flops / seconds / 1e12, "ratio_to_gemm": flops / seconds / gemm}


def e2e_workload(vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(2026)
    in_lens = rng.integers(E2E_MIN_LEN, E2E_MAX_LEN + 1, E2E_REQUESTS)
    out_lens = rng.integers(E2E_MIN_LEN, E2E_MAX_LEN + 1, E2E_REQUESTS)
    prompts = [rng.integers(0, vocab, n).tolist() for n in in_lens]
    return prompts, out_lens.tolist()


def e2e_floor(llm: LLM, bw: float, gemm: float) -> dict:
    """Lower bounds on workload (c)'s time on this GPU, at the measured ceilings.

    seconds: an engine running a step's kernels one after another: every prompt prefilled at
    the GEMM rate, then each decode step taking the longer of reading the weights and computing
    its GEMMs, plus reading its KV. step_overlap_seconds: the same with each decode step taking
    only the longer of its compute and all its bytes (attention perfectly overlapped with the
    GEMMs). run_overlap_seconds: the whole run's compute against the whole run's decode
    traffic, as if every prompt's compute hid under decode steps' memory time."""
    spec = llm.engine.spec
    prompts, out_lens = e2e_workload(spec.vocab_size)
    in_lens, outs = np.array([len(p) for p in prompts]), np.array(out_lens)
    layer_params = llm.engine.executor.layout.layer_elems * spec.num_layers
    head_params = spec.vocab_size * spec.hidden_size
    attn_flops = 2 * 2 * spec.num_layers * spec.q_size * (in_lens.astype(np.float64) ** 2 / 2)
    prefill_s = float((2 * layer_params * in_lens + attn_flops + 2 * head_params).sum()) / gemm
    steps = np.arange(1, outs.max())  # the first output token comes from the prefill
    running = (outs[None, :] > steps[:, None])
    batch = running.sum(1)
    weights_s = weight_bytes(llm) / bw
    compute_s = 2 * (layer_params + head_params) * batch / gemm
    kv_s = (running * (in_lens[None, :] + steps[:, None])).sum(1) * kv_bytes_per_token(llm) / bw
    gemm_s = np.maximum(weights_s, compute_s)
    seconds = prefill_s + float(gemm_s.sum() + kv_s.sum())
    step_overlap_s = prefill_s + float(np.maximum(compute_s, weights_s + kv_s).sum())
    run_overlap_s = max(prefill_s + float(compute_s.sum()), float((weights_s + kv_s).sum()))
    return {"seconds": seconds, "output_tok_per_s": float(outs.sum()) / seconds, "prefill_s": prefill_s,
            "decode_gemm_s": float(gemm_s.sum()), "decode_kv_s": float(kv_s.sum()),
            "step_overlap_seconds": step_overlap_s, "run_overlap_seconds": run_overlap_s}


def bench_e2e(llm: LLM) -> dict:
    prompts, out_lens = e2e_workload(llm.engine.spec.vocab_size)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up
    steps: list[tuple[float, int, int]] = []  # (when its outputs came back, running, first tokens)
    llm.engine.stats_listener = lambda stats: steps.append(
        (time.perf_counter(), stats.num_running, len(stats.time_to_first_token_s)))
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    llm.engine.stats_listener = None
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert generated == sum(out_lens)
    return {"requests": len(prompts), "output_tokens": generated, "seconds": seconds, "output_tok_per_s": generated / seconds,
                "total_tok_per_s": (generated + sum(map(len, prompts))) / seconds, "timeline": e2e_timeline(start, steps)}


def e2e_timeline(start: float, steps: list[tuple[float, int, int]]) -> dict:
    """Where the e2e run's time went: until every prompt has its first token (prefill chunks
    with decodes riding along), then decode-only steps, by how many requests were running."""
    times = np.array([start] + [t for t, _, _ in steps])
    intervals = np.diff(times)
    running = np.array([r for _, r, _ in steps])
    first_tokens = np.cumsum([f for _, _, f in steps])
    prefilled = int(np.searchsorted(first_tokens, first_tokens[-1]))  # the step of the last first token
    decode = slice(prefilled + 1, None)
    by_batch = {}
    for low, high in ((1, 32), (33, 128), (129, 256)):
        rows = (running[decode] >= low) & (running[decode] <= high)
        if rows.any():
            by_batch[f"{low}-{high}"] = {"steps": int(rows.sum()), "seconds": float(intervals[decode][rows].sum()),
                                         "mean_step_ms": float(intervals[decode][rows].mean() * 1e3)}
    return {"steps": len(steps), "prefill_phase_s": float(times[prefilled + 1] - start),
            "prefill_phase_steps": prefilled + 1, "decode_steps_by_running": by_batch}


def profile_e2e_steps(llm: LLM, skip: int, steps: int) -> dict:
    """Workload (c) stepped by hand: after `skip` steps (past the prefills), `steps` steps under
    torch.profiler. GPU busy = the kernels' summed time over the wall time: near 1 the steps
    are device-bound (the kernels say which), well below 1 the host holds the GPU up."""
    engine = llm.engine
    prompts, out_lens = e2e_workload(engine.spec.vocab_size)
    for i, (prompt, n) in enumerate(zip(prompts, out_lens, strict=True)):
        engine.add_request(f"profile-{i}", prompt, SamplingParams(
            temperature=0.0, max_tokens=n, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY))
    for _ in range(skip):
        engine.step()
    running = len(engine.scheduler.running)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    per_kernel: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_time_total > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.key] = event.device_time_total / steps / 1e3
    host = {event.key: event.cpu_time_total / steps / 1e3 for event in prof.key_averages()
            if event.key.startswith(("cudaGraphLaunch", "cudaEventSynchronize", "cudaStreamSynchronize"))}
    while engine.has_unfinished_requests():
        engine.step()
    kernel_ms = sum(per_kernel.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return {"skip": skip, "steps": steps, "running": running, "wall_ms_per_step": wall_ms,
            "kernel_ms_per_step": kernel_ms, "gpu_busy": kernel_ms / wall_ms, "host_calls_ms": host,
            "kernels": [{"name": name[:90], "ms": ms} for name, ms in top]}


def bench_transformers_peer(model_name: str) -> dict:
    """Workload (c) through transformers' continuous batching on the same GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from kunserve.model.presets import _CONFIG_DIR

    config = AutoConfig.from_pretrained(_CONFIG_DIR / f"{model_name}.json")
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="paged|sdpa")
    model.eval()
    prompts, out_lens = e2e_workload(config.vocab_size)
    # generate_batch takes one generation config for the batch: the mean output length
    # keeps the total output tokens of the workload.
    gen = GenerationConfig(max_new_tokens=int(np.mean(out_lens)), do_sample=False, eos_token_id=-1, pad_token_id=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        results = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    seconds = time.perf_counter() - start
    generated = sum(len(r.generated_tokens) for r in results.values())
    return {"requests": len(prompts), "output_tokens": generated, "seconds": seconds, "output_tok_per_s": generated / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--async-scheduling", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--distributed-executor-backend", default="auto", choices=("auto", "uni", "mp"),
                        help="mp: the engine drives its GPU through a worker process, as a cluster's replica does")
    parser.add_argument("--parts", default="abc", help="which of a, b, c, d to run; p: profile steps of (c)")
    parser.add_argument("--profile-skip", default="200,600", help="p: steps of (c) run before profiling, comma-separated")
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--max-num-batched-tokens", type=int, default=PREFILL_LEN,
                        help="the engine's per-step token budget (at least the 4k prefill of part b)")
    parser.add_argument("--out", default="results/engine.json")
    args = parser.parse_args()

    report: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "model": args.model,
                    "torch": torch.__version__, "async_scheduling": args.async_scheduling,
                    "executor": args.distributed_executor_backend, "max_num_batched_tokens": args.max_num_batched_tokens}
    bw, gemm = copy_bandwidth(), gemm_rate()
    report["copy_bandwidth_GBps"] = bw / 1e9
    report["gemm_TFLOPs"] = gemm / 1e12
    engine_args = {"load_format": "dummy", "dtype": "bfloat16", "max_model_len": PREFILL_LEN + 64,
                       "max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": 256, "attention_backend": args.attention_backend,
                       "async_scheduling": args.async_scheduling,
                       "distributed_executor_backend": args.distributed_executor_backend}
    if args.enforce_eager:
        engine_args["enforce_eager"] = True
    llm = LLM(args.model, **engine_args)
    if "a" in args.parts:
        report["decode"] = bench_decode(llm, bw)
    if "b" in args.parts:
        report["prefill"] = bench_prefill(llm, gemm)
    if "c" in args.parts:
        report["e2e"] = bench_e2e(llm)
        report["e2e_floor"] = e2e_floor(llm, bw, gemm)
    if "p" in args.parts:
        report["e2e_profile"] = [profile_e2e_steps(llm, int(skip), args.profile_steps) for skip in args.profile_skip.split(",")]
    llm.engine.shutdown()  # stops a worker process; frees an in-process worker's memory
    del llm
    torch.cuda.empty_cache()
    if "d" in args.parts:
        report["transformers_peer"] = bench_transformers_peer(args.model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"\n{report['device']}, {args.model} bf16 dummy weights; copy {bw / 1e12:.2f} TB/s, GEMM {gemm / 1e12:.0f} TFLOP/s")
    if "decode" in report:
        print(f"{'decode batch':>12} {'context':>8} {'step ms':>9} {'floor ms':>9} {'x floor':>8}")
        for r in report["decode"]:
            print(f"{r['batch']:>12} {r['mean_context']:>8.0f} {r['step_ms']:>9.2f} {r['floor_ms']:>9.2f} {r['ratio']:>8.2f}")
    if "prefill" in report:
        p = report["prefill"]
        print(f"prefill {p['tokens']} tokens: {p['seconds'] * 1e3:.1f} ms, {p['tok_per_s']:.0f} tok/s, "
              f"{p['tflops']:.0f} TFLOP/s = {p['ratio_to_gemm']:.2f} of GEMM")
    if "e2e" in report:
        e = report["e2e"]
        print(f"e2e {e['requests']} requests: {e['output_tok_per_s']:.0f} output tok/s ({e['seconds']:.1f} s)")
        f = report["e2e_floor"]
        print(f"  floor {f['seconds']:.1f} s = {f['output_tok_per_s']:.0f} output tok/s (prefill {f['prefill_s']:.2f} s, "
              f"decode GEMMs {f['decode_gemm_s']:.2f} s, KV {f['decode_kv_s']:.2f} s): kunserve at "
              f"{f['seconds'] / e['seconds']:.2f} of it")
        print(f"  with attention overlapping the GEMMs in each step: {f['step_overlap_seconds']:.1f} s; with every "
              f"prompt's compute hidden under decode traffic: {f['run_overlap_seconds']:.1f} s")
        timeline = e["timeline"]
        print(f"  until every prompt has its first token: {timeline['prefill_phase_s']:.2f} s in "
              f"{timeline['prefill_phase_steps']} steps; then decode-only steps by requests running:")
        for bucket, b in timeline["decode_steps_by_running"].items():
            print(f"  {bucket:>8}: {b['steps']:>5} steps, {b['seconds']:.2f} s, {b['mean_step_ms']:.2f} ms each")
    for p in report.get("e2e_profile", []):
        print(f"(c) steps {p['skip']}..{p['skip'] + p['steps']} ({p['running']} running): {p['wall_ms_per_step']:.2f} ms "
              f"per step, kernels {p['kernel_ms_per_step']:.2f} ms: GPU busy {p['gpu_busy']:.2f}")
        for name, ms in p["host_calls_ms"].items():
            print(f"  host {name}: {ms:.2f} ms per step")
        for kernel in p["kernels"]:
            print(f"  {kernel['ms']:>7.3f} ms  {kernel['name']}")
    if "transformers_peer" in report:
        t = report["transformers_peer"]
        print(f"transformers generate_batch: {t['output_tok_per_s']:.0f} output tok/s ({t['seconds']:.1f} s)")
        if "e2e" in report:
            print(f"kunserve / transformers = {report['e2e']['output_tok_per_s'] / t['output_tok_per_s']:.1f}x")


if __name__ == "__main__":
    main()
