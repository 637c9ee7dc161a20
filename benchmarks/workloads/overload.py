"""Overload: the client asks for 64 requests in flight; the server serves 8.

The server serves at most 8 requests at once (50 ms each) and refuses every request
beyond that at once with a 429 announcing ``Retry-After: 0.05``. Each client is
configured for 64 in flight, as a user would who does not know the provider's real
capacity. No call may be lost: every value must come back right.

What it measures: whether a client finds the capacity by itself, and what it costs the
server. feste runs with its DEFAULT settings and ``OpenAI(max_concurrency=64)``: its
overload control should bring its window down to about 8 and keep the server busy.
The hand-written asyncio loop keeps 64 coroutines going, each sleeping the Retry-After
and trying again until it gets through (no retry budget: it must not lose calls), so
it keeps the server full by hammering it. A last row gives feste the server's true cap
(``max_concurrency=8``), the best a client that knew could do. The Requests column
shows how many requests each sent, and how many of them were answered 429.

Ideal: the server's 8 slots busy all the time: ``ceil(N / 8)`` waves of 50 ms, with
exactly N requests.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from benchmarks.harness import GRAPH_BUILT, Contender, Ideal, Job, Size, Workload, ceil_div
from benchmarks.peers import CHAT_MODEL
from benchmarks.workloads import fanout

__all__ = ["WORKLOAD", "overload_ideal"]

CLIENT_CONCURRENCY = 64
SERVER_CAP = 8
# The hand-written loop retries until it succeeds.
UNBOUNDED_RETRIES = sys.maxsize


def overload_ideal(n: int, server: Mapping[str, Any]) -> Ideal:
    latency = server["latency"] + server["latency_per_item"]
    cap = server["max_concurrency"]
    waves = ceil_div(n, cap)
    return Ideal(
        seconds=waves * latency,
        formula=f"ceil({n} / {cap} server slots) waves x {latency * 1000:g} ms",
        requests=n,
    )


def run_feste_at_server_cap(job: Job) -> list[str]:
    """feste told the server's real capacity: the reference for what adapting costs."""
    import feste
    from feste.backend import OpenAI

    llm = OpenAI(
        base_url=job.openai_base_url,
        api_key=job.api_key,
        model=CHAT_MODEL,
        max_concurrency=job.settings["server_cap"],
    )
    answers = [llm.chat(prompt) for prompt in job.inputs]
    job.mark(GRAPH_BUILT)
    (values,) = feste.compute(answers)
    return list(values)


WORKLOAD = Workload(
    name="overload",
    title="overload: 64 asked in flight, 8 served",
    description=(
        "N chat calls, each client configured for 64 in flight; the server answers after "
        "50 ms, serves 8 at once and refuses the rest with 429 (Retry-After 0.05 s)."
    ),
    size=Size(full=2000, quick=200),
    server={"latency": 0.05, "max_concurrency": SERVER_CAP, "retry_after": 0.05},
    settings={
        "concurrency": CLIENT_CONCURRENCY,
        "max_retries": UNBOUNDED_RETRIES,
        "server_cap": SERVER_CAP,
    },
    make_inputs=fanout.make_prompts,
    ideal=overload_ideal,
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
            note="hand-written, Semaphore(64); sleeps the Retry-After, retries until it succeeds",
        ),
        Contender(
            "feste, told the server's cap",
            run_feste_at_server_cap,
            kind="feste",
            note="OpenAI(max_concurrency=8): what a client that knew could do",
        ),
    ),
)
