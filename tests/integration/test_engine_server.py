"""The async engine against a faulty server: every call completes, correctly, none lost.

The server (in its own process) injects 429s, 500s, hangs and dropped connections at
random (seeded). The client retries with a short backoff, and a short task_timeout turns
hangs into retries. Timeouts and retries promise *at-least-once* delivery: a request the
client gave up on may still have been answered (under load, an answer can take longer
than the timeout), so the test asserts what that contract promises and nothing more.
The books must balance on both sides: every attempt the client made ended exactly once
(one success per call, the rest retried), every request the server saw was a client
attempt, every answer the server gave for an input the client retried is accounted for
by a client timeout, and every hang the server injected cost the client a timeout.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

import feste
from feste._calls import RunObserver, current_observer
from feste.backend.openai import OpenAI
from feste.errors import RateLimitError, TransientError
from feste.limits import limiter_for
from feste.testing import TestServer, chat_text

pytestmark = pytest.mark.slow


class AttemptLedger(RunObserver):
    """Counts what happened to each attempt, as the client saw it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = 0
        self.finished = 0
        self.failed = 0
        self.retried: Counter[str] = Counter()

    def request_started(self, request):
        with self.lock:
            self.started += 1

    def request_finished(self, request, usage, seconds):
        with self.lock:
            self.finished += 1

    def request_failed(self, request, error, attempt):
        with self.lock:
            self.failed += 1

    def request_retried(self, request, error, attempt):
        if isinstance(error, RateLimitError):
            kind = "429"
        elif isinstance(error, TransientError) and error.status is not None:
            kind = str(error.status)
        elif isinstance(error, TransientError) and "no answer within" in str(error):
            kind = "timeout"
        else:
            kind = "connection"
        with self.lock:
            self.retried[kind] += 1


def test_two_thousand_calls_survive_injected_faults():
    calls_count = 2000
    questions = [f"question {i}" for i in range(calls_count)]
    ledger = AttemptLedger()
    with TestServer(
        mode="process",
        latency=0.005,
        fault_429=0.20,
        fault_500=0.05,
        fault_hang=0.02,
        fault_drop=0.02,
        retry_after=0.01,
        # Longer than the test may take: a hung request never gets an answer.
        hang_seconds=600,
        seed=7,
    ) as server:
        llm = OpenAI(base_url=server.openai_base_url, api_key="k", max_concurrency=64)
        calls = [llm.chat(question) for question in questions]
        before = limiter_for(llm).stats()
        token = current_observer.set(ledger)
        try:
            results = feste.compute(
                calls, task_timeout=1.0, retry_backoff=0.01, max_retries=20, progress=False
            )[0]
        finally:
            current_observer.reset(token)
        stats = server.stats()

    # Every call completed with its own answer: nothing lost, nothing mixed up.
    assert results == [chat_text("gpt-4o-mini", question) for question in questions]

    # The client: each attempt ended once, as a success (one per call) or a retry.
    retried = ledger.retried
    assert ledger.finished == calls_count
    assert ledger.failed == 0
    assert ledger.started == calls_count + sum(retried.values())
    assert set(retried) <= {"429", "500", "timeout", "connection"}
    limiter = limiter_for(llm).stats()
    assert limiter["admitted"] - before["admitted"] == ledger.started
    assert limiter["rate_limited"] - before["rate_limited"] == retried["429"]
    assert limiter["in_flight"] == 0
    assert limiter["max_in_flight"] <= 64

    # The server: every input was answered at least once, and each answer is recorded.
    faults = stats["faults"]
    statuses = stats["status_counts"]
    answered = [texts[0] for texts in stats["inputs"]["/v1/chat/completions"]]
    assert set(answered) == set(questions)
    assert len(answered) == statuses["200"]
    assert faults["429"] > 0 and faults["500"] > 0 and faults["hang"] > 0 and faults["drop"] > 0
    assert statuses["429"] == faults["429"]
    assert statuses["500"] == faults["500"]
    # Errors the client retried were all sent by the server (some it sent may have come
    # after the client gave up). Each hang, and each extra answer to an input (one the
    # client no longer waited for), ended in a client timeout; each drop in a timeout or
    # a broken connection.
    assert retried["429"] <= faults["429"]
    assert retried["500"] <= faults["500"]
    extra_answers = statuses["200"] - calls_count
    assert retried["timeout"] >= faults["hang"] + extra_answers
    assert (
        retried["timeout"] + retried["connection"]
        >= faults["hang"] + extra_answers + faults["drop"]
    )
    # Every request the server saw was an attempt of the client, and ended in at most
    # one answer or fault (a request the client abandoned while it was served has none).
    answers_and_faults = (
        statuses["200"] + faults["429"] + faults["500"] + faults["hang"] + faults["drop"]
    )
    assert answers_and_faults <= stats["requests"] <= ledger.started


def test_many_calls_in_flight_stay_within_the_limit():
    with TestServer(mode="process", latency=0.02, max_concurrency=32) as server:
        llm = OpenAI(base_url=server.openai_base_url, api_key="k", max_concurrency=32)
        calls = [llm.chat(f"q{i}") for i in range(1000)]
        before = limiter_for(llm).stats()
        results = feste.compute(calls)[0]
        stats = server.stats()
    assert results == [chat_text("gpt-4o-mini", f"q{i}") for i in range(1000)]
    # The client used its whole limit (all calls were ready at once) and no more ...
    limiter = limiter_for(llm).stats()
    assert limiter["max_in_flight"] == 32
    assert limiter["admitted"] - before["admitted"] == 1000
    # ... and the server, which refuses a 33rd request in flight, never had to.
    assert stats["status_counts"] == {"200": 1000}
    assert stats["faults"]["limit_429"] == 0
    assert stats["max_in_flight"] <= 32
