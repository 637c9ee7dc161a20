"""Batch cost: the same 10,000 chat calls online and through the provider's Batch API.

A cost table, not a race: the Batch API answers within its completion window (here
the test server's ``batch_completion_delay``, 1 s) for half the price. The rows show
what each way sends (requests counted at the server: the online calls, or a few file
uploads, job creations, polls and downloads), the tokens the answers billed (the same
both ways) and their dollars at list prices (online) or Batch API prices (jobs).

Rows:

* ``feste``: ``feste.compute(calls, batch_api=True)``: one job (10,000 requests fit
  in one), polled every 0.2 s;
* ``feste, online``: ``feste.compute(calls)``, 64 requests at once;
* ``asyncio.gather + semaphore (aiohttp)``: the same online calls, hand-written (the
  peers have no Batch API inside a graph: this is what they pay).

Ideal: the online plan, ``ceil(N / 64)`` waves of the server's latency; the Batch API
row's makespan is the job's completion delay plus gathering and polling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.harness import Contender, Ideal, Job, Size, Workload, ceil_div
from benchmarks.workloads.fanout import check_chat, feste_chat_calls, run_asyncio

__all__ = ["WORKLOAD"]

CONCURRENCY = 64
COMPLETION_DELAY = 0.5
SETTINGS = {"concurrency": CONCURRENCY, "max_retries": 2}


def make_prompts(n: int) -> list[str]:
    return [f"Batch question {index}: what is {index} times three?" for index in range(n)]


def online_ideal(n: int, server: Mapping[str, Any]) -> Ideal:
    latency = server["latency"]
    waves = ceil_div(n, server["max_concurrency"])
    return Ideal(
        seconds=waves * latency,
        formula=(
            f"online: ceil({n} / {server['max_concurrency']}) waves x {latency * 1000:g} ms "
            f"= {waves * latency:.2f} s and {n} requests; a Batch API job answers after "
            f"its completion delay ({server['batch_completion_delay']:g} s here)"
        ),
        requests=n,
    )


def _feste(job: Job, **options: Any) -> list[str]:
    import feste

    answers = feste_chat_calls(job)
    (values,) = feste.compute(answers, **options)
    return list(values)


def run_feste_online(job: Job) -> list[str]:
    return _feste(job)


def run_feste_batch_api(job: Job) -> list[str]:
    return _feste(job, batch_api=True, batch_api_poll=0.2, batch_api_window=0.1)


WORKLOAD = Workload(
    name="batch_cost",
    title="batch cost: chat calls online and through the Batch API",
    description=(
        "N OpenAI chat calls (10 ms each, 64 at once) sent online, then as Batch API "
        "jobs (answered after 0.5 s): requests, tokens and dollars at list and batch prices."
    ),
    size=Size(full=10_000, quick=100),
    server={
        "latency": 0.01,
        "max_concurrency": CONCURRENCY,
        "batch_completion_delay": COMPLETION_DELAY,
    },
    settings=SETTINGS,
    make_inputs=make_prompts,
    ideal=online_ideal,
    check=check_chat,
    contenders=(
        Contender(
            "feste",
            run_feste_batch_api,
            kind="feste",
            note="batch_api=True: one job, billed at batch prices",
        ),
        Contender("feste, online", run_feste_online, kind="feste", note="64 requests at once"),
        Contender(
            "asyncio.gather + semaphore (aiohttp)",
            run_asyncio,
            note="hand-written, online, at list prices",
        ),
    ),
    time_cap=120.0,
)
