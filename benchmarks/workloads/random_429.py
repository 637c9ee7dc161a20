"""Random 429s: the fan-out with a fifth of requests shed at random by a healthy server.

Some providers answer a share of requests with 429 whatever the load (a busy shard, a
burst elsewhere on the account). Here the server has no concurrency cap at all and
answers 20% of requests, drawn at random from a seeded sequence, with a 429 announcing
``Retry-After: 0.2`` (after the request's 50 ms). Every client keeps 64 requests in
flight, far below anything the server would refuse.

What it measures: a client should treat these 429s as what they are, a request to
retry that one call later, and keep its other 63 slots busy. A client that reads them
as overload (shrinking its concurrency, pausing every call) loses throughput for
nothing. feste runs with its default settings (429s retried by time, within
``rate_limit_timeout``). The hand-written asyncio loop sleeps the Retry-After and
retries, up to 10 times, as users write it: inside ``async with semaphore``, so the
slot stays taken while it sleeps. A second hand-written version takes the semaphore
per attempt and leaves the slot free while it waits. The official async openai client
retries with its own ``max_retries=10``, honouring the same header, inside the
semaphore as well.

Ideal: as for the faults workload, with the client's 64 slots: a call takes
``1 / 0.8`` attempts on average, so ``ceil(N / 0.8 / 64)`` waves of 50 ms, unless the
unluckiest call's chain of attempts (each extra one 50 ms plus the announced 0.2 s) is
longer. The larger of the two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from benchmarks.harness import Contender, Ideal, Job, Size, Workload
from benchmarks.peers import CHAT_MODEL, aiohttp_session, post_json_freeing_slot
from benchmarks.workloads import fanout
from benchmarks.workloads.faults import retry_ideal

__all__ = ["WORKLOAD", "random_429_ideal"]

CONCURRENCY = 64
SHARE_429 = 0.2
RETRY_AFTER = 0.2
RETRIES = 10


def random_429_ideal(n: int, server: Mapping[str, Any]) -> Ideal:
    # The server has no cap: the client's 64 requests in flight are the slots.
    return retry_ideal(
        n,
        latency=server["latency"] + server["latency_per_item"],
        slots=CONCURRENCY,
        fault_429=server["fault_429"],
        wait_429=server["fault_429_retry_after"],
    )


def run_asyncio_freeing_slot(job: Job) -> list[str]:
    """Hand-written, one step further: the semaphore is held only while a request is
    out, so a call waiting out its Retry-After leaves its slot to another."""
    url = job.openai_base_url + "/chat/completions"

    async def main() -> list[str]:
        async with aiohttp_session(job) as session:
            slots = asyncio.Semaphore(job.settings["concurrency"])

            async def ask(prompt: str) -> str:
                payload = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": prompt}]}
                body = await post_json_freeing_slot(
                    session, url, payload, job.settings["max_retries"], slots
                )
                return str(body["choices"][0]["message"]["content"])

            return await asyncio.gather(*(ask(prompt) for prompt in job.inputs))

    return asyncio.run(main())


WORKLOAD = Workload(
    name="random_429",
    title="random 429s: fan-out with 20% shed at random",
    description=(
        "The fan-out's N chat calls, 64 in flight, on a server without a concurrency cap "
        "that answers 20% of requests with 429 (Retry-After 0.2 s) at random, seeded."
    ),
    size=Size(full=2000, quick=100),
    server={
        "latency": 0.05,
        "max_concurrency": None,
        "fault_429": SHARE_429,
        "fault_429_retry_after": RETRY_AFTER,
    },
    settings={"concurrency": CONCURRENCY, "max_retries": RETRIES},
    make_inputs=fanout.make_prompts,
    ideal=random_429_ideal,
    check=fanout.check_chat,
    contenders=(
        Contender(
            "feste",
            fanout.run_feste_default_settings,
            kind="feste",
            note="default settings, OpenAI(max_concurrency=64)",
        ),
        Contender(
            "asyncio.gather + semaphore (aiohttp)",
            fanout.run_asyncio,
            note=f"hand-written; sleeps the Retry-After, {RETRIES} retries",
        ),
        Contender(
            "asyncio.gather, semaphore per attempt (aiohttp)",
            run_asyncio_freeing_slot,
            note=f"hand-written; frees its slot while it sleeps the Retry-After, {RETRIES} retries",
        ),
        Contender(
            "asyncio.gather + semaphore (openai.AsyncOpenAI)",
            fanout.run_openai_async,
            note=f"official async client, max_retries={RETRIES}",
        ),
    ),
)
