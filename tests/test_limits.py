"""feste.limits: admission by concurrency, rates and pauses; AIMD; one limiter per identity.

The limiter is exercised directly (coroutines acquiring and releasing, on one loop and
on several loops in several threads), then through feste.compute against the local
test server, whose own counters (max_in_flight, status_counts) are the judge.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

import feste
from feste import context
from feste.backend.openai import OpenAI
from feste.backend.types import Usage
from feste.errors import ConfigurationError, OptionError
from feste.limits import (
    Limiter,
    Limits,
    Ticket,
    account_limiter,
    all_limiters,
    backend_limiter,
    limiter_for,
    resolve_limits,
    run_scope,
)


class InFlight:
    """Counts holders of an admission, across threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.total = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.total += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


async def hold(limiter: Limiter, counter: InFlight, seconds: float, tokens: int = 0) -> None:
    async with limiter.admit(tokens):
        counter.enter()
        await asyncio.sleep(seconds)
        counter.leave()


def test_concurrency_is_capped_and_reached():
    limiter = Limiter("test", Limits(max_concurrency=3))
    counter = InFlight()

    async def main():
        await asyncio.gather(*(hold(limiter, counter, 0.01) for _ in range(12)))

    asyncio.run(main())
    assert counter.total == 12
    assert counter.most == 3
    assert limiter.stats()["in_flight"] == 0
    assert limiter.stats()["max_in_flight"] == 3


def test_the_limit_holds_across_threads_and_event_loops():
    limiter = Limiter("test", Limits(max_concurrency=4))
    counter = InFlight()

    def one_thread():
        async def main():
            await asyncio.gather(*(hold(limiter, counter, 0.005) for _ in range(15)))

        asyncio.run(main())

    threads = [threading.Thread(target=one_thread) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert counter.total == 45
    assert counter.most == 4
    stats = limiter.stats()
    assert (stats["in_flight"], stats["waiting"], stats["admitted"]) == (0, 0, 45)


def test_waiters_are_admitted_in_arrival_order():
    limiter = Limiter("test", Limits(max_concurrency=1))
    order: list[int] = []

    async def one(i: int) -> None:
        async with limiter.admit():
            order.append(i)
            await asyncio.sleep(0)

    async def main():
        await asyncio.gather(*(one(i) for i in range(8)))

    asyncio.run(main())
    assert order == list(range(8))


def test_a_cancelled_waiter_gives_its_place_back():
    limiter = Limiter("test", Limits(max_concurrency=1))

    async def main():
        first = await limiter.acquire()
        waiting = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.01)
        assert limiter.stats()["waiting"] == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert limiter.stats()["waiting"] == 0
        limiter.release(first)
        # The slot is free again: a new request is admitted at once.
        second = await asyncio.wait_for(limiter.acquire(), 1)
        limiter.release(second)

    asyncio.run(main())
    assert limiter.stats()["in_flight"] == 0


def test_releasing_twice_counts_once():
    limiter = Limiter("test", Limits(max_concurrency=2))

    async def main():
        ticket = await limiter.acquire()
        limiter.release(ticket)
        limiter.release(ticket)

    asyncio.run(main())
    assert limiter.stats()["in_flight"] == 0


def test_requests_per_minute_allow_one_second_of_burst_then_wait():
    limiter = Limiter("test", Limits(requests_per_minute=120))  # 2 a second

    async def main():
        for _ in range(2):
            limiter.release(await asyncio.wait_for(limiter.acquire(), 1))
        third = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.01)
        assert not third.done()
        # Refilled at 2 per second: admitted within a short while.
        limiter.release(await asyncio.wait_for(third, 5))

    asyncio.run(main())
    assert limiter.stats()["admitted"] == 3


def test_tokens_per_minute_charge_estimates_and_refund_with_usage():
    limiter = Limiter("test", Limits(tokens_per_minute=600))  # 10 tokens a second

    async def main():
        # 90 estimated tokens put the 10-token bucket 80 tokens in debt: about 9 s.
        ticket = await asyncio.wait_for(limiter.acquire(90), 1)
        limiter.release(ticket)
        blocked = asyncio.create_task(limiter.acquire(90))
        await asyncio.sleep(0.01)
        assert not blocked.done()
        # The provider reports no tokens used: the refund admits the next one now.
        limiter.succeeded(90, Usage("m", 0, 0), ticket)
        limiter.release(await asyncio.wait_for(blocked, 1))

    asyncio.run(main())


