"""Tensor parallelism inside a replica (Megatron-style), on gloo worker processes.

Specified: each rank holds its shard of every layer as the schema declares it (query heads,
the KV heads they read, MLP channels; vocab rows of the embedding and LM head) and its share of
the KV; t ranks give the single-device greedy tokens for Llama, Qwen2 (one KV head, shared
when ranks outnumber it) and Mistral, alone and as the stages of a pipeline; a drop fuses TP-2
replicas into a pipeline of TP-2 stages and a restore splits it, every request keeping its
tokens and every rank its weights; the server serves TP-2 replicas through drops and restores;
sizes that do not divide the model fail with a ValueError naming the field; the cost model and
the simulator price a rank's share of a step plus its all-reduces."""

from __future__ import annotations

import argparse
import dataclasses
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import MODEL_VARIANTS, build_model_dir
from engine_steps import run_steps
from safetensors import safe_open
from server_harness import MAX_MODEL_LEN, RunningServer

from kunserve import LLM, EngineConfig, LLMEngine, SamplingParams
from kunserve.arch.spec import ModelSpec
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.transitions import fuse, split
from kunserve.engine.cost_model import ALL_REDUCE_LINK, CostModel, Link, StepShape
from kunserve.engine_args import add_engine_arguments, engine_config
from kunserve.layout import ArenaLayout
from kunserve.model.decoder import LayerWeights
from kunserve.model.presets import resolve_model
from kunserve.model.weights import CheckpointWeights, DummyWeights
from kunserve.outputs import CompletionOutput
from kunserve.sampling_params import RequestOutputKind
from kunserve.server.api_server import ServerConfig
from kunserve.sim.cluster import SimulatedCluster
from kunserve.worker.protocol import DeviceCalls

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
SEEDED = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True,
                        output_kind=RequestOutputKind.FINAL_ONLY)
# Short and long prompts: the longest run past the Mistral variant's 48-token window.
PROMPTS = [[(7 * i + 13 * j) % 500 for j in range(n)] for i, n in enumerate((3, 19, 70, 130, 45, 8))]
TINY_HEADS, TINY_HEAD_DIM = 4, 16  # kunserve/model/tiny.py: hidden 64 over 4 query heads


@pytest.fixture(scope="module")
def one_kv_head_dir(models_root: Path) -> Path:
    """A tiny Qwen2 whose 4 query heads share one KV head (MQA): ranks past one share it."""
    return build_model_dir(models_root / "qwen2-one-kv-head", "qwen2", {"num_kv_heads": 1}, {})


@pytest.fixture(scope="module")
def mistral_window_dir(models_root: Path) -> Path:
    arch, build_kwargs, edits = MODEL_VARIANTS["mistral-window"]
    return build_model_dir(models_root / "mistral-window-tp", arch, build_kwargs, edits)


