"""GPU correctness: the engine on the GPU against transformers, kernels against eager.

1. Tiny random models of each architecture (float32, built locally): greedy outputs of the
   engine with each attention backend equal transformers' `generate` on the same GPU.
2. Dummy Llama-3-8B in bf16: greedy outputs with CUDA graphs, scheduled one step at a time
   and asynchronously, equal those of eager steps.
3. The stages of a drop's group (each a replica's worker after `become_stage`, with the stage
   models and graphs a drop makes), chained in this process on one GPU: greedy outputs with
   stage graphs equal those of eager stages (tiny Llama float32; dummy Llama-3-8B bf16).
4. With two or more GPUs, tensor parallelism: tiny float32 models (Llama, Qwen2 with one KV
   head, windowed Mistral) give at TP 2 (and TP 4 with four GPUs) the greedy tokens of TP 1,
   decoding through CUDA graphs with NCCL all-reduces inside, scheduled ahead or not.

    python benchmarks/check_gpu.py --out $OUT/check_gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import MODEL_VARIANTS, build_model_dir, make_prompts

from kunserve import LLM, EngineConfig, LLMEngine, SamplingParams
from kunserve.engine.block_manager import BlockManager
from kunserve.engine.staged_block_manager import StagedBlockManager
from kunserve.executor.base import Executor
from kunserve.layout import ArenaLayout, sub_block_ids
from kunserve.model.presets import resolve_model
from kunserve.step import StepInput
from kunserve.worker.worker import Worker, build_worker

NEW_TOKENS = 32
# (name, enforce_eager, async_scheduling); the first is the reference.
GRAPH_MODES = (("eager", True, "off"), ("graphs", False, "off"), ("graphs+async", False, "on"))
# Tiny models of check 3: (name, arch, make_tiny_model arguments, config edits).
TP_MODELS = (("llama", "llama", {}, {}), ("qwen2-one-kv-head", "qwen2", {"num_kv_heads": 1}, {}),
             ("mistral-window", *MODEL_VARIANTS["mistral-window"]))


def reference_greedy_gpu(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=None)
            outs.append(out[0, len(p):].tolist())
    return outs


def check_tiny_models(root: Path) -> list[dict]:
    rows = []
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for name, (arch, build_kwargs, edits) in sorted(MODEL_VARIANTS.items()):
        model_dir = build_model_dir(root / name, arch, build_kwargs, edits)
        prompts = make_prompts(256, seed=1)
        expected = reference_greedy_gpu(model_dir, prompts)
        for backend in ("torch", "triton"):
            for chunk in (2048, 16):
                llm = LLM(str(model_dir), attention_backend=backend, num_kv_blocks=256, max_model_len=512,
                          max_num_batched_tokens=chunk)
                got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
                same = sum(g == e for g, e in zip(got, expected))
                rows.append({"model": name, "backend": backend, "chunk": chunk, "identical": same, "prompts": len(prompts)})
                print(rows[-1], flush=True)
                del llm
    return rows


def check_graphs(model: str) -> dict:
    """Greedy tokens of graph-replayed decodes, scheduled one step at a time and ahead, against
    eager steps scheduled one at a time."""
    greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    prompts = make_prompts(128256, lengths=(5, 50, 300, 1000, 17, 64, 129, 700), seed=2)
    outs = {}
    for mode, eager, async_scheduling in GRAPH_MODES:
        llm = LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=2048, enforce_eager=eager,
                  async_scheduling=async_scheduling)
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        del llm
        torch.cuda.empty_cache()
    reference = outs[GRAPH_MODES[0][0]]
    return {"model": model, "prompts": len(prompts),
            "identical": {mode: sum(a == b for a, b in zip(reference, outs[mode])) for mode, _, _ in GRAPH_MODES[1:]}}


class ChainedStages(Executor):
    """A drop's group run stage after stage in this process on one device: each worker is a
    replica that became stage s (its stage model and graphs exactly as a drop makes them), each
    step translated to the stage's sub-blocks as the group executor does. A check harness only:
    a real group's stages are processes that pass activations over torch.distributed."""

    def __init__(self, workers: list[Worker], blocks: StagedBlockManager) -> None:
        self.workers = workers
        self.blocks = blocks
        self._sampled: deque[np.ndarray] = deque()

    @property
    def layout(self) -> ArenaLayout:
        return self.workers[0].layout

    def kv_block_ids(self) -> range:
        raise RuntimeError("the group's blocks are bound by its StagedBlockManager")

    def submit(self, step: StepInput) -> None:
        hidden = None
        for stage, worker in enumerate(self.workers):
            tables, slots = self.blocks.translate(stage, step.batch.block_tables, step.batch.slot_mapping)
            staged = dataclasses.replace(step, batch=dataclasses.replace(step.batch, block_tables=tables,
                                                                          slot_mapping=slots))
            hidden = worker.runner.forward(staged, hidden)
        self._sampled.append(self.workers[-1].runner.sample(staged, hidden))

    def collect(self) -> np.ndarray:
        return self._sampled.popleft()

    def release_layer(self, layer: int) -> range:
        raise RuntimeError("not a replica")

    def reclaim_layer(self, layer: int) -> None:
        raise RuntimeError("not a replica")