def test_a_request_larger_than_the_bucket_is_admitted_when_it_is_full():
    limiter = Limiter("test", Limits(tokens_per_minute=600))  # 10 tokens a second

    async def main():
        limiter.release(await asyncio.wait_for(limiter.acquire(1000), 1))

    asyncio.run(main())


def overload(
    limiter: Limiter,
    tickets: list[Ticket],
    retry_after: float | None = None,
    max_pause: float | None = None,
) -> None:
    """Report 429s on ``tickets`` (round robin) until the limiter takes it as overload."""
    decreases = limiter.stats()["decreases"]
    for index in range(200):
        limiter.rate_limited(retry_after, tickets[index % len(tickets)], max_pause=max_pause)
        if limiter.stats()["decreases"] > decreases:
            return
    raise AssertionError("200 429s were not taken as overload")


def test_a_few_random_429s_neither_pause_nor_shrink_the_account():
    limiter = Limiter("account", adaptive=True)

    async def main():
        tickets = [await limiter.acquire() for _ in range(64)]
        # One answer in five is a 429, the others succeed: a provider shedding at random.
        for index, ticket in enumerate(tickets):
            if index % 5 == 0:
                assert limiter.rate_limited(0.2, ticket) is False
            else:
                limiter.succeeded(0, None, ticket)
            limiter.release(ticket)

    asyncio.run(main())
    stats = limiter.stats()
    assert (stats["rate_limited"], stats["decreases"], stats["pauses"]) == (13, 0, 0)
    assert stats["paused_for"] == 0
    assert stats["concurrency"] is None  # the window was never bounded


def test_overload_pauses_every_waiter_and_shrinks_once_per_generation():
    limiter = Limiter("account", adaptive=True)

    async def main():
        loop = asyncio.get_running_loop()

        async def admitted_at() -> float:
            ticket = await limiter.acquire()
            limiter.release(ticket)
            return loop.time()

        tickets = [await limiter.acquire() for _ in range(32)]
        started = loop.time()
        overload(limiter, tickets, retry_after=0.5)
        # 32 in flight when overload was recognized: the window is three quarters of it.
        assert limiter.stats()["concurrency"] == 24
        # The other 429s of that generation answer requests sent before the reaction.
        for ticket in tickets:
            assert limiter.rate_limited(0.5, ticket) is False
        assert limiter.stats()["decreases"] == 1
        for ticket in tickets:
            limiter.release(ticket)
        assert limiter.stats()["paused_for"] > 0
        waiters = [asyncio.create_task(admitted_at()) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert not any(waiter.done() for waiter in waiters)
        times = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        # Nobody was admitted before the pause ended.
        assert min(times) - started >= 0.5

    asyncio.run(main())


def test_a_retry_after_over_the_cap_never_pauses_the_account():
    limiter = Limiter("account", adaptive=True)

    async def main():
        tickets = [await limiter.acquire() for _ in range(32)]
        overload(limiter, tickets, retry_after=3600, max_pause=60)

    asyncio.run(main())
    stats = limiter.stats()
    # Overload shrinks the window, but an hour-long pause is not taken from the server.
    assert (stats["decreases"], stats["pauses"], stats["paused_for"]) == (1, 0, 0.0)


def test_the_overload_window_is_enforced_and_recovers_on_successes():
    limiter = Limiter("account", Limits(max_concurrency=16), adaptive=True)
    counter = InFlight()

    async def main():
        tickets = [await limiter.acquire() for _ in range(16)]
        overload(limiter, tickets)
        assert limiter.stats()["concurrency"] == 12
        for ticket in tickets:
            limiter.release(ticket)
        # A 429 while the window is mostly idle says nothing about overload.
        lone = await limiter.acquire()
        assert limiter.rate_limited(None, lone) is False
        limiter.release(lone)
        # The shrunken window holds.
        await asyncio.gather(*(hold(limiter, counter, 0.002) for _ in range(30)))
        assert counter.most == 12
        # One request at a time never grows it: it is not in use.
        for _ in range(20):
            ticket = await limiter.acquire()
            limiter.succeeded(0, None, ticket)
            limiter.release(ticket)
        assert limiter.stats()["concurrency"] == 12
        # Rounds of requests filling the window grow it back to the limit, not beyond.
        for _ in range(10):
            window = limiter.stats()["concurrency"]
            tickets = [await asyncio.wait_for(limiter.acquire(), 1) for _ in range(window)]
            for ticket in tickets:
                limiter.succeeded(0, None, ticket)
                limiter.release(ticket)
        assert limiter.stats()["concurrency"] == 16

    asyncio.run(main())


def succeed_with_headers(limiter: Limiter, headers: dict[str, str]) -> None:
    async def main():
        ticket = await limiter.acquire()
        limiter.succeeded(0, None, ticket, headers)
        limiter.release(ticket)

    asyncio.run(main())


def test_a_spent_budget_in_the_headers_pauses_the_account_until_its_reset():
    limiter = Limiter("account", adaptive=True)
    succeed_with_headers(
        limiter, {"x-ratelimit-remaining-tokens": "12", "x-ratelimit-reset-tokens": "6m0s"}
    )
    assert limiter.stats()["pauses"] == 0  # tokens left: no pause
    succeed_with_headers(
        limiter, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}
    )
    assert limiter.stats()["pauses"] == 1
    assert 0.5 < limiter.stats()["paused_for"] <= 1.0


