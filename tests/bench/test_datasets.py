"""Synthetic request sets with the paper's length statistics (kunserve/bench/workload.py
DATASETS), and `--dataset` on any arrivals, a trace's included."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from kunserve.bench.run import add_workload_arguments, build_workload
from kunserve.bench.workload import DATASETS, dataset_workload, load_trace

TRACE = Path(__file__).resolve().parents[1] / "data" / "azure_llm_conv_2023_first_45s.csv"
PAPER_MEANS = {"burstgpt": (642, 262), "sharegpt": (1660, 373), "longbench": (5900, 499)}


@pytest.mark.parametrize("name", sorted(PAPER_MEANS))
def test_a_sets_mean_lengths_are_the_papers(name: str) -> None:
    prompts, outputs = DATASETS[name].draw(40_000, seed=0)
    assert prompts.mean() == pytest.approx(PAPER_MEANS[name][0], rel=0.03)
    assert outputs.mean() == pytest.approx(PAPER_MEANS[name][1], rel=0.03)


def test_reasoning_outputs_are_long_and_heavy_tailed() -> None:
    prompts, outputs = DATASETS["reasoning"].draw(40_000, seed=0)
    assert prompts.mean() < 300 and outputs.min() >= 1024 and outputs.max() <= 7168
    assert outputs.mean() == pytest.approx(2400, rel=0.05) and np.median(outputs) < outputs.mean()


def test_a_dataset_on_a_traces_arrivals_keeps_the_arrivals() -> None:
    parser = argparse.ArgumentParser()
    add_workload_arguments(parser)
    args = parser.parse_args(["--trace", str(TRACE), "--dataset", "sharegpt"])
    specs = build_workload(args)
    assert [s.arrival_s for s in specs] == [s.arrival_s for s in load_trace(TRACE)]
    assert np.mean([s.prompt_len for s in specs]) > 1000


def test_an_unknown_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="dataset"):
        dataset_workload("nope", np.zeros(3), seed=0)
