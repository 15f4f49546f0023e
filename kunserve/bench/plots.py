"""Figures of policy runs (the JSON records of `kunserve bench --launch` and `kunserve
simulate`): the TTFT CDF of each policy, and one policy's timeline (KV usage, queue, group
mode; transitions marked). A few replicas get a line each; a larger cluster is drawn as a
whole (mean and range of KV usage, total queue, replicas in groups), which a legend of
dozens of lines would only cover. Rendered with matplotlib's Agg backend: files only."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: files only, no display

import matplotlib.pyplot as plt
import numpy as np

from kunserve.bench.report import MS_PER_S
from kunserve.bench.timeline import waiting_in
from kunserve.cluster.status import PIPELINE_MODE

FIGURE_DPI = 120
CDF_SIZE_IN = (6.0, 4.0)
TIMELINE_SIZE_IN = (9.0, 7.0)
MAX_REPLICA_LINES = 8  # more replicas than this: the timeline shows the cluster as a whole
QUEUE_COLOR, MODE_COLOR = "tab:purple", "tab:brown"
RANGE_ALPHA = 0.25  # the band of KV usage between the least and the most used replica
TRANSITION_STYLES = {"drop": ("tab:red", "--"), "restore": ("tab:green", "--")}
OTHER_TRANSITION_STYLE = ("tab:gray", ":")
TRANSITION_ALPHA = 0.6


def plot_ttft_cdf(runs: list[dict], path: Path) -> None:
    """One curve per run: the fraction of completed requests with TTFT at most x (log x)."""
    fig, ax = plt.subplots(figsize=CDF_SIZE_IN, layout="constrained")
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
    ax.legend(loc="lower right")
    _save(fig, path)


def plot_timeline(run: dict, path: Path) -> None:
    """KV usage, waiting requests and mode over the replay, per replica or for the whole
    cluster, with a vertical mark at the start of each transition; the legend sits outside
    the plots, on the right."""
    samples = run["timeline"]
    fig, (kv, queue, mode) = plt.subplots(3, 1, sharex=True, figsize=TIMELINE_SIZE_IN, layout="constrained")
    num_replicas = len(samples[0]["replicas"]) if samples else 0
    if num_replicas <= MAX_REPLICA_LINES:
        _per_replica(samples, num_replicas, kv, queue, mode)
    else:
        _whole_cluster(samples, num_replicas, kv, queue, mode)
    kv.set_ylabel("KV usage")
    kv.set_ylim(0.0, 1.05)
    queue.set_ylabel("waiting requests")
    mode.set_xlabel("time since replay start (s)")
    _mark_transitions((kv, queue, mode), run["transitions"])
    kv.set_title(f"{run['policy']}: a group's members show the group's numbers")
    for ax in (kv, queue, mode):
        ax.grid(True, alpha=0.3)
    fig.legend(*_unique_legend(fig), loc="outside right upper", fontsize="small")
    _save(fig, path)


def _per_replica(samples: list[dict], num_replicas: int, kv: plt.Axes, queue: plt.Axes, mode: plt.Axes) -> None:
    times = [s["t_s"] for s in samples]
    for i in range(num_replicas):
        replicas = [s["replicas"][i] for s in samples]
        line = kv.plot(times, [r["kv_usage"] for r in replicas], label=f"replica {i}")[0]
        queue.plot(times, [r["num_waiting"] for r in replicas], color=line.get_color())
        mode.step(times, [int(r["mode"] == PIPELINE_MODE) for r in replicas], where="post", color=line.get_color())
    mode.set_ylabel("mode")
    mode.set_yticks([0, 1], ["replica", "pipeline"])


def _whole_cluster(samples: list[dict], num_replicas: int, kv: plt.Axes, queue: plt.Axes, mode: plt.Axes) -> None:
    times = [s["t_s"] for s in samples]
    usage = np.array([[r["kv_usage"] for r in s["replicas"]] for s in samples])
    kv.plot(times, usage.mean(axis=1), label="mean of the replicas")
    kv.fill_between(times, usage.min(axis=1), usage.max(axis=1), alpha=RANGE_ALPHA, label="least to most used")
    queue.plot(times, [waiting_in(s) for s in samples], color=QUEUE_COLOR, label="waiting, whole cluster")
    mode.step(times, [sum(r["mode"] == PIPELINE_MODE for r in s["replicas"]) for s in samples], where="post",
              color=MODE_COLOR, label="replicas in groups")
    mode.set_ylabel(f"in groups (of {num_replicas})")
    mode.set_ylim(0, num_replicas)


def _mark_transitions(axes: tuple[plt.Axes, ...], transitions: list[dict]) -> None:
    for transition in transitions:
        kind = transition["kind"]
        color, style = TRANSITION_STYLES.get(kind, OTHER_TRANSITION_STYLE)
        for ax in axes:
            ax.axvline(transition["start_s"], color=color, linestyle=style, alpha=TRANSITION_ALPHA, label=kind)


def _unique_legend(fig: plt.Figure) -> tuple[list, list[str]]:
    """Each label of the figure's axes once (every transition of a kind has the same label)."""
    handles: dict[str, object] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    return list(handles.values()), list(handles)


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
