"""The KV demand to come (kunserve/cluster/demand.py): running requests are expected to reach
the mean length of the recently finished ones longer than they are now, never beyond their
max_tokens; the forecast is the peak of the sum as requests end one after another."""

from __future__ import annotations

import numpy as np

from kunserve import EngineConfig
from kunserve.bench.in_process import request_params
from kunserve.cluster.demand import OutputLengths, forecast
from kunserve.sim.cluster import SimulatedCluster

BLOCK_SIZE = 16


class FinishedLengths:
    """Stands in for an engine's record of finished requests' output lengths."""

    def __init__(self, lengths: list[int]) -> None:
        self.recent_output_lens = list(lengths)
        self.num_recent_outputs = len(lengths)


def history(lengths: list[int]) -> OutputLengths:
    known = OutputLengths()
    known.collect([FinishedLengths(lengths)])  # type: ignore[list-item]
    return known


def test_a_request_is_expected_to_reach_the_mean_of_the_longer_finished_ones() -> None:
    known = history([100, 1000, 3000])
    assert known.expected_final(np.array([0, 500, 2000])).tolist() == [1367, 2000, 3000]


def test_a_request_longer_than_any_finished_one_is_expected_to_end_now() -> None:
    assert history([100, 200]).expected_final(np.array([500])).tolist() == [500]


def test_lengths_are_taken_once_from_each_engine() -> None:
    engine = FinishedLengths([10, 20])
    known = OutputLengths()
    known.collect([engine])  # type: ignore[list-item]
    engine.recent_output_lens.append(30)
    engine.num_recent_outputs += 1
    known.collect([engine])  # type: ignore[list-item]
    assert len(known) == 3


def one_replica_with(requests: list[tuple[int, int]]) -> SimulatedCluster:
    """A simulated replica with (prompt, max_tokens) requests queued."""
    cluster = SimulatedCluster(EngineConfig(model="llama-3-8b", num_kv_blocks=10_000, max_model_len=8192), 1)
    for i, (prompt, max_tokens) in enumerate(requests):
        cluster.engines[0].add_request(f"r{i}", [0] * prompt, request_params(max_tokens))
    return cluster


def test_without_history_the_forecast_is_the_demand_now() -> None:
    engine = one_replica_with([(160, 1000), (320, 1000)]).engines[0]
    demand = forecast(engine, OutputLengths())
    assert demand.peak_blocks == demand.now_blocks == 30 and demand.seqs == 2


def test_the_forecast_peak_is_below_the_sum_of_the_ends_when_requests_end_apart() -> None:
    # Both expected to generate 1600 tokens; the first is capped at 160 by its max_tokens, so
    # it has ended (at 320 tokens) long before the second peaks at 1760.
    engine = one_replica_with([(160, 160), (160, 1600)]).engines[0]
    demand = forecast(engine, history([1600]))
    assert demand.peak_blocks == 1760 // BLOCK_SIZE
    assert demand.peak_blocks < (320 + 1760) // BLOCK_SIZE
