"""The cost model: step shapes, fitting to measured steps, files, and the CPU profiler."""

import json
from pathlib import Path

import numpy as np
import pytest

from kunserve import EngineConfig
from kunserve.bench.profiler import ProfileCase, profile_worker, split_holdout
from kunserve.engine.cost_model import (
    CostModel,
    ProfilePoint,
    StepCoefficients,
    StepShape,
    fit_step_coefficients,
    relative_errors,
    resolve_cost_model,
)
from kunserve.model.presets import resolve_model
from kunserve.worker.worker import build_worker

TRUE = StepCoefficients(step_s=4e-4, layer_s=2e-4, knee_tokens=64, layer_token_s=3e-7, layer_context_s=2e-9,
                        layer_attention_s=1e-11, sample_s=5e-6, layer_prefill_s=1.5e-4)


def synthetic_points(noise: float = 0.0) -> list[ProfilePoint]:
    rng = np.random.default_rng(0)
    points = []
    for layers in (32, 16):
        for batch in (1, 8, 32, 128, 256):
            for context in (256, 2048):
                shape = StepShape(batch, batch * context, 0, batch)
                points.append(ProfilePoint(shape, layers, layers == 32, 0.0))
        for tokens in (128, 512, 2048):
            points.append(ProfilePoint(StepShape.of_chunk(0, tokens, True), layers, layers == 32, 0.0))
    return [ProfilePoint(p.shape, p.layers, p.samples,
                         TRUE.predict(p.shape, p.layers, p.samples) * (1 + noise * rng.standard_normal()))
            for p in points]


def test_a_decode_chunk_reads_its_context_and_samples() -> None:
    assert StepShape.of_chunk(100, 1, True) == StepShape(1, 100, 0, 1)


def test_a_prefill_chunk_counts_its_causal_pairs() -> None:
    # 4 new tokens after 10: each sees the 10 old ones and the new ones up to itself.
    assert StepShape.of_chunk(10, 4, False) == StepShape(4, 0, 4 * 10 + 10, 0)


def test_fit_recovers_the_coefficients_of_exact_data() -> None:
    fitted = fit_step_coefficients(synthetic_points())
    assert fitted.knee_tokens == TRUE.knee_tokens
    assert relative_errors(fitted, synthetic_points()).max() < 1e-6


def test_fit_predicts_held_out_points_of_noisy_data_within_10_percent() -> None:
    fit, held = split_holdout(synthetic_points(noise=0.03), every=4)
    assert relative_errors(fit_step_coefficients(fit), held).mean() < 0.10


def test_fit_keeps_every_coefficient_non_negative() -> None:
    fitted = fit_step_coefficients(synthetic_points(noise=0.2))
    assert min(fitted.step_s, fitted.layer_s, fitted.layer_token_s, fitted.layer_context_s,
               fitted.layer_attention_s, fitted.sample_s) >= 0


def test_fit_refuses_too_few_points() -> None:
    with pytest.raises(ValueError, match="points"):
        fit_step_coefficients(synthetic_points()[:3])


def test_a_saved_cost_model_loads_back_equal(tmp_path: Path) -> None:
    model = CostModel.default(resolve_model("llama-3-8b").spec, "llama-3-8b")
    model.save(tmp_path / "m.json")
    assert CostModel.load(tmp_path / "m.json") == model


def test_a_missing_profile_file_is_a_clear_error(tmp_path: Path) -> None:
    spec = resolve_model("tiny-llama").spec
    with pytest.raises(ValueError, match="cost_profile"):
        resolve_cost_model(str(tmp_path / "absent.json"), spec, "tiny-llama", 2)


def test_without_a_profile_the_default_model_is_used() -> None:
    spec = resolve_model("tiny-llama").spec
    assert resolve_cost_model(None, spec, "tiny-llama", 4).device == "nominal"


def test_default_model_grows_with_work_and_layers() -> None:
    model = CostModel.default(resolve_model("llama-3-8b").spec, "llama-3-8b")
    small, large = StepShape(8, 8 * 512, 0, 8), StepShape(256, 256 * 512, 0, 256)
    assert model.step_time(large, 32) > model.step_time(small, 32) > model.step_time(small, 16)


