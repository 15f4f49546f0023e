"""Rotary frequencies equal transformers' for every rope type kunserve accepts."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kunserve.arch.spec import RopeSpec
from kunserve.model.rotary import inverse_frequencies

HEAD_DIM = 64


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
)
def test_inverse_frequencies_match_transformers(params: dict) -> None:
    config = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, rope_parameters=params)
    expected, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    rope = RopeSpec(
        theta=params["rope_theta"],
        kind=params["rope_type"],
        factor=params["factor"],
        low_freq_factor=params.get("low_freq_factor", 1.0),
        high_freq_factor=params.get("high_freq_factor", 4.0),
        original_max_position_embeddings=params.get("original_max_position_embeddings", 8192),
    )
    torch.testing.assert_close(inverse_frequencies(rope, HEAD_DIM), expected.float())


def test_default_inverse_frequencies() -> None:
    inv = inverse_frequencies(RopeSpec(theta=10000.0), HEAD_DIM)
    assert inv[0] == 1.0
    torch.testing.assert_close(inv[1], torch.tensor(10000.0 ** (-2 / HEAD_DIM)))
