"""How much decode throughput a drop may give up (`--min-drop-gain`), on a load sweep of
benchmarks/paper.py: kunserve rerun at each load with each floor, beside the baselines that
paper.py recorded. Simulated (kunserve/sim/), on the sweep's setup, workload and calibrated
rate scale as its paper.json gives them; the floor paper.py ran with (the coordinator's
default) is taken from that JSON, not rerun.

    python benchmarks/drop_gain.py docs/results/paper/full/sweep/paper.json --gains 1.0 --jobs 2 \\
        --out docs/results/paper/full/drop_gain.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import paper

from kunserve.cluster.config import CoordinatorConfig

DEFAULT_GAIN = CoordinatorConfig().min_drop_gain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paper_json", type=Path, help="a paper.py paper.json with the sweep figure")
    parser.add_argument("--gains", type=float, nargs="+", required=True, help="floors to run besides the default")
    parser.add_argument("--jobs", type=int, default=1, help="processes for the runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    paper.configure_logging()
    recorded = json.loads(args.paper_json.read_text())
    if "sweep" not in recorded["figures"]:
        raise SystemExit(f"{args.paper_json}: no sweep figure (run paper.py with --figures sweep)")
    sweep = recorded["figures"]["sweep"]
    setup, workload = paper.Setup(**sweep["setup"]), paper.Workload(**sweep["workload"])
    profiles = paper.derived_profiles(args.out.parent)
    gains = [gain for gain in args.gains if gain != DEFAULT_GAIN]
    runs = [paper.Run(setup, workload, point["rate_scale"], paper.KUNSERVE, profiles.get(setup.model),
                      {"min_drop_gain": gain}) for point in sweep["points"] for gain in gains]
    paper.start_pool(args.jobs)
    records = iter(paper.run_all(runs))
    rows = []
    for point in sweep["points"]:
        baselines = [run for run in point["runs"] if run["policy"] not in paper.OURS]
        best = min(baselines, key=lambda run: run["ttft_ms"]["p99"])
        ours = {DEFAULT_GAIN: next(run for run in point["runs"] if run["policy"] == paper.KUNSERVE)}
        ours.update({gain: paper.summarize(next(records), workload.duration_s) for gain in gains})
        for gain, run in sorted(ours.items()):
            rows.append({"load": point["load"], "min_drop_gain": gain, "run": run, "best_baseline": best["policy"],
                         "best_baseline_p99_ttft_ms": best["ttft_ms"]["p99"],
                         "best_baseline_out_tok_s": max(b["output_tok_s"] for b in baselines)})
    header = ["load", "min drop gain", "P99 TTFT", "P50 TTFT", "P50 TPOT", "out tok/s", "transitions",
              "best baseline P99 (policy)", "vs best", "best baseline tok/s"]
    table = paper.table(header, [[
        f"{row['load']:g}x", f"{row['min_drop_gain']:g}", paper.ms_text(row["run"]["ttft_ms"]["p99"]),
        paper.ms_text(row["run"]["ttft_ms"]["p50"]), paper.ms_text(row["run"]["tpot_ms"]["p50"]),
        f"{row['run']['output_tok_s']:.0f}", ", ".join(f"{k} {v}" for k, v in row["run"]["transitions"].items()) or "-",
        f"{paper.ms_text(row['best_baseline_p99_ttft_ms'])} ({row['best_baseline']})",
        f"{row['best_baseline_p99_ttft_ms'] / row['run']['ttft_ms']['p99']:.2f}x",
        f"{row['best_baseline_out_tok_s']:.0f}"] for row in rows])
    print(f"{setup.label} / {workload.name} (simulated)\n\n{table}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"paper_json": str(args.paper_json), "setup": sweep["setup"],
                                    "workload": sweep["workload"], "rows": rows}, indent=1))
    paper.stop_pool()


if __name__ == "__main__":
    main()