@pytest.mark.parametrize("preset", ["llama-3-8b", "qwen2.5-7b"])
def test_the_default_estimate_reads_a_layers_gemm_weights_not_its_norms_or_biases(preset: str) -> None:
    spec = resolve_model(preset).spec
    gemm_params = (spec.hidden_size * (spec.q_size + 2 * spec.kv_size) + spec.q_size * spec.hidden_size
                   + 3 * spec.hidden_size * spec.intermediate_size)
    assert CostModel.default(spec, preset, elem_bytes=2).layer_bytes == 2 * gemm_params


def test_two_replicas_fused_decode_their_requests_slower_than_each_replica_alone() -> None:
    model = CostModel.default(resolve_model("llama-3-8b").spec, "llama-3-8b")
    one_replica = StepShape(64, 64 * 1024, 0, 64)
    both = one_replica + one_replica
    assert model.pipeline_cycle_time(both, 32, 2) > model.step_time(one_replica, 32)


def test_the_profiler_measures_one_point_per_case_on_cpu() -> None:
    config = EngineConfig(model="tiny-llama", load_format="dummy", device="cpu", num_kv_blocks=64, enforce_eager=True)
    worker = build_worker(config, resolve_model("tiny-llama"), (0, 2), config.resolve_device())
    cases = [ProfileCase(decodes=4, decode_context=32), ProfileCase(prefill_tokens=48, prefill_context=16)]
    points = profile_worker(worker, cases, config.block_size, repeats=1)
    assert [p.shape for p in points] == [StepShape(4, 128, 0, 4, 32), StepShape.of_chunk(16, 48, True)]
    assert all(p.seconds > 0 and p.layers == 2 and not p.samples for p in points)


def _decode_batch(contexts: list[int]) -> StepShape:
    """A decode-only step's shape from its batch arrays, as the simulator prices it."""
    context_lens = np.asarray(contexts) + 1  # each decode attends its computed tokens and its new one
    return StepShape.of_batch(np.ones(len(contexts), dtype=np.int64), context_lens, len(contexts))


def test_a_decode_batch_knows_its_longest_context() -> None:
    assert _decode_batch([100, 6000, 300]).longest_decode_context == 6000


def test_one_long_decode_costs_more_than_the_same_context_spread_evenly_by_the_fitted_straggler() -> None:
    cost = resolve_cost_model(None, resolve_model("llama-3-8b").spec, "llama-3-8b", 2)
    step = cost.step
    assert step.layer_longest_s > 0 and "layer_longest_s" in cost.notes  # fitted, with its source
    uneven = _decode_batch([5800] + [1000] * 31)
    even = _decode_batch([1150] * 32)
    assert uneven.decode_context == even.decode_context
    splits = step.decode_splits(32)
    straggler = 32 * (step.layer_longest_s * 5800 / splits - step.layer_context_s * 36800)
    assert straggler > 0
    assert cost.step_time(uneven, 32) - cost.step_time(even, 32) == pytest.approx(straggler)


def test_decode_keys_split_into_fewer_slices_as_the_batch_grows() -> None:
    step = StepCoefficients(0, 0, 0, 0, 0, 0, 0, decode_split_width=132, max_decode_splits=32)
    assert [step.decode_splits(n) for n in (1, 4, 5, 8, 33, 64, 65, 256)] == [32, 32, 16, 16, 2, 2, 1, 1]


def test_a_profile_without_the_straggler_loads_and_prices_decodes_by_their_summed_context(tmp_path: Path) -> None:
    old = {"model": "m", "device": "d", "links": {"device": {"bandwidth_bytes_s": 1e9, "latency_s": 0.0}},
           "step": {"step_s": 0.0, "layer_s": 1e-4, "knee_tokens": 64, "layer_token_s": 0.0, "layer_context_s": 1e-9,
                    "layer_attention_s": 0.0, "sample_s": 0.0, "layer_prefill_s": 0.0}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    cost = CostModel.load(path)
    assert cost.step.layer_longest_s == 0
    uneven, even = _decode_batch([5800] + [1000] * 31), _decode_batch([1150] * 32)
    assert cost.step_time(uneven, 32) == pytest.approx(cost.step_time(even, 32))
