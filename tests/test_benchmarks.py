"""Smoke test of ``python -m benchmarks``: every workload runs, every contender reports.

No timing is asserted (speed is what the benchmark reports, not what it tests); what
is checked is that each row either ran and returned every answer right, or says why
it was skipped, and that the server counted the requests the workload implies.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import _server_knobs
from benchmarks.report import markdown_table, priced
from benchmarks.workloads import overload, random_429, staggered

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
# Every workload in one quick run, then a render: the subprocess's own 300 s bound
# applies, not the suite's 120 s per test (a loaded machine needs more than 120).
@pytest.mark.timeout(400)
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
        "random_429",
        "overload",
        "staggered",
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
        if feste_row["requests"]:
            # What the answers billed, priced at the list prices: every model is priced.
            tokens, dollars = priced(feste_row["billed"])
            assert tokens > 0 and dollars is not None and dollars > 0, workload["name"]
        if workload["name"] in ("fanout", "embed_batching"):
            # No faults here: feste sends exactly the requests of the ideal plan.
            assert feste_row["requests"] == workload["ideal"]["requests"], workload["name"]
        if workload["name"] == "pipeline":
            # The embeddings of answers are batched as the answers arrive: a few more
            # requests than one batch per 2,048 at the very end, never one per call.
            ideal = workload["ideal"]["requests"]
            assert ideal <= feste_row["requests"] <= ideal * 1.1

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
        "random_429",
        "overload",
        "staggered",
        "warm_rerun",
        "batch_cost",
        "cluster",
        "dataframe",
        "local_embed",
    ]
    for contenders in declared.values():
        assert contenders[0] == "feste"
        assert len(contenders) >= 3


def test_a_contender_filter_that_matches_nothing_is_refused() -> None:
    result = run_benchmarks("--only", "fanout", "--contender", "nobody", timeout=60)
    assert result.returncode == 2
    assert "no contender matches nobody" in result.stderr


@pytest.mark.slow
def test_profile_writes_one_file_per_run_and_reports_top_functions(tmp_path: Path) -> None:
    result = run_benchmarks(
        "--quick", "--only", "fanout", "--contender", "feste", "--contender", "aiohttp",
        "--repeat", "2", "--profile", "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    assert report["profiled"] is True
    (fanout,) = report["workloads"]
    rows = {row["contender"]: row for row in fanout["rows"]}
    assert list(rows) == ["feste", "asyncio.gather + semaphore (aiohttp)"]
    files = sorted(path.name for path in (tmp_path / "profiles").iterdir())
    assert files == [
        "fanout--asyncio-gather-semaphore-aiohttp--run1.pstats",
        "fanout--asyncio-gather-semaphore-aiohttp--run2.pstats",
        "fanout--feste--run1.pstats",
        "fanout--feste--run2.pstats",
    ]
    # The runs go in rounds (benchmarks/README.md): each contender once, then again.
    written = sorted((tmp_path / "profiles").iterdir(), key=lambda path: path.stat().st_mtime_ns)
    assert [path.name for path in written] == [
        "fanout--feste--run1.pstats",
        "fanout--asyncio-gather-semaphore-aiohttp--run1.pstats",
        "fanout--feste--run2.pstats",
        "fanout--asyncio-gather-semaphore-aiohttp--run2.pstats",
    ]
    for row in rows.values():
        assert row["status"] == "ok" and row["correct"] is True
        assert row["cpu_s"] > 0
        assert row["profile"]["file"].startswith(str(tmp_path / "profiles"))
        top = row["profile"]["top"]
        assert len(top) == 15
        own = [entry["own_s"] for entry in top]
        assert own == sorted(own, reverse=True)
    # feste's own code shows among the top functions of its profile.
    functions = " ".join(entry["function"] for entry in rows["feste"]["profile"]["top"])
    assert "feste/" in functions
    assert f"profile of the median run: {tmp_path / 'profiles'}" in result.stdout


def seeded_requests(calls: int, share_429: float, seed: int) -> int:
    """Requests the server receives for ``calls`` answered calls when it draws one number
    per request from ``random.Random(seed)`` and answers 429 below ``share_429``."""
    draws = random.Random(seed)
    requests = answered = 0
    while answered < calls:
        requests += 1
        if draws.random() >= share_429:
            answered += 1
    return requests


@pytest.mark.slow
def test_limit_and_staggered_workloads_account_for_every_request(tmp_path: Path) -> None:
    only = "random_429,overload,staggered,pipeline"
    result = run_benchmarks("--quick", "--only", only, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    workloads = {workload["name"]: workload for workload in report["workloads"]}
    assert list(workloads) == ["pipeline", "random_429", "overload", "staggered"]
    for workload in workloads.values():
        for row in workload["rows"]:
            if row["status"] == "skipped":  # a peer whose library is not installed
                continue
            assert (row["status"], row["correct"]) == ("ok", True), (workload["name"], row)

    # random_429: the server draws one number per request in arrival order, whoever
    # sends them, so every contender needs the same number of requests to get every
    # call answered, and every extra request is one of the seeded 429s.
    shed = workloads["random_429"]
    n = shed["n"]
    expected = seeded_requests(n, shed["server"]["fault_429"], shed["server"]["seed"])
    assert expected > n
    for row in shed["rows"]:
        assert row["requests"] == expected, row["contender"]
        assert row["server"]["status_counts"] == {"200": n, "429": expected - n}
    assert f"{expected} ({expected - n} x 429)" in (tmp_path / "latest.md").read_text()

    # overload: no call lost with feste's defaults; never more than 8 served at once;
    # told the cap, feste sends exactly one request per call.
    overload = workloads["overload"]
    n = overload["n"]
    for row in overload["rows"]:
        assert row["server"]["status_counts"]["200"] == n, row["contender"]
        assert row["server"]["max_in_flight"]["openai"] <= 8
        assert row["requests"] == n + row["server"]["status_counts"].get("429", 0)
    told = next(
        row for row in overload["rows"] if row["contender"] == "feste, told the server's cap"
    )
    assert told["requests"] == n and "429" not in told["server"]["status_counts"]

    # staggered: one chat per document; feste batches the answers' embeddings as they
    # arrive (between one request and one per answer), the per-document chains send one
    # request each; every row says when its first embedding request arrived.
    staggered = workloads["staggered"]
    n = staggered["n"]
    rows = {row["contender"]: row for row in staggered["rows"]}
    for row in rows.values():
        assert row["server"]["by_route"]["/v1/chat/completions"] == n
        assert row["milestones"]["first embedding request"] > 0
    assert 1 <= rows["feste"]["server"]["by_route"]["/v1/embeddings"] <= n
    assert rows["feste"]["server"]["items"] == 2 * n  # every answer embedded once
    chains = rows["asyncio.gather of per-document chains (aiohttp)"]
    assert chains["server"]["by_route"]["/v1/embeddings"] == n
    for row in workloads["pipeline"]["rows"]:
        if row["status"] == "ok" and row.get("scale", 1.0) == 1.0:
            assert row["milestones"]["first embedding request"] > 0, row["contender"]


def test_new_ideals_follow_their_formulas() -> None:
    knobs = _server_knobs(overload.WORKLOAD)
    ideal = overload.overload_ideal(2000, knobs)
    assert (ideal.seconds, ideal.requests) == (pytest.approx(250 * 0.05), 2000)

    knobs = _server_knobs(random_429.WORKLOAD)
    assert knobs["max_concurrency"] is None
    ideal = random_429.random_429_ideal(2000, knobs)
    # 2,000 calls answered with probability 0.8: 2,500 attempts on 64 slots, 40 waves.
    assert (ideal.seconds, ideal.requests) == (pytest.approx(40 * 0.05), 2500)

    knobs = _server_knobs(staggered.WORKLOAD)
    documents = staggered.make_documents(21)
    delays = sorted(staggered.chat_delay(index) for index in range(21))
    assert delays == [pytest.approx(step * 0.025) for step in range(21)]
    assert documents[1] == "Document 1 [[delay:0.2]]: notes on topic 1."
    # 21 chats of at most 0.55 s fit in 64 slots: the slowest chat, then one embedding.
    ideal = staggered.staggered_ideal(21, knobs)
    assert ideal.seconds == pytest.approx(0.05 + 0.0001 + 0.5 + 0.05 + 0.0001)


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


def test_the_report_prices_batch_job_answers_at_batch_prices() -> None:
    billed = {"openai": {"gpt-4o-mini": {"prompt_tokens": 1000, "completion_tokens": 500}}}
    in_jobs = {"openai": {"gpt-4o-mini": {"prompt_tokens": 600, "completion_tokens": 300}}}

    tokens, dollars = priced(billed, in_jobs)

    assert tokens == 1500
    online = 400 * 0.15 + 200 * 0.60
    batch = 600 * 0.075 + 300 * 0.30
    assert dollars == pytest.approx((online + batch) / 1e6)