def group_tokens(config: EngineConfig, prompts: list[list[int]], params: SamplingParams, num_stages: int,
                 device: str = "cuda") -> list[list[int]]:
    """Greedy tokens of a `num_stages`-stage group formed by drops, on one device."""
    model = resolve_model(config.model)
    workers = [build_worker(config, model, (0, model.spec.num_layers), torch.device(device)) for _ in range(num_stages)]
    released = [worker.become_stage(s, num_stages) for s, worker in enumerate(workers)]
    pools = [BlockManager(config.block_size,
                          sub_block_ids(np.arange(w.layout.initial_kv_blocks().start, w.layout.total_blocks),
                                        num_stages).tolist() + released[s])
             for s, w in enumerate(workers)]
    blocks = StagedBlockManager(config.block_size, pools)
    engine = LLMEngine(config, ChainedStages(workers, blocks), block_manager=blocks)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    del engine, workers
    if device == "cuda":
        torch.cuda.empty_cache()
    return [done[f"r{i}"] for i in range(len(prompts))]


def check_stage_graphs(model: str, dtype: str, load_format: str, vocab: int) -> dict:
    """A drop's stages replaying CUDA graphs against the same stages run eagerly (and against
    a replica, for the record)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    prompts = make_prompts(vocab, lengths=(5, 50, 300, 17, 64, 129, 200, 33), seed=3)
    base = EngineConfig(model=model, dtype=dtype, load_format=load_format, max_model_len=1024, num_kv_blocks=512)
    eager = group_tokens(dataclasses.replace(base, enforce_eager=True), prompts, greedy, 2)
    graphs = group_tokens(base, prompts, greedy, 2)
    llm = LLM(**dataclasses.asdict(base))
    replica = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    del llm
    torch.cuda.empty_cache()
    return {"model": model, "dtype": dtype, "prompts": len(prompts),
            "stage_graphs_vs_eager_stages": sum(a == b for a, b in zip(eager, graphs)),
            "stage_graphs_vs_replica": sum(a == b for a, b in zip(replica, graphs))}


def check_tensor_parallel(root: Path) -> dict:
    """Greedy tokens at each TP size the GPUs allow against TP 1, with graphs, scheduled one
    step at a time and ahead (the ranks then take rank 0's sampled tokens by a broadcast)."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return {"skipped": f"needs 2 GPUs, found {gpus}"}
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    rows = []
    for name, arch, build_kwargs, edits in TP_MODELS:
        model_dir = build_model_dir(root / f"tp-{name}", arch, build_kwargs, edits)
        prompts = make_prompts(256, seed=3)
        outs = {}
        for tp in [t for t in (1, 2, 4) if t <= gpus]:
            for async_scheduling in ("off", "on"):
                llm = LLM(str(model_dir), num_kv_blocks=256, max_model_len=512, tensor_parallel_size=tp,
                          async_scheduling=async_scheduling)
                outs[tp, async_scheduling] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy,
                                                                                           use_tqdm=False)]
                llm.engine.shutdown()
                del llm
                torch.cuda.empty_cache()
        reference = outs[1, "off"]
        for (tp, async_scheduling), got in outs.items():
            if tp > 1:
                rows.append({"model": name, "tp": tp, "async": async_scheduling, "prompts": len(prompts),
                             "identical": sum(a == b for a, b in zip(reference, got))})
                print(rows[-1], flush=True)
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/check_gpu.json")
    parser.add_argument("--skip-graphs", action="store_true")
    parser.add_argument("--skip-tp", action="store_true", help="skip check 3 (tensor parallelism, 2+ GPUs)")
    args = parser.parse_args()
    report: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as tmp:
        report["tiny_vs_transformers"] = check_tiny_models(Path(tmp))
        if not args.skip_graphs:
            tiny = build_model_dir(Path(tmp) / "stage-llama", "llama", {}, {})
            report["stage_graphs"] = [check_stage_graphs(str(tiny), "float32", "auto", 256),
                                      check_stage_graphs("llama-3-8b", "bfloat16", "dummy", 128256)]
        if not args.skip_tp:
            report["tensor_parallel"] = check_tensor_parallel(Path(tmp))
    if not args.skip_graphs:
        report["graphs_vs_eager"] = check_graphs("llama-3-8b")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{report['device']}: greedy tokens identical to transformers (float32, 8 prompts x {NEW_TOKENS} tokens)")
    print(f"{'model':<16} {'backend':<8} {'chunk':>6} {'identical':>10}")
    for r in report["tiny_vs_transformers"]:
        print(f"{r['model']:<16} {r['backend']:<8} {r['chunk']:>6} {r['identical']:>7}/{r['prompts']}")
    if "graphs_vs_eager" in report:
        g = report["graphs_vs_eager"]
        for mode, same in g["identical"].items():
            print(f"{mode} vs eager ({g['model']} bf16 dummy): {same}/{g['prompts']} identical")
    for r in report.get("stage_graphs", []):
        print(f"2-stage group on one GPU, {r['model'][-16:]} {r['dtype']}: stage graphs vs eager stages "
              f"{r['stage_graphs_vs_eager_stages']}/{r['prompts']} identical (vs a replica: "
              f"{r['stage_graphs_vs_replica']}/{r['prompts']})")
    tp_rows = report.get("tensor_parallel", {}).get("rows", [])
    if "skipped" in report.get("tensor_parallel", {}):
        print(f"tensor parallelism: skipped ({report['tensor_parallel']['skipped']})")
    for r in tp_rows:
        print(f"TP {r['tp']} vs TP 1 ({r['model']}, float32, async {r['async']}): {r['identical']}/{r['prompts']} identical")
    ok = all(r["identical"] == r["prompts"] for r in report["tiny_vs_transformers"] + tp_rows)
    ok &= all(r["stage_graphs_vs_eager_stages"] == r["prompts"] for r in report.get("stage_graphs", []))
    ok &= "graphs_vs_eager" not in report or all(
        same == report["graphs_vs_eager"]["prompts"] for same in report["graphs_vs_eager"]["identical"].values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
