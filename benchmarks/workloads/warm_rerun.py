"""Warm re-run: the same 10,000 chat calls computed again with a result cache.

The first run of a job pays for every request; a re-run of the same graph (a
notebook re-executed, a script restarted after a crash, a prompt iteration that left
most calls unchanged) should pay only for what changed. Here nothing changed: a warm
re-run should send no request at all and take a small fraction of the cold time.

Rows (each in a fresh process; "warm" rows fill their cache in an untimed first run):

* ``feste``: the warm re-run with a SQLite cache (``cache="...db"``): 0 requests;
* ``feste, cold run, SQLite cache``: the first run into an empty cache, against
* ``feste, no cache``: the same run without one (the difference is the cache's
  overhead on a cold run: a lookup and a durable write per call, in bulk);
* LangChain's SQLite LLM cache (``langchain_community.cache.SQLiteCache`` set with
  ``set_llm_cache``) with ``ChatOpenAI.abatch``: warm re-run and cold run.

Ideal: a warm re-run needs no request, so no time (the ideal is 0, like the scheduler
overhead workload's); a cold run needs ``ceil(N / 64)`` waves of 50 ms.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

from benchmarks.harness import Contender, Ideal, Job, Size, Workload, ceil_div
from benchmarks.peers import CHAT_MODEL, run_on_process_loop
from benchmarks.workloads.fanout import check_chat, feste_chat_calls

__all__ = ["WORKLOAD"]

CONCURRENCY = 64
SETTINGS = {"concurrency": CONCURRENCY, "max_retries": 2}

# One cache file per benchmark process (each row runs in its own forked process):
# the warm-up, the untimed first run and the timed re-run of a row share it.
_warm_caches: dict[str, str] = {}


def make_prompts(n: int) -> list[str]:
    return [f"Re-run question {index}: what is {index} plus {index}?" for index in range(n)]


def warm_ideal(n: int, server: Mapping[str, Any]) -> Ideal:
    latency = server["latency"]
    cold = ceil_div(n, server["max_concurrency"]) * latency
    return Ideal(
        seconds=0.0,
        formula=(
            f"warm: 0 requests, no waiting; a cold run: ceil({n} / "
            f"{server['max_concurrency']}) waves x {latency * 1000:g} ms = {cold:.2f} s"
        ),
        requests=0,
    )


def _new_cache_file(kind: str) -> str:
    folder = tempfile.mkdtemp(prefix=f"feste-bench-{kind}-")
    return os.path.join(folder, "cache.db")


def _warm_cache(kind: str) -> str:
    path = _warm_caches.get(kind)
    if path is None:
        path = _warm_caches[kind] = _new_cache_file(kind)
    return path


# -- feste ------------------------------------------------------------------------------


def _feste(job: Job, cache: Any) -> list[str]:
    import feste

    answers = feste_chat_calls(job)
    with feste.context.set(max_retries=job.settings["max_retries"]):
        (values,) = feste.compute(answers, cache=cache)
    return list(values)


def run_feste_warm(job: Job) -> list[str]:
    return _feste(job, _warm_cache("feste"))


def run_feste_cold(job: Job) -> list[str]:
    return _feste(job, _new_cache_file("feste-cold"))


def run_feste_uncached(job: Job) -> list[str]:
    return _feste(job, False)


# -- LangChain --------------------------------------------------------------------------


def _langchain(job: Job, cache_path: str) -> list[str]:
    from langchain_community.cache import SQLiteCache
    from langchain_core.globals import set_llm_cache
    from langchain_core.runnables import RunnableConfig
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    set_llm_cache(SQLiteCache(database_path=cache_path))
    llm = ChatOpenAI(
        model=CHAT_MODEL,
        base_url=job.openai_base_url,
        api_key=SecretStr(job.api_key),
        max_retries=job.settings["max_retries"],
    )
    config: RunnableConfig = {"max_concurrency": job.settings["concurrency"]}
    messages = run_on_process_loop(llm.abatch(job.inputs, config=config))
    return [str(message.content) for message in messages]


def run_langchain_warm(job: Job) -> list[str]:
    return _langchain(job, _warm_cache("langchain"))


def run_langchain_cold(job: Job) -> list[str]:
    return _langchain(job, _new_cache_file("langchain-cold"))


LANGCHAIN = ("langchain_openai", "langchain_community")

WORKLOAD = Workload(
    name="warm_rerun",
    title="warm re-run: the same chat calls again, with a result cache",
    description=(
        "N OpenAI chat calls (50 ms each, 64 at once), computed once untimed, then again "
        "with the cache filled: the warm re-run should send no request. Cold rows show "
        "the first run, with and without the cache."
    ),
    size=Size(full=10_000, quick=200),
    server={"latency": 0.05, "max_concurrency": CONCURRENCY},
    settings=SETTINGS,
    make_inputs=make_prompts,
    ideal=warm_ideal,
    check=check_chat,
    contenders=(
        Contender(
            "feste",
            run_feste_warm,
            kind="feste",
            note="warm re-run, SQLite cache",
            prepare=run_feste_warm,
        ),
        Contender(
            "feste, cold run, SQLite cache",
            run_feste_cold,
            kind="feste",
            note="first run into an empty cache",
        ),
        Contender("feste, no cache", run_feste_uncached, kind="feste", note="cold, no cache"),
        Contender(
            "LangChain ChatOpenAI.abatch + SQLiteCache",
            run_langchain_warm,
            note="warm re-run, langchain_community SQLiteCache",
            requires=LANGCHAIN,
            prepare=run_langchain_warm,
        ),
        Contender(
            "LangChain ChatOpenAI.abatch + SQLiteCache, cold run",
            run_langchain_cold,
            note="first run into an empty cache",
            requires=LANGCHAIN,
        ),
    ),
    time_cap=180.0,
)
