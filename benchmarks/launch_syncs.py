"""Does launching a step wait for the device? On one GPU a replica's step is launched by the
driver itself (kunserve/executor/in_process.py) while the step before runs; a call in the launch
that synchronizes with the device (a `.item()`, a copy to the host, an allocation that waits)
holds the driver until the running step ends, and the device idles while the rest is launched.

This runs an engine on the GPU (scheduling ahead, graphs as configured): `--decodes` requests
decoding throughout and, every `--prompt-every` steps, a new `--prompt-tokens` prompt. Every
launch runs under torch's sync debug mode ("warn"): each synchronizing call is counted by the
Python line that made it. The table gives the launch time (the
executor's submit) of decode-only steps and of steps with a prompt chunk, and each sync site;
`--profile N`, where the prompt steps' launches spend their time.

    python benchmarks/launch_syncs.py --model llama-3-8b --memory-budget 40 --out /tmp/launch_syncs.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from kunserve.config import EngineConfig
from kunserve.engine.llm_engine import LLMEngine
from kunserve.executor.in_process import InProcessExecutor
from kunserve.sampling_params import SamplingParams
from kunserve.step import StepInput

GIB = 1 << 30


class LaunchRecorder:
    """Each submit's time and kind, and the sync sites its launch hit."""

    def __init__(self, profile: bool) -> None:
        self.launch_s: dict[str, list[float]] = {"decode": [], "prompt": []}
        self.sites: Counter[str] = Counter()
        self.profile = cProfile.Profile() if profile else None  # of the prompt steps' launches

    def install(self) -> None:
        submit = InProcessExecutor.submit
        recorder = self

        def recorded_submit(executor: InProcessExecutor, step: StepInput) -> None:
            kind = "decode" if step.decodes_only else "prompt"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                profile = recorder.profile if kind == "prompt" else None
                start = time.perf_counter()
                try:
                    if profile is not None:
                        profile.enable()
                    submit(executor, step)
                finally:
                    if profile is not None:
                        profile.disable()
                    elapsed = time.perf_counter() - start
                    torch.cuda.set_sync_debug_mode("default")
            recorder.launch_s[kind].append(elapsed)
            for warning in caught:  # a warning from torch's C++ names the Python line that called it
                if "synchroniz" in str(warning.message):
                    recorder.sites[f"{kind}: {warning.filename.split('/kunserve/')[-1]}:{warning.lineno}"] += 1

        InProcessExecutor.submit = recorded_submit  # type: ignore[method-assign]


def percentiles(values: list[float]) -> list[float]:
    return [float(v) * 1e3 for v in np.percentile(values, (10, 50, 90, 99))] if values else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--memory-budget", type=float, default=40, help="GiB")
    parser.add_argument("--decodes", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=1700)
    parser.add_argument("--prompt-every", type=int, default=20)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--profile", type=int, default=0,
                        help="print the N functions of most own time in the prompt steps' launches (cProfile)")
    parser.add_argument("--prompt-graph-max-tokens", type=int, default=0,
                        help="EngineConfig.prompt_graph_max_tokens (0: prompt steps eager)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("launch_syncs.py needs a GPU: on CPU nothing synchronizes")
    engine = LLMEngine(EngineConfig(model=args.model, load_format="dummy", async_scheduling="on",
                                    memory_budget_bytes=int(args.memory_budget * GIB), max_model_len=8192,
                                    prompt_graph_max_tokens=args.prompt_graph_max_tokens))
    rng = np.random.default_rng(0)
    vocab = engine.spec.vocab_size
    long_output = SamplingParams(max_tokens=args.steps + 64, ignore_eos=True)
    for i in range(args.decodes):
        engine.add_request(f"d{i}", rng.integers(0, vocab, 64).tolist(), long_output)
    for _ in range(10):  # untimed: the decodes' prompts, the first launches
        engine.step()
    recorder = LaunchRecorder(profile=args.profile > 0)
    recorder.install()
    for step in range(args.steps):
        if step % args.prompt_every == 0:
            engine.add_request(f"p{step}", rng.integers(0, vocab, args.prompt_tokens).tolist(),
                               SamplingParams(max_tokens=4, ignore_eos=True))
        engine.step()
    engine.shutdown()
    summary = {kind: {"steps": len(values), "launch_ms_p10_p50_p90_p99": percentiles(values)}
               for kind, values in recorder.launch_s.items()}
    summary["sync_sites"] = dict(recorder.sites.most_common())
    print("| step | launched | launch P10 / P50 / P90 / P99 (ms) |")
    print("| --- | ---: | --- |")
    for kind in ("decode", "prompt"):
        cells = " / ".join(f"{v:.2f}" for v in summary[kind]["launch_ms_p10_p50_p90_p99"])
        print(f"| {kind} | {summary[kind]['steps']} | {cells} |")
    print("synchronizing calls during launches:", summary["sync_sites"] or "none")
    if recorder.profile is not None:
        text = io.StringIO()
        pstats.Stats(recorder.profile, stream=text).sort_stats("tottime").print_stats(args.profile)
        summary["prompt_launch_profile"] = text.getvalue()
        print(summary["prompt_launch_profile"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, **summary}, indent=1))


if __name__ == "__main__":
    main()
