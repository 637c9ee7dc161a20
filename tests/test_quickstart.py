"""The README's quickstart, run as a user runs it: offline, twice, with checked results.

The expected topics and near-duplicates below were decided by reading the articles in
``examples/data/articles.jsonl``; the script never sees them. The first run fills a
result cache, the second is served by it without a request.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "quickstart.py"

EXPECTED_TOPICS = {
    "a01": "cooking",
    "a02": "sports",
    "a03": "finance",
    "a04": "technology",
    "a05": "health",
    "a06": "cooking",
    "a07": "sports",
    "a08": "finance",
    "a09": "technology",
    "a10": "health",
    "a11": "cooking",
    "a12": "sports",
    "a13": "finance",
    "a14": "technology",
    "a15": "health",
    "a16": "sports",
    "a17": "cooking",
    "a18": "sports",
    "a19": "finance",
    "a20": "technology",
    "a21": "health",
    "a22": "finance",
    "a23": "cooking",
    "a24": "sports",
    "a25": "finance",
    "a26": "technology",
    "a27": "health",
    "a28": "cooking",
    "a29": "sports",
    "a30": "technology",
}
# a16 repeats a02, a22 repeats a03, a28 repeats a06 (reworded a little).
EXPECTED_DUPLICATES = {"a16": "a02", "a22": "a03", "a28": "a06"}

ROW = re.compile(r"^(a\d\d)\s+(\w+)\s+(-?\d\.\d\d)\s+(?:(a\d\d) \((\d\.\d\d)\)|-)\s+\S")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_quickstart(cache: Path, port: int) -> str:
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("OPENAI_")
    }
    environment["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--cache", str(cache), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(output: str) -> dict[str, tuple[str, str | None]]:
    rows = {}
    for line in output.splitlines():
        found = ROW.match(line)
        if found:
            rows[found.group(1)] = (found.group(2), found.group(4))
    return rows


def test_the_quickstart_labels_and_finds_duplicates_then_reruns_from_the_cache(
    local_model, tmp_path
):
    cache = tmp_path / "quickstart.db"
    port = free_port()
    first = run_quickstart(cache, port)

    assert f"Chat model: feste's local test server at http://127.0.0.1:{port}/v1" in first
    assert "local.embed: 35 calls -> 1 request" in first
    assert "openai.chat: 30 calls -> 30 requests" in first
    rows = table_rows(first)
    assert {article: topic for article, (topic, _) in rows.items()} == EXPECTED_TOPICS
    duplicates = {article: twin for article, (_, twin) in rows.items() if twin is not None}
    assert duplicates == EXPECTED_DUPLICATES
    # 30 chats, one request each; 35 embeddings in one request, 585 similarities in
    # at least ceil(585 / 512) = 2.
    sent = re.search(r"Requests sent: (\d+) local, (\d+) openai", first)
    assert sent is not None, first
    assert int(sent.group(2)) == 30
    assert int(sent.group(1)) >= 3
    assert "a01: echo(gpt-4o-mini): Summarize in one sentence: Weeknight risotto." in first
    timing = re.search(r"one call per request:\s+\d+\.\d\d s in (\d+) requests", first)
    assert timing is not None and int(timing.group(1)) == 620

    second = run_quickstart(cache, port)
    assert f"Served by the cache ({cache}): no request was sent." in second
    assert table_rows(second) == rows
