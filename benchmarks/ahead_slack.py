"""When a replica forms the step it schedules ahead, measured live: with each `--ahead-slack`
(1: as the step before starts, the old way; smaller: that fraction of the step before its
end, the default 0.25), and without scheduling ahead (`--async-scheduling off`). Each variant
is one `kunserve bench --launch` of the same workload in a fresh process, `--repeats` rounds of
all variants in turn (run to run a variant's P50 TTFT moves by milliseconds); the table gives
each figure's median over the rounds, with the range when there are several. On a GPU (on CPU
nothing schedules ahead unless asked).

    python benchmarks/ahead_slack.py --slacks 1 0.25 --out /tmp/ahead_slack.json -- --replicas 1 \\
        --model llama-3-8b --load-format dummy --memory-budget 40 --dataset sharegpt --num-prompts 200 \\
        --request-rate 4 --seed 0

Everything after `--` goes to `kunserve bench --launch` for every variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

NOT_AHEAD = "no scheduling ahead"


def variants(slacks: list[float]) -> dict[str, list[str]]:
    """Each variant's name and its extra arguments of `kunserve bench`."""
    named = {f"ahead, slack {slack:g}": ["--async-scheduling", "on", "--ahead-slack", str(slack)] for slack in slacks}
    return {**named, NOT_AHEAD: ["--async-scheduling", "off"]}


def run_variant(extra: list[str], bench_args: list[str], out: Path) -> dict:
    """One `kunserve bench --launch` run; its record."""
    command = [sys.executable, "-m", "kunserve", "bench", "--launch", "--no-progress", *bench_args, *extra,
               "--out", str(out)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


# (column, how to read it from a run's summary, digits)
COLUMNS = [
    ("completed", lambda s: s["completed"], 0), ("TTFT P50 (ms)", lambda s: s["ttft_ms"]["p50"], 1),
    ("P90", lambda s: s["ttft_ms"]["p90"], 1), ("P99", lambda s: s["ttft_ms"]["p99"], 1),
    # Arrival to first scheduled: what the forming time moves directly (TTFT also holds the
    # prompt step's launch and compute, which vary more from run to run than the step saved).
    ("queue P50 (ms)", lambda s: s["queue_ms"]["p50"], 1),
    ("TPOT P50 (ms)", lambda s: s["tpot_ms"]["p50"], 2), ("P99", lambda s: s["tpot_ms"]["p99"], 2),
    ("out tok/s", lambda s: s["output_throughput"], 0),
]


def row(name: str, records: list[dict]) -> list[str]:
    """The variant's median of each column over its runs, [min-max] with several."""
    summaries = [record["runs"][0]["summary"] for record in records]
    cells = [name]
    for _, read, digits in COLUMNS:
        values = sorted(read(summary) for summary in summaries)
        cell = f"{statistics.median(values):.{digits}f}"
        if len(values) > 1:
            cell += f" [{values[0]:.{digits}f}-{values[-1]:.{digits}f}]"
        cells.append(cell)
    return cells


def write(out: Path, bench_args: list[str], records: dict[str, list[dict]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench_args": bench_args, "variants": records}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON: every variant's bench records, one per round")
    parser.add_argument("--slacks", type=float, nargs="+", default=[1.0, 0.25], help="--ahead-slack values to run")
    parser.add_argument("--no-off", action="store_true", help=f"skip the run with {NOT_AHEAD}")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all variants, each in turn")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: arguments of kunserve bench --launch")
    args = parser.parse_args()
    bench_args = [arg for arg in args.bench_args if arg != "--"]
    runs = variants(args.slacks)
    if args.no_off:
        del runs[NOT_AHEAD]
    records: dict[str, list[dict]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.repeats):
            for index, (name, extra) in enumerate(runs.items()):
                records[name].append(run_variant(extra, bench_args, Path(scratch) / f"{round_index}_{index}.json"))
            write(args.out, bench_args, records)  # each round kept, should a later one not finish
    header = ["variant", *(column for column, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row(name, record)) + " |" for name, record in records.items()]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
