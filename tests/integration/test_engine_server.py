"""The async engine against a faulty server: every call completes, once, correctly.

The server (in its own process) injects 429s, 500s, hangs and dropped connections at
random (seeded). The client retries with a short backoff, and a short task_timeout turns
hangs into retries. The server's counters must add up: every request it saw was
either answered 200 (one per call, so nothing was lost or sent twice after success) or
is one of the injected faults.
"""

from __future__ import annotations

import pytest

import feste
from feste.backend.openai import OpenAI
from feste.limits import limiter_for
from feste.testing import TestServer, chat_text

pytestmark = pytest.mark.slow


def test_two_thousand_calls_survive_injected_faults():
    calls_count = 2000
    with TestServer(
        mode="process",
        latency=0.005,
        fault_429=0.20,
        fault_500=0.05,
        fault_hang=0.02,
        fault_drop=0.02,
        retry_after=0.01,
        hang_seconds=30,
        seed=7,
    ) as server:
        llm = OpenAI(base_url=server.openai_base_url, api_key="k", max_concurrency=64)
        calls = [llm.chat(f"question {i}") for i in range(calls_count)]
        results = feste.compute(
            calls, task_timeout=0.5, retry_backoff=0.01, max_retries=12, progress=False
        )[0]
        stats = server.stats()

    assert results == [chat_text("gpt-4o-mini", f"question {i}") for i in range(calls_count)]
    faults = stats["faults"]
    statuses = stats["status_counts"]
    # One success per call: none lost, none answered twice.
    assert statuses["200"] == calls_count
    # Each question was answered exactly once.
    answered = [texts[0] for texts in stats["inputs"]["/v1/chat/completions"]]
    assert sorted(answered) == sorted(f"question {i}" for i in range(calls_count))
    assert statuses["429"] == faults["429"]
    assert statuses["500"] == faults["500"]
    assert faults["429"] > 0 and faults["500"] > 0 and faults["hang"] > 0 and faults["drop"] > 0
    # Every request is a success or an injected fault (hangs and drops get no status).
    assert stats["requests"] == (
        calls_count + faults["429"] + faults["500"] + faults["hang"] + faults["drop"]
    )
    assert stats["max_in_flight"] <= 64
    limiter = limiter_for(llm).stats()
    assert limiter["in_flight"] == 0
    assert limiter["admitted"] == stats["requests"]
    assert limiter["rate_limited"] == faults["429"]


def test_many_calls_in_flight_stay_within_the_limit():
    with TestServer(mode="process", latency=0.02, max_concurrency=32) as server:
        llm = OpenAI(base_url=server.openai_base_url, api_key="k", max_concurrency=32)
        calls = [llm.chat(f"q{i}") for i in range(1000)]
        results = feste.compute(calls)[0]
        stats = server.stats()
    assert results == [chat_text("gpt-4o-mini", f"q{i}") for i in range(1000)]
    assert stats["max_in_flight"] == 32
    # The server never had to refuse a request: the client kept to the limit.
    assert stats["status_counts"] == {"200": 1000}