def test_a_backend_or_compute_limiter_learns_nothing_from_answers():
    limiter = Limiter("backend", Limits(max_concurrency=8))
    succeed_with_headers(
        limiter, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}
    )

    async def main():
        tickets = [await limiter.acquire() for _ in range(8)]
        for ticket in tickets * 10:
            assert limiter.rate_limited(1.0, ticket) is False

    asyncio.run(main())
    stats = limiter.stats()
    assert (stats["pauses"], stats["decreases"], stats["concurrency"]) == (0, 0, 8)


@pytest.mark.parametrize("bad", [0, -1, "3", True, 2.5])
def test_invalid_limits_are_rejected_by_one_rule_everywhere(bad):
    """The backend, the limiter and the context check max_concurrency the same way."""
    with pytest.raises(ConfigurationError, match=r"'max_concurrency': .*positive integer"):
        Limits(max_concurrency=bad).check()
    with pytest.raises(
        ConfigurationError, match=r"invalid max_concurrency for OpenAI\(...\): .*positive integer"
    ):
        OpenAI(api_key="k", max_concurrency=bad)
    with (
        pytest.raises(OptionError, match=r"'max_concurrency': .*positive integer"),
        context.set(max_concurrency=bad),
    ):
        pass


def test_invalid_context_limits_are_rejected():
    with (
        pytest.raises(OptionError, match="requests_per_minute"),
        context.set(requests_per_minute=0),
    ):
        pass
    with pytest.raises(OptionError, match="max_concurrency"), context.set(max_concurrency=-5):
        pass


def test_one_account_per_key_and_url_never_shared_between_keys():
    a = OpenAI(base_url="http://127.0.0.1:9/v1", api_key="key-aaaaaaaa", max_concurrency=5)
    a_again = OpenAI(base_url="http://127.0.0.1:9/v1", api_key="key-aaaaaaaa")
    b = OpenAI(base_url="http://127.0.0.1:9/v1", api_key="key-bbbbbbbb", max_concurrency=5)
    c = OpenAI(base_url="http://127.0.0.1:10/v1", api_key="key-aaaaaaaa", max_concurrency=5)
    assert account_limiter(a) is account_limiter(a_again)
    assert account_limiter(a) is not account_limiter(b)
    assert account_limiter(a) is not account_limiter(c)
    assert "key-aaaaaaaa" not in repr(account_limiter(a))
    assert all("key-aaaaaaaa" not in name for name in all_limiters())


def test_a_backends_limits_belong_to_backends_of_its_configuration():
    url = "http://127.0.0.1:12/v1"
    small = OpenAI(base_url=url, api_key="k", max_concurrency=2)
    small_again = OpenAI(base_url=url, api_key="k", max_concurrency=2)
    large = OpenAI(base_url=url, api_key="k", max_concurrency=64)
    assert backend_limiter(small) is backend_limiter(small_again)
    assert backend_limiter(small) is not backend_limiter(large)
    assert backend_limiter(small).limits.max_concurrency == 2
    assert backend_limiter(large).limits.max_concurrency == 64
    assert backend_limiter(OpenAI(base_url=url, api_key="k")) is None
    assert account_limiter(small) is account_limiter(large)


