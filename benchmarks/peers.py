"""What the peers share: clients built the way their users build them, and small helpers.

Design: every peer talks to the local server with its own tool's ordinary client (the
official ``openai`` and ``cohere`` clients, one ``aiohttp`` session, LangChain's
``ChatOpenAI``), and retries with that tool's own retry setting: the official
clients' ``max_retries``, LangChain's ``max_retries`` (handed to the openai client),
and for hand-written asyncio a short retry loop such as its users write (Retry-After
when the server sends it, else exponential backoff with jitter). Workload modules
compose these into one small function per peer.

The multiprocessing pool imitates feste's original design: one worker per core, each
with its own synchronous client (made once per worker by the pool initializer), and
``pool.map`` over the inputs. Its worker functions live at module level so the pool
can find them.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import cohere
import openai

from benchmarks.harness import SETUP_MARK, Job

__all__ = [
    "CHAT_MODEL",
    "COHERE_EMBED_MODEL",
    "EMBED_MODEL",
    "aiohttp_session",
    "chunks",
    "cohere_client",
    "gather_limited",
    "openai_client",
    "pool_map",
    "post_json",
    "post_json_freeing_slot",
    "run_on_process_loop",
    "worker_clients",
]

CHAT_MODEL = "gpt-4o-mini"
EMBED_MODEL = "text-embedding-3-small"
COHERE_EMBED_MODEL = "embed-english-v3.0"


def openai_client(job: Job) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=job.openai_base_url,
        api_key=job.api_key,
        max_retries=int(job.settings.get("max_retries", 2)),
    )


def cohere_client(job: Job) -> cohere.ClientV2:
    return cohere.ClientV2(
        api_key=job.api_key,
        base_url=job.cohere_base_url,
        max_retries=int(job.settings.get("max_retries", 2)),
    )


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


# -- hand-written asyncio -------------------------------------------------------------


def aiohttp_session(job: Job) -> aiohttp.ClientSession:
    limit = int(job.settings.get("concurrency", 64))
    return aiohttp.ClientSession(
        # One connection pool per server (host and port), each as large as the semaphore.
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=limit),
        headers={"Authorization": f"Bearer {job.api_key}"},
    )


async def post_json(
    session: aiohttp.ClientSession, url: str, payload: dict[str, Any], max_retries: int
) -> Any:
    """POST and decode; retry 429 and 5xx (Retry-After if given, else backoff)."""
    attempt = 0
    while True:
        async with session.post(url, json=payload) as response:
            if response.status < 400:
                return await response.json()
            retryable = response.status == 429 or response.status >= 500
            if not retryable or attempt >= max_retries:
                response.raise_for_status()
            retry_after = response.headers.get("Retry-After")
        attempt += 1
        await asyncio.sleep(_retry_delay(retry_after, attempt))


def _retry_delay(retry_after: str | None, attempt: int) -> float:
    """The server's Retry-After, else exponential backoff with full jitter."""
    if retry_after is not None:
        return float(retry_after)
    return random.uniform(0, 0.5 * 2 ** (attempt - 1))


async def post_json_freeing_slot(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    max_retries: int,
    slots: asyncio.Semaphore,
) -> Any:
    """Like :func:`post_json`, but holding one of ``slots`` only while a request is out:
    the waits between attempts leave the slot to other calls."""
    attempt = 0
    while True:
        async with slots, session.post(url, json=payload) as response:
            if response.status < 400:
                return await response.json()
            retryable = response.status == 429 or response.status >= 500
            if not retryable or attempt >= max_retries:
                response.raise_for_status()
            retry_after = response.headers.get("Retry-After")
        attempt += 1
        await asyncio.sleep(_retry_delay(retry_after, attempt))


async def gather_limited(
    limit: int, make: Callable[[Any], Awaitable[Any]], items: Sequence[Any]
) -> list[Any]:
    """``asyncio.gather`` over ``items`` with at most ``limit`` coroutines running."""
    semaphore = asyncio.Semaphore(limit)

    async def one(item: Any) -> Any:
        async with semaphore:
            return await make(item)

    return await asyncio.gather(*(one(item) for item in items))


# -- LangChain ----------------------------------------------------------------------

_process_loop: asyncio.AbstractEventLoop | None = None


def run_on_process_loop(coroutine: Awaitable[Any]) -> Any:
    """Run ``coroutine`` on one event loop kept for the whole process.

    LangChain caches its async HTTP clients per process, bound to the loop that first
    used them; like an application with one loop, the LangChain peers never close it.
    """
    global _process_loop
    if _process_loop is None:
        _process_loop = asyncio.new_event_loop()
    return _process_loop.run_until_complete(coroutine)


# -- the multiprocessing pool ---------------------------------------------------------

_worker_openai: openai.OpenAI | None = None
_worker_cohere: cohere.ClientV2 | None = None
_worker_settings: dict[str, Any] = {}


def _pool_initializer(openai_base_url: str, cohere_base_url: str, api_key: str, settings: Any):
    global _worker_openai, _worker_cohere, _worker_settings
    _worker_settings = dict(settings)
    max_retries = int(_worker_settings.get("max_retries", 2))
    _worker_openai = openai.OpenAI(
        base_url=openai_base_url, api_key=api_key, max_retries=max_retries
    )
    _worker_cohere = cohere.ClientV2(
        api_key=api_key, base_url=cohere_base_url, max_retries=max_retries
    )


def worker_clients() -> tuple[openai.OpenAI, cohere.ClientV2, dict[str, Any]]:
    """The pool worker's own clients (made by the initializer)."""
    assert _worker_openai is not None and _worker_cohere is not None
    return _worker_openai, _worker_cohere, _worker_settings


def pool_map(job: Job, function: Callable[[Any], Any]) -> list[Any]:
    """``Pool(os.cpu_count()).map(function, job.inputs)`` with per-worker clients."""
    import multiprocessing

    initargs = (job.openai_base_url, job.cohere_base_url, job.api_key, dict(job.settings))
    with multiprocessing.Pool(
        os.cpu_count(), initializer=_pool_initializer, initargs=initargs
    ) as pool:
        # Wait for every worker to be up: their start-up is a fixed cost, not per input.
        pool.map(_ready, range(os.cpu_count() or 1), chunksize=1)
        job.mark(SETUP_MARK)
        return pool.map(function, job.inputs)


def _ready(_: int) -> bool:
    return True
