"""The ``feste`` command: runs and cache maintenance, on caches filled by real runs.

Run in-process through ``feste.cli.main([...])`` (output captured by pytest: not a
terminal, so plain text) and as ``python -m feste`` in a subprocess (piped, or on a
pseudo-terminal for Rich tables).
"""

from __future__ import annotations

import json
import os
import pty
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import feste
from feste.backend import OpenAI
from feste.cli import main, parse_duration
from feste.testing import TestServer, chat_text

ROOT = Path(feste.__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"


@pytest.fixture
def cache(llm_server: TestServer, tmp_path: Path) -> str:
    """A SQLite cache holding runs v1 and v2 of three questions, worded differently."""
    path = str(tmp_path / "cache.db")
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="sk-cli-0123456789")
    first = {"answers": [llm.chat(f"question {i}") for i in range(3)]}
    feste.compute(first, cache=path, run="v1")
    second = {"answers": [llm.chat("question 0"), llm.chat("question one"), llm.chat("question 2")]}
    feste.compute(second, cache=path, run="v2")
    return path


def run_main(capsys: Any, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def run_module(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "feste", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_runs_list(cache: str, capsys: Any) -> None:
    status, out, err = run_main(capsys, "runs", "list", "--cache", cache)

    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"runs in {cache}"
    assert lines[1].split() == [
        "name",
        "status",
        "started",
        "seconds",
        "calls",
        "cache",
        "hits",
        "requests",
        "failed",
        "tokens",
        "outputs",
    ]
    v1, v2 = lines[2].split(), lines[3].split()
    assert (v1[0], v1[1]) == ("v1", "finished")
    # name status date time seconds calls hits requests failed tokens outputs
    assert v1[5:9] == ["3", "0", "3", "0"] and v1[10] == "3"
    assert v2[5:9] == ["3", "2", "1", "0"] and v2[10] == "3"


def test_runs_list_as_json_and_from_the_module(cache: str) -> None:
    result = run_module("runs", "list", "--json", "--cache", cache)

    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout)
    assert [run["name"] for run in runs] == ["v1", "v2"]
    assert [(run["cache_hits"], run["requests"]) for run in runs] == [(0, 3), (2, 1)]


def test_runs_show(cache: str, capsys: Any) -> None:
    status, out, _ = run_main(capsys, "runs", "show", "v2", "--cache", cache)

    assert status == 0
    rows = {line.split("  ")[0]: line.split()[-1] for line in out.splitlines()[2:20] if line}
    assert rows["status"] == "finished"
    assert rows["cache hits"] == "2"
    assert rows["requests"] == "1"
    assert "openai.chat  3      3" in out
    assert f"0['answers'][1]  ok     {chat_text(MODEL, 'question one')}" in out

    status, out, _ = run_main(capsys, "runs", "show", "v2", "--json", "--cache", cache)
    shown = json.loads(out)
    assert shown["graph"]["calls"] == {"openai.chat": 3}
    assert [output["text"] for output in shown["output_list"]] == [
        chat_text(MODEL, "question 0"),
        chat_text(MODEL, "question one"),
        chat_text(MODEL, "question 2"),
    ]


def test_runs_diff_shows_the_changed_outputs_side_by_side(cache: str, capsys: Any) -> None:
    status, out, _ = run_main(capsys, "runs", "diff", "v1", "v2", "--cache", cache)

    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "v1 -> v2: 1 changed, 2 unchanged, 0 only in v1, 0 only in v2"
    assert "output 0['answers'][1]" in lines
    header = lines[lines.index("output 0['answers'][1]") + 1]
    assert header.split() == ["v1", "|", "v2"]
    row = lines[lines.index("output 0['answers'][1]") + 3]
    left, right = (part.strip() for part in row.split(" | "))
    assert (left, right) == (chat_text(MODEL, "question 1"), chat_text(MODEL, "question one"))

    status, out, _ = run_main(capsys, "runs", "diff", "v1", "v2", "--json", "--cache", cache)
    diff = json.loads(out)
    assert diff["unchanged"] == 2 and diff["only_a"] == [] and diff["only_b"] == []
    assert [(c["path"], c["a"], c["b"]) for c in diff["changed"]] == [
        ("0['answers'][1]", chat_text(MODEL, "question 1"), chat_text(MODEL, "question one"))
    ]


def test_runs_delete(cache: str, capsys: Any) -> None:
    status, out, _ = run_main(capsys, "runs", "delete", "v1", "--cache", cache)
    assert (status, out) == (0, f"deleted run v1 from {cache}\n")

    status, out, err = run_main(capsys, "runs", "delete", "v1", "--cache", cache)
    assert status == 1
    assert err == f"feste: error: no run named 'v1' in {cache} (runs: v2)\n"
    status, out, _ = run_main(capsys, "runs", "list", "--json", "--cache", cache)
    assert [run["name"] for run in json.loads(out)] == ["v2"]


def test_cache_stats(cache: str, capsys: Any) -> None:
    status, out, _ = run_main(capsys, "cache", "stats", "--json", "--cache", cache)

    assert status == 0
    stats = json.loads(out)
    assert (stats["entries"], stats["runs"], stats["location"]) == (4, 2, cache)
    assert stats["by_label"] == {f"openai.chat {MODEL}": 4}

    status, out, _ = run_main(capsys, "cache", "stats", "--cache", cache)
    assert "cached results  4" in out
    assert f"openai.chat {MODEL}  4" in out


def test_cache_prune_and_clear(cache: str, capsys: Any) -> None:
    with sqlite3.connect(cache) as connection:
        connection.execute(
            "UPDATE feste_results SET created = ? WHERE rowid IN "
            "(SELECT rowid FROM feste_results ORDER BY key LIMIT 3)",
            (time.time() - 8 * 86400,),
        )

    status, out, _ = run_main(capsys, "cache", "prune", "--older-than", "7d", "--cache", cache)
    assert (status, out) == (0, "removed 3 cached results older than 7d\n")
    status, out, _ = run_main(capsys, "cache", "prune", "--older-than", "7d", "--cache", cache)
    assert out == "removed 0 cached results older than 7d\n"

    status, out, _ = run_main(capsys, "cache", "clear", "--cache", cache)
    assert out == f"removed 1 cached results from {cache} (run history kept)\n"
    status, out, _ = run_main(capsys, "runs", "list", "--json", "--cache", cache)
    assert len(json.loads(out)) == 2


def test_durations() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("15m") == 900
    assert parse_duration("12h") == 43200
    assert parse_duration("7d") == 604800
    assert parse_duration("2w") == 1209600
    assert parse_duration("1.5h") == 5400


def test_bad_input_is_named(cache: str, tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("FESTE_CACHE", raising=False)
    status, _, err = run_main(capsys, "cache", "prune", "--older-than", "7 days", "--cache", cache)
    assert status == 1
    assert "--older-than takes a number and a unit (s, m, h, d or w), like 12h or 7d" in err

    status, _, err = run_main(capsys, "runs", "list")
    assert status == 1
    assert err == (
        "feste: error: no cache given: pass --cache PATH_OR_URL or set the FESTE_CACHE "
        "environment variable\n"
    )

    missing = tmp_path / "typo.db"
    status, _, err = run_main(capsys, "runs", "list", "--cache", str(missing))
    assert status == 1
    assert f"no cache at {missing}: check the path" in err
    assert not missing.exists()

    result = run_module("runs", "diff", "v1", "nope", "--cache", cache)
    assert result.returncode == 1
    assert result.stderr == f"feste: error: no run named 'nope' in {cache} (runs: v1, v2)\n"
    result = run_module("runs", "frobnicate")
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


def test_the_environment_variable_and_cache_before_the_command(cache: str, capsys: Any) -> None:
    result = run_module("cache", "stats", "--json", env={"FESTE_CACHE": cache})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["entries"] == 4

    status, out, _ = run_main(capsys, "--cache", cache, "runs", "list", "--json")
    assert status == 0 and len(json.loads(out)) == 2


def test_rich_tables_on_a_terminal(cache: str) -> None:
    leader, follower = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-m", "feste", "runs", "list", "--cache", cache],
        stdout=follower,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160", "TERM": "xterm"},
    )
    os.close(follower)
    received = b""
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the terminal closed with the child
            break
        if not data:
            break
        received += data
    os.close(leader)
    assert child.wait(60) == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", received.decode())  # without colours
    assert "┃ name" in text  # Rich's heavy box header
    assert "│ v1" in text and "│ v2" in text


def test_a_postgres_cache(llm_server: TestServer, postgres_url: str, capsys: Any) -> None:
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="sk-cli-0123456789")
    feste.compute([llm.chat("pg 1"), llm.chat("pg 2")], cache=postgres_url, run="pg")

    status, out, _ = run_main(capsys, "cache", "stats", "--json", "--cache", postgres_url)
    assert status == 0 and json.loads(out)["entries"] == 2
    status, out, _ = run_main(capsys, "runs", "show", "pg", "--json", "--cache", postgres_url)
    assert json.loads(out)["requests"] == 2
