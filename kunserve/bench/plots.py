"""Figures of policy runs (the JSON records of `kunserve bench --launch`): the TTFT CDF of each
policy, and one policy's timeline (KV usage, queue, group mode per replica; transitions
marked). Rendered with matplotlib's Agg backend: files only, no display needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: files only, no display

import matplotlib.pyplot as plt
import numpy as np

from kunserve.bench.report import MS_PER_S
from kunserve.cluster.status import PIPELINE_MODE

FIGURE_DPI = 120
CDF_SIZE_IN = (6.0, 4.0)
TIMELINE_SIZE_IN = (8.0, 7.0)
TRANSITION_STYLES = {"drop": ("tab:red", "--"), "restore": ("tab:green", "--")}
OTHER_TRANSITION_STYLE = ("tab:gray", ":")



def plot_ttft_cdf(runs: list[dict], path: Path) -> None:
    """One curve per run: the fraction of completed requests with TTFT at most x (log x)."""
    fig, ax = plt.subplots(figsize=CDF_SIZE_IN)
    for run in runs:
        ttfts_ms = np.sort([r["ttft_s"] * MS_PER_S for r in run["results"] if r["error"] is None])
        if len(ttfts_ms) == 0:
            continue
        fraction = np.arange(1, len(ttfts_ms) + 1) / len(ttfts_ms)
        ax.step(ttfts_ms, fraction, where="post", label=run["policy"])
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_timeline(run: dict, path: Path) -> None:
    """KV usage, waiting requests and mode of each replica over the replay, with a vertical mark
    at the start of each transition."""
    samples = run["timeline"]
    fig, (kv, queue, mode) = plt.subplots(3, 1, sharex=True, figsize=TIMELINE_SIZE_IN)
    times = [s["t_s"] for s in samples]
    num_replicas = len(samples[0]["replicas"]) if samples else 0
    for i in range(num_replicas):
        replicas = [s["replicas"][i] for s in samples]
        kv.plot(times, [r["kv_usage"] for r in replicas], label=f"replica {i}")
        queue.plot(times, [r["num_waiting"] for r in replicas], label=f"replica {i}")
        mode.step(times, [int(r["mode"] == PIPELINE_MODE) for r in replicas], where="post", label=f"replica {i}")
    kv.set_ylabel("KV usage")
    kv.set_ylim(0.0, 1.05)
    queue.set_ylabel("waiting requests")
    mode.set_ylabel("mode")
    mode.set_yticks([0, 1], ["replica", "pipeline"])
    mode.set_xlabel("time since replay start (s)")
    _mark_transitions((kv, queue, mode), run["transitions"])
    kv.set_title(f"{run['policy']}: a group's members show the group's numbers")
    for ax in (kv, queue, mode):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    _save(fig, path)


def _mark_transitions(axes: tuple[plt.Axes, ...], transitions: list[dict]) -> None:
    labelled: set[str] = set()
    for transition in transitions:
        kind = transition["kind"]
        color, style = TRANSITION_STYLES.get(kind, OTHER_TRANSITION_STYLE)
        for ax in axes:
            label = kind if ax is axes[0] and kind not in labelled else None
            ax.axvline(transition["start_s"], color=color, linestyle=style, label=label)
        labelled.add(kind)


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
