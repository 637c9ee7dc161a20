"""Faults: the fan-out again, with 20% of requests answered 429 and 5% answered 500.

Injected faults come after the request's latency (the server did the work, then
failed), and a 429 announces ``Retry-After: 0.05``. Every contender must return every
answer right, so each retries with its own mechanism, given the same budget of 10
retries: feste's ``max_retries`` option, the official clients' and LangChain's
``max_retries``, a hand-written retry loop for asyncio. Their backoff is their own.

Ideal: a request succeeds with probability ``p = 1 - 0.2 - 0.05``, so a call takes
``1 / p`` attempts on average; with the slots always busy (waiting out a Retry-After
needs no slot), ``ceil(N / p / 64)`` waves of ``latency``. Unless the unluckiest call
takes longer: the expected largest number of attempts among N calls, each extra one
costing a latency plus, for a 429, the announced Retry-After (a 500 may be retried
at once). The ideal is the larger of the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.harness import Contender, Ideal, Size, Workload, ceil_div
from benchmarks.workloads import fanout

__all__ = ["WORKLOAD", "expected_max_attempts", "retry_ideal"]

CONCURRENCY = 64
FAULTS = {"fault_429": 0.2, "fault_500": 0.05, "retry_after": 0.05}


def expected_max_attempts(n: int, failure: float) -> float:
    """E[max of n geometric attempt counts]: sum over k of P(some call needs > k attempts)."""
    total = 0.0
    k = 0
    while True:
        tail = 1.0 - (1.0 - failure**k) ** n
        if tail < 1e-9:
            return total
        total += tail
        k += 1


def retry_ideal(
    n: int,
    *,
    latency: float,
    slots: int,
    fault_429: float,
    wait_429: float,
    fault_500: float = 0.0,
) -> Ideal:
    """The ideal of ``n`` calls on ``slots`` slots when each attempt fails at random:
    with probability ``fault_429`` a 429 announcing ``wait_429`` seconds, with
    ``fault_500`` a 500 (retried at once). The larger of the work and the expected
    chain of the unluckiest call."""
    failure = fault_429 + fault_500
    attempts = n / (1.0 - failure)
    work = ceil_div(round(attempts), slots) * latency
    # The unluckiest call: each extra attempt costs a latency, plus the announced
    # Retry-After when the failure was a 429 (a 500 may be retried at once).
    wait = wait_429 * fault_429 / failure
    chain = expected_max_attempts(n, failure)
    critical = latency + (chain - 1) * (latency + wait)
    return Ideal(
        seconds=max(work, critical),
        formula=(
            f"max(ceil({attempts:.0f} expected attempts / {slots}) waves x "
            f"{latency * 1000:g} ms, unluckiest call: {chain:.1f} attempts expected = "
            f"{critical * 1000:.0f} ms)"
        ),
        requests=round(attempts),
    )


def faults_ideal(n: int, server: Mapping[str, Any]) -> Ideal:
    return retry_ideal(
        n,
        latency=server["latency"] + server["latency_per_item"],
        slots=server["max_concurrency"],
        fault_429=server["fault_429"],
        wait_429=server["retry_after"],
        fault_500=server["fault_500"],
    )


RETRIES = "10 retries"

WORKLOAD = Workload(
    name="faults",
    title="faults: fan-out with 20% 429 and 5% 500",
    description=(
        "The fan-out's N chat calls with injected faults: 20% 429 (Retry-After 0.05 s) "
        "and 5% 500, seeded. Everyone retries up to 10 times with its own backoff."
    ),
    size=Size(full=2000, quick=100),
    server={"latency": 0.05, "max_concurrency": CONCURRENCY, **FAULTS},
    settings={"concurrency": CONCURRENCY, "max_retries": 10},
    make_inputs=fanout.make_prompts,
    ideal=faults_ideal,
    check=fanout.check_chat,
    contenders=(
        Contender("feste", fanout.run_feste, kind="feste", note="context max_retries=10"),
        Contender(
            "asyncio.gather + semaphore (aiohttp)",
            fanout.run_asyncio,
            note=f"hand-written retry loop, {RETRIES}, Retry-After or backoff",
        ),
        Contender(
            "dask.delayed threads, 64 workers",
            fanout.run_dask_64,
            note="openai client max_retries=10",
        ),
        Contender(
            "dask.delayed threads, default workers",
            fanout.run_dask_default,
            note="openai client max_retries=10",
            subset=fanout.SLOW_PEER_SUBSET,
        ),
        Contender(
            "multiprocessing.Pool(cpu_count)",
            fanout.run_pool,
            note="openai client max_retries=10",
            subset=fanout.SLOW_PEER_SUBSET,
            spawns_processes=True,
        ),
        Contender(
            "LangChain ChatOpenAI.abatch",
            fanout.run_langchain,
            note="ChatOpenAI max_retries=10",
            requires=("langchain_openai",),
        ),
    ),
)
