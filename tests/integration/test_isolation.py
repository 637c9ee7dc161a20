"""Tenants never mix, limits belong to their owner, rate limits never freeze or drop work.

Every test runs against the real local server, whose counters judge: requests per API
key, in-flight maxima, statuses.
"""

from __future__ import annotations

import threading

import pytest

import feste
from feste import context
from feste.backend.openai import OpenAI
from feste.errors import AuthenticationError, RateLimitError, TransientError
from feste.limits import account_limiter, backend_limiter
from feste.testing import chat_text, key_label, wait_until

pytestmark = pytest.mark.slow

KEY_A = "sk-tenant-a-0000000000"
KEY_B = "sk-tenant-b-1111111111"


def openai(server, **settings) -> OpenAI:
    settings.setdefault("api_key", KEY_A)
    return OpenAI(base_url=server.openai_base_url, **settings)


def test_calls_on_different_keys_are_separate_requests(llm_server):
    a = openai(llm_server, api_key=KEY_A)
    b = openai(llm_server, api_key=KEY_B)
    calls = [a.chat("hi"), b.chat("hi"), a.embed("x"), b.embed("x"), a.embed("y")]
    assert calls[0].key != calls[1].key
    assert feste.compute(calls)[0][:2] == [chat_text("gpt-4o-mini", "hi")] * 2
    stats = llm_server.stats()
    # Each tenant's chat and its own embed batch, under its own key.
    assert stats["by_api_key"] == {key_label(KEY_A): 2, key_label(KEY_B): 2}
    assert sorted(map(sorted, stats["inputs"]["/v1/embeddings"])) == [["x"], ["x", "y"]]


def test_a_bad_key_fails_only_its_own_calls(llm_server_factory):
    server = llm_server_factory(api_key=KEY_B)
    wrong = openai(server, api_key=KEY_A)
    right = openai(server, api_key=KEY_B)
    results = feste.compute([wrong.chat("hi"), right.chat("hi")], errors="return")[0]
    assert isinstance(results[0], feste.Failure)
    assert isinstance(results[0].exception, AuthenticationError)
    assert results[1] == chat_text("gpt-4o-mini", "hi")
    assert server.stats()["status_counts"] == {"401": 1, "200": 1}


def test_a_wrong_key_trips_the_breaker_instead_of_sending_every_call(llm_server_factory):
    server = llm_server_factory(api_key=KEY_B, latency=0.01)
    wrong = openai(server, api_key=KEY_A, max_concurrency=4)
    results = feste.compute([wrong.chat(f"q{i}") for i in range(300)], errors="return")[0]
    assert all(isinstance(result.exception, AuthenticationError) for result in results)
    # Only the requests in flight when the first 401 came back were sent.
    assert server.stats()["requests"] <= 8
    # The next computation tries again (the key may have been fixed meanwhile).
    again = feste.compute(wrong.chat("later"), errors="return")[0]
    assert isinstance(again.exception, AuthenticationError)
    assert server.stats()["requests"] <= 9


def test_each_backend_keeps_its_own_cap_on_one_url(llm_server_factory):
    server = llm_server_factory(latency=0.05)
    narrow = openai(server, max_concurrency=2)
    wide = openai(server, max_concurrency=24)
    calls = [narrow.chat(f"n{i}") for i in range(12)] + [wide.chat(f"w{i}") for i in range(96)]
    results = feste.compute(calls)[0]
    assert results[0] == chat_text("gpt-4o-mini", "n0")
    assert results[-1] == chat_text("gpt-4o-mini", "w95")
    assert backend_limiter(narrow).stats()["max_in_flight"] == 2
    assert backend_limiter(wide).stats()["max_in_flight"] == 24
    assert server.stats()["max_in_flight"] == 26


