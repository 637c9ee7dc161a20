"""``python -m benchmarks``: run the benchmarks and write the report.

    python -m benchmarks                  # full run -> benchmarks/results/latest.*
    python -m benchmarks --quick          # smoke run: every workload, small sizes, 1 run
    python -m benchmarks --only fanout --repeat 5 --out /tmp/bench
    python -m benchmarks --only fanout --contender feste --contender aiohttp
    python -m benchmarks --only fanout --profile   # cProfile each run, print top functions
    python -m benchmarks --list           # the workloads and their contenders
    python -m benchmarks --render benchmarks/results/latest.json  # redo .md and .png

A quick run, a run of some workloads or contenders only, or a profiled run writes to
``benchmarks/results/scratch/`` unless ``--out`` says otherwise, so it never replaces
the full run's results. ``--profile`` writes one cProfile file per contender run to
``OUT/profiles/`` (open with ``python -m pstats`` or snakeviz) and prints the median
run's top functions by own time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from benchmarks.harness import run_benchmarks
from benchmarks.report import markdown_table, write_report
from benchmarks.workloads import load_workloads

RESULTS = Path(__file__).resolve().parent / "results"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure feste against its peers and against the ideal.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: small sizes, one run per row"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="WORKLOAD",
        help="run only this workload (repeat the option or separate names with commas)",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per row, median reported (default 3)"
    )
    parser.add_argument(
        "--contender",
        action="append",
        metavar="TEXT",
        help="run only the contenders whose name contains TEXT (repeat the option for more)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile every timed run with cProfile (OUT/profiles/*.pstats), print top functions",
    )
    parser.add_argument("--out", type=Path, default=None, help="directory for latest.*")
    parser.add_argument("--list", action="store_true", help="list workloads and exit")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="rewrite .md and .png from a saved report"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    workloads = load_workloads()
    if arguments.list:
        for workload in workloads:
            print(f"{workload.name}: {workload.title}")
            for contender in workload.contenders:
                print(f"    {contender.name}")
        return 0
    if arguments.render is not None:
        report = json.loads(arguments.render.read_text())
        out_dir = arguments.out or arguments.render.parent
        for path in write_report(report, out_dir, stem=arguments.render.stem):
            print(f"wrote {path}")
        return 0
    if arguments.only:
        wanted = [name.strip() for value in arguments.only for name in value.split(",")]
        known = {workload.name for workload in workloads}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            print(
                f"unknown workload(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}",
                file=sys.stderr,
            )
            return 2
        workloads = [workload for workload in workloads if workload.name in wanted]
    if arguments.contender:
        workloads = [
            dataclasses.replace(
                workload,
                contenders=tuple(
                    contender
                    for contender in workload.contenders
                    if any(text in contender.name for text in arguments.contender)
                ),
            )
            for workload in workloads
        ]
        if not any(workload.contenders for workload in workloads):
            print(f"no contender matches {', '.join(arguments.contender)}", file=sys.stderr)
            return 2
        workloads = [workload for workload in workloads if workload.contenders]
    repeat = arguments.repeat or (1 if arguments.quick else 3)
    if repeat < 1:
        print(f"--repeat must be at least 1, got {repeat}", file=sys.stderr)
        return 2
    out_dir = arguments.out
    if out_dir is None:
        partial = arguments.quick or arguments.only or arguments.contender or arguments.profile
        out_dir = RESULTS / "scratch" if partial else RESULTS
    profile_dir = out_dir / "profiles" if arguments.profile else None
    report = run_benchmarks(
        workloads, quick=arguments.quick, repeat=repeat, profile_dir=profile_dir
    )
    print()
    print(markdown_table(report))
    for path in write_report(report, out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
