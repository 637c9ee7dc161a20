"""Fan-out: N independent chat calls under a server concurrency cap.

The simplest shape there is, and the one where the client's concurrency decides
everything: the server answers each request after ``latency`` seconds and refuses
(429) anything beyond ``max_concurrency`` requests at once. Every contender is held to
the same 64 requests in flight.

Ideal: with every slot busy all the time, ``ceil(N / 64)`` waves of ``latency`` each.

The contender functions here are reused by the faults, random_429 and overload
workloads, which run the same calls with injected errors or a tighter server; they
read the retry budget from ``job.settings`` (``run_feste_default_settings`` leaves
feste's retry options at their defaults).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import dask
import openai

from benchmarks.harness import (
    GRAPH_BUILT,
    SETUP_MARK,
    Contender,
    Ideal,
    Job,
    Size,
    Workload,
    ceil_div,
)
from benchmarks.peers import (
    CHAT_MODEL,
    aiohttp_session,
    gather_limited,
    openai_client,
    pool_map,
    post_json,
    run_on_process_loop,
    worker_clients,
)

__all__ = [
    "CONTENDERS",
    "WORKLOAD",
    "check_chat",
    "fanout_ideal",
    "make_prompts",
    "run_asyncio",
    "run_feste",
    "run_feste_default_settings",
    "run_openai_async",
]

CONCURRENCY = 64
SETTINGS = {"concurrency": CONCURRENCY, "max_retries": 2}
SLOW_PEER_SUBSET = Size(full=100, quick=20)


def make_prompts(n: int) -> list[str]:
    return [f"Question {index}: what is {index} squared?" for index in range(n)]


def check_chat(inputs: list[str], outputs: Any) -> str | None:
    from feste.testing import chat_text

    outputs = list(outputs)
    if len(outputs) != len(inputs):
        return f"{len(outputs)} answers for {len(inputs)} prompts"
    for index, (prompt, answer) in enumerate(zip(inputs, outputs)):
        expected = chat_text(CHAT_MODEL, prompt)
        if answer != expected:
            return f"answer {index} is {answer!r}, expected {expected!r}"
    return None


def fanout_ideal(n: int, server: Mapping[str, Any]) -> Ideal:
    latency = server["latency"] + server["latency_per_item"]
    cap = server["max_concurrency"]
    waves = ceil_div(n, cap)
    return Ideal(
        seconds=waves * latency,
        formula=f"ceil({n} / {cap}) waves x {latency * 1000:g} ms",
        requests=n,
    )


# -- feste ------------------------------------------------------------------------------


def feste_chat_calls(job: Job) -> list[Any]:
    """The fan-out's lazy chat calls through feste; the graph is built when this returns
    (also used by the workloads that reuse the fan-out's calls)."""
    from feste.backend import OpenAI

    llm = OpenAI(
        base_url=job.openai_base_url,
        api_key=job.api_key,
        model=CHAT_MODEL,
        max_concurrency=job.settings["concurrency"],
    )
    answers = [llm.chat(prompt) for prompt in job.inputs]
    job.mark(GRAPH_BUILT)
    return answers


def run_feste(job: Job) -> list[str]:
    import feste

    answers = feste_chat_calls(job)
    with feste.context.set(max_retries=job.settings["max_retries"]):
        (values,) = feste.compute(answers)
    return list(values)


def run_feste_default_settings(job: Job) -> list[str]:
    """The same calls with every retry and limit option left at feste's defaults."""
    import feste

    (values,) = feste.compute(feste_chat_calls(job))
    return list(values)


# -- peers ------------------------------------------------------------------------------


def run_asyncio(job: Job) -> list[str]:
    """Hand-written: one aiohttp session, a semaphore, ``asyncio.gather``."""
    url = job.openai_base_url + "/chat/completions"
    max_retries = job.settings["max_retries"]

    async def main() -> list[str]:
        async with aiohttp_session(job) as session:

            async def ask(prompt: str) -> str:
                payload = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": prompt}]}
                body = await post_json(session, url, payload, max_retries)
                return str(body["choices"][0]["message"]["content"])

            return await gather_limited(job.settings["concurrency"], ask, job.inputs)

    return asyncio.run(main())


def run_openai_async(job: Job) -> list[str]:
    """Hand-written with the official async client: a semaphore, ``asyncio.gather``;
    the client's own ``max_retries`` (it honours the server's retry-after headers)."""

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(
            base_url=job.openai_base_url,
            api_key=job.api_key,
            max_retries=int(job.settings["max_retries"]),
        )
        async with client:

            async def ask(prompt: str) -> str:
                completion = await client.chat.completions.create(
                    model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}]
                )
                return str(completion.choices[0].message.content)

            return await gather_limited(job.settings["concurrency"], ask, job.inputs)

    return asyncio.run(main())


def _dask_threads(job: Job, num_workers: int | None) -> list[str]:
    client = openai_client(job)
    job.mark(SETUP_MARK)

    @dask.delayed
    def ask(prompt: str) -> str:
        completion = client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}]
        )
        return str(completion.choices[0].message.content)

    answers = [ask(prompt) for prompt in job.inputs]
    return list(dask.compute(*answers, scheduler="threads", num_workers=num_workers))


def run_dask_default(job: Job) -> list[str]:
    return _dask_threads(job, None)


def run_dask_64(job: Job) -> list[str]:
    return _dask_threads(job, job.settings["concurrency"])


def _pool_ask(prompt: str) -> str:
    client, _, _ = worker_clients()
    completion = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}]
    )
    return str(completion.choices[0].message.content)


def run_pool(job: Job) -> list[str]:
    return pool_map(job, _pool_ask)


def run_langchain(job: Job) -> list[str]:
    from langchain_core.runnables import RunnableConfig
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    llm = ChatOpenAI(
        model=CHAT_MODEL,
        base_url=job.openai_base_url,
        api_key=SecretStr(job.api_key),
        max_retries=job.settings["max_retries"],
    )
    config: RunnableConfig = {"max_concurrency": job.settings["concurrency"]}
    messages = run_on_process_loop(llm.abatch(job.inputs, config=config))
    return [str(message.content) for message in messages]


CONTENDERS = (
    Contender("feste", run_feste, kind="feste"),
    Contender(
        "asyncio.gather + semaphore (aiohttp)",
        run_asyncio,
        note="hand-written; the practical limit",
    ),
    Contender("dask.delayed threads, 64 workers", run_dask_64, note="official openai client"),
    Contender(
        "dask.delayed threads, default workers",
        run_dask_default,
        note="official openai client, num_workers = cores",
        subset=SLOW_PEER_SUBSET,
    ),
    Contender(
        "multiprocessing.Pool(cpu_count)",
        run_pool,
        note="original feste design",
        subset=SLOW_PEER_SUBSET,
        spawns_processes=True,
    ),
    Contender(
        "LangChain ChatOpenAI.abatch",
        run_langchain,
        note="max_concurrency=64",
        requires=("langchain_openai",),
    ),
)

WORKLOAD = Workload(
    name="fanout",
    title="fan-out: independent chat calls",
    description=(
        "N independent OpenAI chat calls; the server answers after 50 ms and allows "
        "64 requests at once (more get 429)."
    ),
    size=Size(full=2000, quick=100),
    server={"latency": 0.05, "max_concurrency": CONCURRENCY},
    settings=SETTINGS,
    make_inputs=make_prompts,
    ideal=fanout_ideal,
    check=check_chat,
    contenders=CONTENDERS,
)