def test_a_computation_adds_its_own_limits_to_the_backends():
    backend = OpenAI(base_url="http://127.0.0.1:11/v1", api_key="k", max_concurrency=5)
    with run_scope() as scope:
        gates = scope.gates(backend)
        assert [limiter.limits for limiter in gates.limiters] == [Limits(5), Limits()]
        assert gates.account is gates.limiters[-1]
    with context.set(max_concurrency=2, tokens_per_minute=1000), run_scope() as scope:
        gates = scope.gates(backend)
        limits = [limiter.limits for limiter in gates.limiters]
        assert limits == [Limits(2, None, 1000.0), Limits(5), Limits()]
        assert scope.gates(backend) is gates  # resolved once per computation
    with context.set(max_concurrency=2), run_scope() as other:
        # Another computation: its own compute limiter.
        assert other.gates(backend).limiters[0] is not gates.limiters[0]
    assert resolve_limits(backend) == Limits(5)
    with context.set(max_concurrency=2):
        assert resolve_limits(backend) == Limits(2)


def test_calls_respect_max_concurrency_at_the_server(llm_server_factory):
    server = llm_server_factory(latency=0.02)
    llm = OpenAI(base_url=server.openai_base_url, api_key="k", max_concurrency=4)
    results = feste.compute([llm.chat(f"q{i}") for i in range(40)])[0]
    assert results == [f"echo(gpt-4o-mini): q{i}" for i in range(40)]
    stats = server.stats()
    assert stats["max_in_flight"] == 4
    assert stats["requests"] == 40


def test_concurrent_computes_in_several_threads_share_the_limit(llm_server_factory):
    server = llm_server_factory(latency=0.02)
    outcomes: dict[int, list[str]] = {}

    def run(thread_index: int) -> None:
        # Separate backend objects of one identity: one limiter between them.
        llm = OpenAI(base_url=server.openai_base_url, api_key="k", max_concurrency=3)
        calls = [llm.chat(f"t{thread_index}-{i}") for i in range(15)]
        outcomes[thread_index] = feste.compute(calls)[0]

    threads = [threading.Thread(target=run, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for n in range(3):
        assert outcomes[n] == [f"echo(gpt-4o-mini): t{n}-{i}" for i in range(15)]
    assert server.stats()["max_in_flight"] == 3
    assert server.stats()["requests"] == 45


def test_the_limit_set_in_the_context_applies(llm_server_factory):
    server = llm_server_factory(latency=0.02)
    llm = OpenAI(base_url=server.openai_base_url, api_key="k", max_concurrency=50)
    with context.set(max_concurrency=2):
        feste.compute([llm.chat(f"q{i}") for i in range(12)])
    assert server.stats()["max_in_flight"] == 2


def test_server_429s_are_reported_to_the_limiter(llm_server_factory):
    server = llm_server_factory(fault_429=0.3, retry_after=0.01, seed=3)
    llm = OpenAI(base_url=server.openai_base_url, api_key="k", max_concurrency=8)
    results = feste.compute([llm.chat(f"q{i}") for i in range(30)], retry_backoff=0.001)[0]
    assert results == [f"echo(gpt-4o-mini): q{i}" for i in range(30)]
    stats = server.stats()
    limiter = limiter_for(llm).stats()
    assert stats["status_counts"]["429"] > 0
    assert limiter["rate_limited"] == stats["status_counts"]["429"]
    assert limiter["admitted"] == stats["requests"]
    assert stats["requests"] == 30 + stats["status_counts"]["429"]


def test_waiters_with_a_higher_priority_are_admitted_first():
    limiter = Limiter("test", Limits(max_concurrency=1))
    order: list[str] = []

    async def one(name: str, priority: float) -> None:
        ticket = await limiter.acquire(0, priority)
        order.append(name)
        await asyncio.sleep(0)
        limiter.release(ticket)

    async def main():
        first = await limiter.acquire()
        waiters = [
            asyncio.create_task(one(name, priority))
            for name, priority in [("a", 0), ("b", 0), ("chain", 3), ("c", 0), ("next", 1)]
        ]
        await asyncio.sleep(0.01)
        limiter.release(first)
        await asyncio.gather(*waiters)

    asyncio.run(main())
    # Highest priority first, ties in arrival order.
    assert order == ["chain", "next", "a", "b", "c"]
