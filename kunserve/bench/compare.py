"""Overload policies side by side: one Markdown table row per policy run, and how much lower
kunserve's P99 TTFT is than the best baseline's.

A run is the JSON record `kunserve bench --launch` writes per policy (`policy`, `summary`,
`transitions`, ...), so a table can be rebuilt from a saved results.json. Transitions are
counted per kind as the coordinator names them: drops and restores have their own columns,
any other kind (a migration, say) is listed in the last.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from kunserve.bench.in_process import ITL_NOT_MEASURED
from kunserve.bench.report import PERCENT

KUNSERVE_POLICY = "kunserve"  # the policy the others are baselines to
DROP = "drop"
RESTORE = "restore"
COLUMNS = (
    "policy", "completed", "failed", "TTFT P50 (ms)", "TTFT P99 (ms)", "TPOT P50 (ms)", "TPOT P99 (ms)",
    "E2E P99 (ms)", "output tok/s", "SLO attainment (%)", "SLO TTFT / TPOT (ms)", "preemptions",
    "drops (mean s)", "restores (mean s)", "other transitions (mean s)",
)  # fmt: skip


def transition_stats(transitions: list[dict]) -> dict[str, dict]:
    """{kind: {"count", "mean_duration_s"}} in the order kinds first occur."""
    durations: dict[str, list[float]] = defaultdict(list)
    for transition in transitions:
        durations[transition["kind"]].append(transition["duration_s"])
    return {kind: {"count": len(d), "mean_duration_s": float(np.mean(d))} for kind, d in durations.items()}


def is_baseline(policy: str) -> bool:
    """Every policy but kunserve and its variants (kunserve-swap)."""
    return not policy.startswith(KUNSERVE_POLICY)


def ttft_p99_ratio(runs: list[dict]) -> dict | None:
    """The best baseline's (lowest) P99 TTFT over kunserve's, when kunserve and a baseline both
    have one: {"baseline", "baseline_p99_ms", "kunserve_p99_ms", "ratio"}."""
    p99 = {run["policy"]: run["summary"]["ttft_ms"]["p99"] for run in runs}
    ours = p99.get(KUNSERVE_POLICY)
    baselines = {policy: value for policy, value in p99.items() if is_baseline(policy) and value is not None}
    if ours is None or not baselines or ours <= 0:
        return None
    best = min(baselines, key=baselines.__getitem__)
    return {"baseline": best, "baseline_p99_ms": baselines[best], "kunserve_p99_ms": ours,
            "ratio": baselines[best] / ours}


def comparison_table(runs: list[dict]) -> str:
    """The Markdown table, the P99 TTFT ratio line when there is one, and a note on ITL."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * len(COLUMNS)) + "|"]
    lines += ["| " + " | ".join(_row(run)) + " |" for run in runs]
    ratio = ttft_p99_ratio(runs)
    if ratio is not None:
        lines += ["", (f"P99 TTFT, best baseline ({ratio['baseline']}) / {KUNSERVE_POLICY}: {ratio['ratio']:.2f}x "
                       f"({_ms(ratio['baseline_p99_ms'])} ms / {_ms(ratio['kunserve_p99_ms'])} ms)")]
    lines += ["", f"ITL: {ITL_NOT_MEASURED}."]
    return "\n".join(lines)


def transition_lines(run: dict) -> list[str]:
    """One line per transition of a run (or one saying there was none)."""
    if not run["transitions"]:
        return [f"{run['policy']}: no transitions"]
    return [
        f"{run['policy']}: {t['kind']} of replicas {t['members']} at {t['start_s']:.2f} s, "
        f"took {t['duration_s']:.3f} s (exchange {t['exchange_s']:.3f} s): {t['reason']}"
        for t in run["transitions"]
    ]


def _row(run: dict) -> list[str]:
    summary = run["summary"]
    kinds = transition_stats(run["transitions"])
    others = [f"{kind}: {_kind_cell(stats)}" for kind, stats in kinds.items() if kind not in (DROP, RESTORE)]
    attainment = summary["slo_attainment"]
    return [
        run["policy"],
        str(summary["completed"]),
        str(summary["failed"]),
        _ms(summary["ttft_ms"]["p50"]),
        _ms(summary["ttft_ms"]["p99"]),
        _ms(summary["tpot_ms"]["p50"]),
        _ms(summary["tpot_ms"]["p99"]),
        _ms(summary["e2e_ms"]["p99"]),
        _ms(summary["output_throughput"]),
        "-" if attainment is None else f"{attainment * PERCENT:.1f}",
        f"{_ms(summary['slo_ttft_ms'])} / {_ms(summary['slo_tpot_ms'])}",
        _preemptions_cell(summary),
        _kind_cell(kinds.get(DROP)),
        _kind_cell(kinds.get(RESTORE)),
        ", ".join(others) or "-",
    ]


def _preemptions_cell(summary: dict) -> str:
    """Preemptions, with how many swapped out where some did."""
    swapped = summary["swap_outs"]
    return f"{summary['preemptions']} ({swapped} swapped)" if swapped else str(summary["preemptions"])


def _kind_cell(stats: dict | None) -> str:
    if stats is None:
        return "0"
    return f"{stats['count']} ({stats['mean_duration_s']:.3f})"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
