"""A short soak (kunserve/bench/soak.py; benchmarks/soak.py runs the long one): greedy requests
through the HTTP server while an operator drops and restores two replicas back to back and
every seventh client disconnects mid-stream.

Specified: every request is answered, none with an error, and every greedy answer has the text
of an uninterrupted run; every transition asked for is carried out; once the load is gone no
block is left in use (an aborted request that moved between engines frees its blocks)."""

from __future__ import annotations

from pathlib import Path

from server_harness import MAX_MODEL_LEN

from kunserve import EngineConfig
from kunserve.bench.soak import SoakSettings, run_soak

REQUESTS = 480
TRANSITION_EVERY = 16  # 30 transitions


def test_a_short_soak_loses_no_request_changes_no_token_and_leaks_no_block(llama_dir: Path) -> None:
    config = EngineConfig(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=64,
                          num_kv_blocks=48, worker_threads=1)
    settings = SoakSettings(requests=REQUESTS, concurrency=8, transition_every=TRANSITION_EVERY, max_tokens=12)
    report = run_soak(config, settings)
    print(report.table(), *report.errors, sep="\n")
    assert (report.tried, report.answered, report.ok) == (REQUESTS, REQUESTS, REQUESTS)
    assert report.client_errors == report.server_errors == report.lost == report.mismatched == 0
    assert report.disconnected == REQUESTS // settings.disconnect_every
    assert report.transitions >= REQUESTS // TRANSITION_EVERY - 1 and report.transitions_refused == 0
    assert report.blocks_in_use_after == 0