def test_concurrent_computations_keep_their_own_context_caps(llm_server_factory):
    server = llm_server_factory(latency=0.04)
    llm = openai(server)
    start = threading.Barrier(2)
    outcomes: dict[int, list[str]] = {}

    def run(cap: int, count: int) -> None:
        calls = [llm.chat(f"c{cap}-{i}") for i in range(count)]
        start.wait(10)
        with context.set(max_concurrency=cap):
            outcomes[cap] = feste.compute(calls)[0]

    threads = [
        threading.Thread(target=run, args=(2, 40)),
        threading.Thread(target=run, args=(6, 120)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes[2][-1] == chat_text("gpt-4o-mini", "c2-39")
    assert outcomes[6][-1] == chat_text("gpt-4o-mini", "c6-119")
    # Neither computation's cap leaked into the other's: 2 + 6 at the busiest moment.
    assert server.stats()["max_in_flight"] == 8


def test_an_hour_long_retry_after_neither_stalls_the_call_nor_later_work(llm_server_factory):
    server = llm_server_factory()
    llm = openai(server)
    # Any wait near the announced hour would fail these calls with a call_timeout error.
    with context.set(call_timeout=20, retry_backoff=0.01):
        first = feste.compute(llm.chat("slow [[retry_after:3600]]"))[0]
        later = feste.compute([llm.chat(f"later {i}") for i in range(20)])[0]
    assert first == chat_text("gpt-4o-mini", "slow [[retry_after:3600]]")
    assert later[19] == chat_text("gpt-4o-mini", "later 19")
    assert server.stats()["status_counts"] == {"429": 1, "200": 21}
    assert account_limiter(llm).stats()["pauses"] == 0


def test_retry_after_as_an_http_date_is_read(llm_server_factory):
    server = llm_server_factory(retry_after_http_date=True)
    llm = openai(server)
    with (
        context.set(eager=True, rate_limit_timeout=0),
        pytest.raises(RateLimitError) as info,
    ):
        llm.chat("x [[retry_after:2]]")
    assert 0 < info.value.retry_after <= 3


def test_waiting_for_admission_counts_against_the_call_timeout(llm_server_factory):
    server = llm_server_factory(hang_seconds=3)
    llm = openai(server, max_concurrency=1)
    hung: list[object] = []
    holder = threading.Thread(
        target=lambda: hung.extend(feste.compute(llm.chat("[[hang]]"), errors="return"))
    )
    holder.start()
    assert wait_until(lambda: server.stats()["in_flight"] == 1)
    # The only admission is held by the hanging call: this one waits, then gives up.
    (queued,) = feste.compute(llm.chat("queued"), call_timeout=0.3, errors="return")
    assert isinstance(queued.exception, TransientError)
    assert "call_timeout of 0.3 s passed while waiting for admission" in str(queued.exception)
    assert server.stats()["requests"] == 1
    holder.join(30)
    assert hung[0] == chat_text("gpt-4o-mini", "[[hang]]")


def test_the_call_timeout_cuts_a_hanging_attempt(llm_server_factory):
    server = llm_server_factory(hang_seconds=3)
    llm = openai(server)
    (result,) = feste.compute(llm.chat("[[hang]]"), call_timeout=0.3, errors="return")
    assert isinstance(result.exception, TransientError)
    assert "call_timeout of 0.3 s passed while waiting for an answer" in str(result.exception)
    assert server.stats()["requests"] == 1


def test_default_settings_lose_no_call_when_the_server_is_overloaded(llm_server_factory):
    server = llm_server_factory(max_concurrency=8, latency=0.02, retry_after=0.02)
    llm = openai(server, max_concurrency=64)
    results = feste.compute([llm.chat(f"q{i}") for i in range(400)])[0]
    assert results == [chat_text("gpt-4o-mini", f"q{i}") for i in range(400)]
    stats = server.stats()
    assert stats["status_counts"]["200"] == 400
    assert stats["max_in_flight"] == 8
    # Overload control converged below the 64 asked for.
    assert account_limiter(llm).stats()["decreases"] >= 1