def generate(model_dir: Path, params: SamplingParams | list[SamplingParams] = GREEDY, **engine_args: object
             ) -> list[CompletionOutput]:
    llm = LLM(str(model_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=64, worker_threads=1, **engine_args)
    try:
        return [out.outputs[0] for out in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.engine.shutdown()


def tokens(model_dir: Path, params: SamplingParams | list[SamplingParams] = GREEDY, **engine_args: object
           ) -> list[list[int]]:
    return [out.token_ids for out in generate(model_dir, params, **engine_args)]


# ---- shards --------------------------------------------------------------------------------


def read_checkpoint(model_dir: Path, name: str) -> torch.Tensor:
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return f.get_tensor(name)


def rank_layer(model_dir: Path, rank: int, tp_size: int, layer: int = 0) -> LayerWeights:
    """Rank `rank`'s shard of a layer, loaded into an arena slot of its layout."""
    spec = ModelSpec.from_dir(model_dir)
    layout = ArenaLayout.for_kv_blocks(spec, spec.num_layers, 16, 4, 1, tp_size)
    weights = LayerWeights.view(torch.zeros(layout.layer_elems), layout.params)
    CheckpointWeights(model_dir, spec, rank, tp_size).load_layer(layer, weights)
    return weights


@pytest.mark.parametrize(("tp_size", "rank", "kv_head"), [(2, 1, 1), (4, 2, 1), (4, 1, 0)])
def test_a_rank_holds_its_query_heads_the_kv_heads_they_read_and_its_mlp_channels(
    llama_dir: Path, tp_size: int, rank: int, kv_head: int
) -> None:
    def rows(name: str, first: int, count: int) -> torch.Tensor:
        return read_checkpoint(llama_dir, f"model.layers.0.{name}")[first : first + count]

    q_heads = TINY_HEADS // tp_size
    q = slice(rank * q_heads * TINY_HEAD_DIM, (rank + 1) * q_heads * TINY_HEAD_DIM)
    inter = read_checkpoint(llama_dir, "model.layers.0.mlp.down_proj.weight").shape[1] // tp_size
    shard = rank_layer(llama_dir, rank, tp_size)
    kv = (kv_head * TINY_HEAD_DIM, TINY_HEAD_DIM)  # with 2 KV heads, one per rank at most
    assert torch.equal(shard.qkv, torch.cat([rows("self_attn.q_proj.weight", q.start, q.stop - q.start),
                                             rows("self_attn.k_proj.weight", *kv),
                                             rows("self_attn.v_proj.weight", *kv)]))
    assert torch.equal(shard.o, read_checkpoint(llama_dir, "model.layers.0.self_attn.o_proj.weight")[:, q])
    assert torch.equal(shard.gate_up, torch.cat([rows("mlp.gate_proj.weight", rank * inter, inter),
                                                 rows("mlp.up_proj.weight", rank * inter, inter)]))
    down = read_checkpoint(llama_dir, "model.layers.0.mlp.down_proj.weight")
    assert torch.equal(shard.down, down[:, rank * inter : (rank + 1) * inter])
    assert torch.equal(shard.input_norm, read_checkpoint(llama_dir, "model.layers.0.input_layernorm.weight"))


def test_dummy_weights_are_one_model_at_every_tensor_parallel_size(llama_dir: Path) -> None:
    spec = ModelSpec.from_dir(llama_dir)

    def layer(rank: int, tp_size: int) -> LayerWeights:
        layout = ArenaLayout.for_kv_blocks(spec, spec.num_layers, 16, 4, 1, tp_size)
        weights = LayerWeights.view(torch.zeros(layout.layer_elems), layout.params)
        DummyWeights(spec, seed=3, rank=rank, tp_size=tp_size).load_layer(2, weights)
        return weights

    whole, shard = layer(0, 1), layer(1, 2)
    q, kv = TINY_HEADS * TINY_HEAD_DIM, TINY_HEAD_DIM  # rank 1 of 2: q heads 2-3, KV head 1
    assert torch.equal(shard.qkv, torch.cat([whole.qkv[q // 2 : q], whole.qkv[q + kv : q + 2 * kv],
                                             whole.qkv[q + 3 * kv : q + 4 * kv]]))
    assert torch.equal(shard.o, whole.o[:, q // 2 :])
    inter = spec.intermediate_size
    assert torch.equal(shard.gate_up, torch.cat([whole.gate_up[inter // 2 : inter], whole.gate_up[inter + inter // 2 :]]))
    assert torch.equal(shard.down, whole.down[:, inter // 2 :])


def test_every_rank_shares_a_single_kv_head_and_its_bias(one_kv_head_dir: Path) -> None:
    k = read_checkpoint(one_kv_head_dir, "model.layers.0.self_attn.k_proj.weight")
    k_bias = read_checkpoint(one_kv_head_dir, "model.layers.0.self_attn.k_proj.bias")
    q_rows = TINY_HEADS // 4 * TINY_HEAD_DIM
    for rank in range(4):
        shard = rank_layer(one_kv_head_dir, rank, 4)
        assert torch.equal(shard.qkv[q_rows : q_rows + TINY_HEAD_DIM], k)
        assert shard.qkv_bias is not None
        assert torch.equal(shard.qkv_bias[q_rows : q_rows + TINY_HEAD_DIM], k_bias)


def test_a_ranks_vocab_rows_of_the_embedding_and_lm_head_are_its_slice_padded_past_the_vocab(
    llama_dir: Path
) -> None:
    spec = ModelSpec.from_dir(llama_dir)
    tp_size = 3  # does not divide the vocab: the last rank's slice runs past it
    rows = math.ceil(spec.vocab_size / tp_size)
    embed = read_checkpoint(llama_dir, "model.embed_tokens.weight")
    last = CheckpointWeights(llama_dir, spec, tp_size - 1, tp_size).load_stage(True, True, torch.float32,
                                                                               torch.device("cpu"))
    assert last.embed is not None and last.lm_head is not None
    assert last.embed.shape == (rows, spec.hidden_size)
    kept = spec.vocab_size - (tp_size - 1) * rows
    assert torch.equal(last.embed[:kept], embed[(tp_size - 1) * rows :])
    assert not last.embed[kept:].any()
    assert torch.equal(last.lm_head[:kept], read_checkpoint(llama_dir, "lm_head.weight")[(tp_size - 1) * rows :])


def test_a_ranks_arena_holds_its_share_of_each_layer_and_of_the_kv() -> None:
    spec = resolve_model("llama-3-8b").spec  # 32 query heads, 8 KV heads
    whole, quarter = (ArenaLayout.for_kv_blocks(spec, spec.num_layers, 16, 2, 100, t) for t in (1, 4))
    assert quarter.num_kv_heads == 2 and quarter.block_bytes * 4 == whole.block_bytes
    assert quarter.params["qkv"].shape == (whole.params["qkv"].shape[0] // 4, spec.hidden_size)
    assert quarter.params["down"].shape == (spec.hidden_size, spec.intermediate_size // 4)
    assert quarter.params["input_norm"].shape == (spec.hidden_size,)
    assert abs(quarter.layer_bytes * 4 / whole.layer_bytes - 1) < 0.01  # the norms are whole on every rank


# ---- sizes that do not divide ---------------------------------------------------------------


def spec_with(**fields: object) -> ModelSpec:
    return dataclasses.replace(resolve_model("llama-3-8b").spec, **fields)


@pytest.mark.parametrize(("spec", "tp_size", "field"), [
    (spec_with(), 3, "num_attention_heads"),
    (spec_with(num_heads=12, num_kv_heads=4, head_dim=64), 6, "num_key_value_heads"),
    (spec_with(intermediate_size=14338), 4, "intermediate_size"),
])
def test_sizes_that_do_not_divide_the_model_raise_a_value_error_naming_the_field(
    spec: ModelSpec, tp_size: int, field: str
) -> None:
    with pytest.raises(ValueError, match=f"tensor_parallel_size: {tp_size} does not divide {field}"):
        spec.check_tensor_parallel(tp_size)


def test_an_engine_whose_heads_do_not_divide_fails_before_starting_workers(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size: 3 does not divide num_attention_heads"):
        LLM(str(llama_dir), tensor_parallel_size=3)


def test_a_replica_needing_more_gpus_than_the_host_has_fails_before_starting_workers(llama_dir: Path) -> None:
    past_the_last = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match="tensor_parallel_size: this replica's devices run to cuda:"):
        LLM(str(llama_dir), device=past_the_last, tensor_parallel_size=2)


def test_a_tensor_parallel_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size: must be >= 1"):
        EngineConfig(tensor_parallel_size=0)


def test_every_command_takes_the_tensor_parallel_size_long_and_short() -> None:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    for flags in (["--tensor-parallel-size", "2"], ["-tp", "2"]):
        assert engine_config(parser.parse_args(flags)).tensor_parallel_size == 2


# ---- the cost model and the simulator --------------------------------------------------------


def test_a_tensor_parallel_step_costs_a_share_of_the_layers_plus_two_all_reduces_per_layer() -> None:
    spec = resolve_model("llama-3-8b").spec
    cost = CostModel.default(spec, "llama-3-8b")
    decode = StepShape(num_tokens=128, decode_context=128 * 1000, num_samples=0)
    free_links = dataclasses.replace(cost, links={**cost.links, ALL_REDUCE_LINK: Link(math.inf, 0.0)})
    fixed = cost.step.step_s
    one, two_free = (free_links.for_tensor_parallel(t).step_time(decode, 32, samples=False) for t in (1, 2))
    assert two_free - fixed == pytest.approx((one - fixed) / 2)
    link = cost.links[ALL_REDUCE_LINK]
    all_reduce = link.latency_s + 128 * spec.hidden_size * 2 / link.bandwidth_bytes_s  # 2(t-1)/t = 1 at t = 2
    two = cost.for_tensor_parallel(2).step_time(decode, 32, samples=False)
    assert two - two_free == pytest.approx(32 * 2 * all_reduce)


def test_the_simulator_runs_tensor_parallel_replicas_on_a_ranks_share_of_memory_and_time() -> None:
    config = EngineConfig(model="llama-3-8b", num_kv_blocks=64, tensor_parallel_size=4)
    cluster = SimulatedCluster(config, 2)
    executor = cluster.engines[1].executor
    assert executor.layout.num_kv_heads == 2  # 8 KV heads over 4 ranks
    assert executor.global_ranks == [4]  # replica 1's GPUs are 4..7
    assert cluster.engines[1].cost_model.tensor_parallel_size == 4


# ---- engines on worker processes --------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_reference(llama_dir: Path) -> list[list[int]]:
    return tokens(llama_dir)


@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("model", ["llama", "qwen2-one-kv-head", "mistral-window"])
def test_tensor_parallel_ranks_give_the_single_device_greedy_tokens(
    model: str, tp_size: int, request: pytest.FixtureRequest
) -> None:
    fixture = {"llama": "llama_dir", "qwen2-one-kv-head": "one_kv_head_dir", "mistral-window": "mistral_window_dir"}
    model_dir = request.getfixturevalue(fixture[model])
    assert tokens(model_dir, tensor_parallel_size=tp_size) == tokens(model_dir)


def test_ranks_scheduled_a_step_ahead_embed_the_tokens_their_rank_0_sampled(
    llama_dir: Path, llama_reference: list[list[int]]
) -> None:
    assert tokens(llama_dir, tensor_parallel_size=2, async_scheduling="on") == llama_reference


def test_a_pipeline_of_tensor_parallel_stages_gives_the_single_device_greedy_tokens(
    llama_dir: Path, llama_reference: list[list[int]]
) -> None:
    assert tokens(llama_dir, tensor_parallel_size=2, pipeline_parallel_size=2) == llama_reference


def test_a_pipeline_of_tensor_parallel_stages_scheduling_ahead_feeds_every_rank_the_sampled_tokens(
    llama_dir: Path, llama_reference: list[list[int]]
) -> None:
    assert tokens(llama_dir, tensor_parallel_size=2, pipeline_parallel_size=2, async_scheduling="on") == \
        llama_reference


@pytest.fixture(scope="module")
def tp2_replicas(llama_dir: Path) -> Iterator[list[LLMEngine]]:
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=96, max_num_seqs=2,
                          max_num_batched_tokens=64, worker_threads=1, tensor_parallel_size=2)
    cluster = Cluster.launch(config, num_replicas=2)
    cluster.open_links()
    yield cluster.engines
    cluster.shutdown()


def test_drops_and_restores_between_tensor_parallel_replicas_keep_every_requests_tokens(
    tp2_replicas: list[LLMEngine], llama_dir: Path
) -> None:
    params = [GREEDY if i % 2 else SEEDED for i in range(len(PROMPTS))]  # seeded: its random stream moves too
    expected = tokens(llama_dir, params)
    weights_before = [engine.executor.call(0, DeviceCalls.weight_digests) for engine in tp2_replicas]
    for i, prompt in enumerate(PROMPTS):
        tp2_replicas[i % 2].add_request(f"r{i}", prompt, params[i])
    finished: dict[str, list[int]] = {}
    run_steps(tp2_replicas, 4, finished)
    for _ in range(2):
        group, _ = fuse(tp2_replicas)
        run_steps([group], 6, finished)
        for out in split(group, tp2_replicas)[0]:
            finished[out.request_id] = out.outputs[0].token_ids
        run_steps(tp2_replicas, 3, finished)
    while any(engine.has_unfinished_requests() for engine in tp2_replicas):
        run_steps(tp2_replicas, 1, finished)
    assert [finished[f"r{i}"] for i in range(len(PROMPTS))] == expected
    for engine in tp2_replicas:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    assert [engine.executor.call(0, DeviceCalls.weight_digests) for engine in tp2_replicas] == weights_before


def test_a_server_of_tensor_parallel_replicas_serves_through_drops_and_restores(llama_dir: Path) -> None:
    expected = [out.text for out in generate(llama_dir)]
    server = RunningServer(llama_dir, ServerConfig(num_replicas=2, coordinator=CoordinatorConfig("recompute")),
                           num_kv_blocks=64, max_num_batched_tokens=64, worker_threads=1, tensor_parallel_size=2)
    got: dict[int, str] = {}

    def send(i: int) -> None:
        body = {"prompt": PROMPTS[i], "max_tokens": GREEDY.max_tokens, "temperature": 0, "ignore_eos": True}
        got[i] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]

    try:
        senders = [threading.Thread(target=send, args=(i,)) for i in range(len(PROMPTS))]
        for sender in senders:
            sender.start()
            time.sleep(0.05)  # a steady stream, some requests arriving while the replicas are a group
        kinds = [httpx.post(f"{server.url}/v1/cluster/{kind}", json={}, timeout=120).json()["kind"]
                 for kind in ("drop", "restore")]
        for sender in senders:
            sender.join()
    finally:
        server.stop()
    assert kinds == ["drop", "restore"]
    assert [got[i] for i in range(len(PROMPTS))] == expected
