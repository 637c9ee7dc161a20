"""Connection pools and event loops are released: counted in file descriptors.

A service that builds a backend per request, or computes from short-lived threads,
must not accumulate sockets and loops; code under ``asyncio.run`` must leave no
session open; ``close()``, ``aclose()`` and ``with`` release a backend's pools at a
known moment. Everything runs against the local test server (in this process, so its
sockets count too: a leaked client connection shows twice).
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import warnings

import pytest

import feste
from feste.backend import Cohere, OpenAI
from feste.testing import chat_text, embedding

KEY = "sk-resources-test-0123456789"
TRANSPORTS = ["http", "sdk"]
# Computes per run: a leak of one socket per compute would show as hundreds.
COMPUTES = 600
# Room for sockets the server is still closing and for one retired thread loop.
SLACK = 8

pytestmark = pytest.mark.filterwarnings("ignore:The `__fields__` attribute is deprecated")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def pool_of(backend: OpenAI) -> object:
    """The connection pool or the ``openai.AsyncOpenAI`` of the backend's only transport."""
    (transport,) = backend._transports.values()
    return transport._connections if backend.transport == "http" else transport._client


def is_closed(pool) -> bool:
    return pool.closed if hasattr(pool, "closed") else pool.is_closed()


def test_computes_from_short_lived_threads_keep_descriptors_flat(llm_server):
    answers: list[str] = []

    def one_compute(text: str) -> None:
        llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
        answers.append(feste.compute(llm.chat(text))[0])

    def in_fresh_threads(count: int) -> None:
        for index in range(count):
            thread = threading.Thread(target=one_compute, args=(f"q{index}",))
            thread.start()
            thread.join()

    in_fresh_threads(10)  # imports, the server's first connections
    before = open_descriptors()
    in_fresh_threads(COMPUTES)
    after = open_descriptors()

    assert after - before <= SLACK
    assert len(answers) == COMPUTES + 10
    assert answers[-1] == chat_text("gpt-4o-mini", f"q{COMPUTES - 1}")
    assert llm_server.stats()["requests"] == COMPUTES + 10


@pytest.mark.parametrize(("transport", "computes"), [("http", COMPUTES), ("sdk", 150)])
def test_a_backend_per_compute_keeps_descriptors_flat(llm_server, transport, computes):
    # The official clients are slow to build, so fewer rounds: a leak of one socket
    # each would still show as 150 descriptors or more.
    def one_compute(text: str) -> str:
        llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url, transport=transport)
        return feste.compute(llm.chat(text))[0]

    for index in range(5):
        one_compute(f"warm {index}")
    before = open_descriptors()
    answers = [one_compute(f"q{index}") for index in range(computes)]
    after = open_descriptors()

    assert after - before <= SLACK
    assert answers[-1] == chat_text("gpt-4o-mini", f"q{computes - 1}")
    assert llm_server.stats()["requests"] == computes + 5


def test_a_dropped_backend_closes_its_pool_when_its_loop_next_runs(llm_server):
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    feste.compute(llm.chat("first"))
    session = pool_of(llm)
    del llm  # the last reference: no cycle keeps the transport alive
    assert not session.closed  # this thread's loop is idle until the next compute

    other = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    assert feste.compute(other.chat("second")) == (chat_text("gpt-4o-mini", "second"),)

    assert session.closed


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_compute_async_under_asyncio_run_leaves_no_open_session(llm_server, transport, caplog):
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url, transport=transport)
    co = Cohere(api_key=KEY, base_url=llm_server.cohere_base_url, transport=transport)
    pools = []

    async def main() -> tuple:
        results = await feste.compute_async(llm.chat("hi"), co.embed("doc"))
        pools.append(pool_of(llm))
        assert len(co._transports) == 1
        return results

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = asyncio.run(main())
        del main
        gc.collect()

    assert results == (chat_text("gpt-4o-mini", "hi"), embedding("embed-v4.0", "doc"))
    assert all(is_closed(pool) for pool in pools)
    assert llm._transports == {} and co._transports == {}
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []
    assert not [r for r in caplog.records if "Unclosed" in r.getMessage()]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_with_closes_the_backends_pools(llm_server, transport):
    with OpenAI(api_key=KEY, base_url=llm_server.openai_base_url, transport=transport) as llm:
        assert feste.compute(llm.chat("a")) == (chat_text("gpt-4o-mini", "a"),)
        pool = pool_of(llm)
        assert not is_closed(pool)
    assert is_closed(pool)
    assert llm._transports == {}

    # Closing does not retire the backend: the next call opens a new pool.
    assert feste.compute(llm.chat("b")) == (chat_text("gpt-4o-mini", "b"),)
    assert pool_of(llm) is not pool
    llm.close()
    assert llm_server.stats()["requests"] == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_async_with_closes_the_backends_pools(llm_server, transport):
    async def main():
        base_url = llm_server.openai_base_url
        async with OpenAI(api_key=KEY, base_url=base_url, transport=transport) as llm:
            vector = (await feste.compute_async(llm.embed("x")))[0]
            pool = pool_of(llm)
            assert not is_closed(pool)
        # Closed before asyncio.run shuts the loop down: aclose() waited for it.
        assert is_closed(pool)
        return vector, llm

    vector, llm = asyncio.run(main())
    assert vector == embedding("text-embedding-3-small", "x")
    assert llm._transports == {}


def test_close_reaches_pools_on_loops_of_other_threads(llm_server):
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        answer = asyncio.run_coroutine_threadsafe(
            feste.compute_async(llm.chat("there")), loop
        ).result(30)
        session = pool_of(llm)
        llm.close()  # waits for the close on the loop that runs in the other thread
        assert session.closed
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    assert answer == (chat_text("gpt-4o-mini", "there"),)
    assert llm._transports == {}
