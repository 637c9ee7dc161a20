"""Smoke test of ``python -m benchmarks``: every workload runs, every contender reports.

No timing is asserted (speed is what the benchmark reports, not what it tests); what
is checked is that each row either ran and returned every answer right, or says why
it was skipped, and that the server counted the requests the workload implies.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_benchmarks(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def declared_workloads() -> dict[str, list[str]]:
    """Workload name -> contender names, as ``python -m benchmarks --list`` prints them."""
    listing = run_benchmarks("--list", timeout=60)
    assert listing.returncode == 0, listing.stderr
    workloads: dict[str, list[str]] = {}
    current = ""
    for line in listing.stdout.splitlines():
        if line.startswith("    "):
            workloads[current].append(line.strip())
        elif line.strip():
            current = line.split(":")[0]
            workloads[current] = []
    return workloads


@pytest.mark.slow
def test_quick_run_reports_every_workload_and_contender(tmp_path: Path) -> None:
    result = run_benchmarks("--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((tmp_path / "latest.json").read_text())
    assert report["mode"] == "quick"
    declared = declared_workloads()
    assert [w["name"] for w in report["workloads"]] == list(declared)
    assert {
        "fanout",
        "embed_batching",
        "pipeline",
        "scheduler_overhead",
        "faults",
        "warm_rerun",
        "local_embed",
    } <= set(declared)

    for workload in report["workloads"]:
        assert [row["contender"] for row in workload["rows"]] == declared[workload["name"]]
        assert workload["ideal"]["formula"]
        for row in workload["rows"]:
            where = (workload["name"], row["contender"], row.get("note"))
            if row["status"] == "skipped":
                # Only a peer whose library is missing may be skipped.
                missing = row["note"].removeprefix("not installed: ").split(", ")
                assert all(importlib.util.find_spec(name) is None for name in missing), where
                continue
            assert row["status"] == "ok", where
            assert row["correct"] is True
            assert row["makespan_s"] > 0
            assert row["peak_rss_mib"] > 0
            if "warm re-run" in row["note"]:
                # A re-run with the cache filled sends nothing.
                assert row["requests"] == 0, where
            elif workload["name"] in ("scheduler_overhead", "local_embed"):
                # No I/O, or a model in the process: the servers see nothing.
                assert row["requests"] == 0, where
            else:
                assert row["requests"] >= 1, where
        feste_row = next(row for row in workload["rows"] if row["kind"] == "feste")
        if feste_row["status"] == "skipped":
            # Only where the local extra is not installed (CI installs it).
            assert workload["name"] == "local_embed", feste_row
            continue
        assert feste_row["status"] == "ok"
        if workload["name"] in ("fanout", "embed_batching", "pipeline"):
            # No faults here: feste sends exactly the requests of the ideal plan.
            assert feste_row["requests"] == workload["ideal"]["requests"], workload["name"]

    table = (tmp_path / "latest.md").read_text()
    for workload in report["workloads"]:
        assert f"**{workload['name']}**" in table
    assert (tmp_path / "latest.png").stat().st_size > 0

    # The saved JSON renders again without running anything.
    rendered = tmp_path / "rendered"
    again = run_benchmarks("--render", str(tmp_path / "latest.json"), "--out", str(rendered))
    assert again.returncode == 0, again.stderr
    assert (rendered / "latest.md").read_text() == table


def test_unknown_workload_is_refused_with_the_valid_names() -> None:
    result = run_benchmarks("--only", "fanout,nope", timeout=60)
    assert result.returncode == 2
    assert "unknown workload(s) nope" in result.stderr
    assert "fanout" in result.stderr


def test_list_names_every_workload_and_its_contenders() -> None:
    declared = declared_workloads()
    assert list(declared) == [
        "fanout",
        "embed_batching",
        "pipeline",
        "scheduler_overhead",
        "faults",
        "warm_rerun",
        "local_embed",
    ]
    for contenders in declared.values():
        assert contenders[0] == "feste"
        assert len(contenders) >= 3
