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

from benchmarks.report import markdown_table, priced

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
            elif workload["name"] != "scheduler_overhead":
                # Every workload but the overhead one needs requests.
                assert row["requests"] >= 1, where
        feste_row = next(row for row in workload["rows"] if row["kind"] == "feste")
        assert feste_row["status"] == "ok"
        if feste_row["requests"]:
            # What the answers billed, priced at the list prices: every model is priced.
            tokens, dollars = priced(feste_row["billed"])
            assert tokens > 0 and dollars is not None and dollars > 0, workload["name"]
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
    ]
    for contenders in declared.values():
        assert contenders[0] == "feste"
        assert len(contenders) >= 3


def test_the_report_prices_what_the_servers_billed() -> None:
    billed = {
        "openai": {
            "gpt-4o-mini": {"prompt_tokens": 1000, "completion_tokens": 500, "search_units": 0},
            "text-embedding-3-small": {"prompt_tokens": 4000, "completion_tokens": 0},
        },
        "cohere": {"rerank-v3.5": {"prompt_tokens": 0, "completion_tokens": 0, "search_units": 2}},
    }
    tokens, dollars = priced(billed)
    assert tokens == 5500
    assert dollars == pytest.approx((1000 * 0.15 + 500 * 0.60 + 4000 * 0.02) / 1e6 + 2 * 0.002)
    assert priced({"openai": {"my-model": {"prompt_tokens": 1}}}) == (1, None)

    row = {
        "contender": "feste",
        "kind": "feste",
        "status": "ok",
        "makespan_s": 1.0,
        "requests": 3,
        "peak_rss_mib": 10.0,
        "rss_growth_mib": 1.0,
        "scale": 2.0,  # ran on half the inputs: billing doubles like the makespan
        "inputs_run": 5,
        "billed": billed,
    }
    report = {
        "mode": "quick",
        "started": "now",
        "repeat": 1,
        "environment": {
            "versions": {},
            "cpu_count": 2,
            "python": "3.11",
            "platform": "linux",
            "feste_default_scheduler": "async",
        },
        "workloads": [
            {
                "name": "w",
                "n": 10,
                "per_item": False,
                "ideal": {"seconds": 1.0, "formula": "f", "requests": 3},
                "rows": [row],
            }
        ],
    }
    table = markdown_table(report)
    assert "| Requests | Tokens | Dollars |" in table
    assert f"| 3 (for 5 inputs) | 11000 | ${dollars * 2:.6f} |" in table
