"""When a replica forms the step it schedules ahead, measured live: with each `--ahead-slack`
(1: as the step before starts, the old way; smaller: that fraction of the step before its
end, the default 0.25), and without scheduling ahead (`--async-scheduling off`). Each variant
is one `kunserve bench --launch` of the same workload in a fresh process; the table gives
TTFT and TPOT percentiles and throughput. On a GPU (on CPU nothing schedules ahead unless asked).

    python benchmarks/ahead_slack.py --slacks 1 0.25 --out /tmp/ahead_slack.json -- --replicas 1 \\
        --model llama-3-8b --load-format dummy --memory-budget 40 --dataset sharegpt --num-prompts 200 \\
        --request-rate 4 --seed 0

Everything after `--` goes to `kunserve bench --launch` for every variant.
"""

from __future__ import annotations

import argparse
import json
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


def row(name: str, record: dict) -> list[str]:
    summary = record["runs"][0]["summary"]
    ttft, tpot = summary["ttft_ms"], summary["tpot_ms"]
    return [name, str(summary["completed"]), f"{ttft['p50']:.1f}", f"{ttft['p90']:.1f}", f"{ttft['p99']:.1f}",
            f"{tpot['p50']:.2f}", f"{tpot['p99']:.2f}", f"{summary['output_throughput']:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON: every variant's bench record")
    parser.add_argument("--slacks", type=float, nargs="+", default=[1.0, 0.25], help="--ahead-slack values to run")
    parser.add_argument("--no-off", action="store_true", help=f"skip the run with {NOT_AHEAD}")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: arguments of kunserve bench --launch")
    args = parser.parse_args()
    bench_args = [arg for arg in args.bench_args if arg != "--"]
    runs = variants(args.slacks)
    if args.no_off:
        del runs[NOT_AHEAD]
    records = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, extra in runs.items():
            records[name] = run_variant(extra, bench_args, Path(scratch) / f"{len(records)}.json")
    header = ["variant", "completed", "TTFT P50 (ms)", "P90", "P99", "TPOT P50 (ms)", "P99", "out tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row(name, record)) + " |" for name, record in records.items()]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench_args": bench_args, "variants": records}, indent=1))


if __name__ == "__main__":
    main()
