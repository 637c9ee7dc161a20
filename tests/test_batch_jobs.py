"""Calls sent through the provider Batch API inside ordinary graphs, on both transports.

Everything is counted at the local test server: jobs created, files uploaded, lines
answered, online requests by route.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import openai as sdk
import psycopg
import pytest

import feste
from feste.backend.cohere import Cohere
from feste.backend.openai import OpenAI
from feste.backend.transports import SDKTransport
from feste.cache.base import SCHEMA_VERSION
from feste.cache.postgres import PostgresStore
from feste.cache.sqlite import SQLiteStore
from feste.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    Failure,
    MalformedResponseError,
)
from feste.testing import TestServer, chat_text, embedding, wait_until

pytestmark = pytest.mark.slow

TRANSPORTS = ["http", "sdk"]
CHAT = "gpt-4o-mini"
EMBED = "text-embedding-3-small"
FAST = {"batch_api_poll": 0.02, "batch_api_window": 0.05}


def openai(server: TestServer, transport: str, **settings: Any) -> OpenAI:
    return OpenAI(
        api_key="sk-test", base_url=server.openai_base_url, transport=transport, **settings
    )


def answer(text: str) -> str:
    return chat_text(CHAT, text)


@pytest.fixture
def server(llm_server_factory: Callable[..., TestServer]) -> TestServer:
    return llm_server_factory(batch_completion_delay=0.05)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_online_and_batch_stages_feed_each_other(server: TestServer, transport: str) -> None:
    llm = openai(server, transport, batch_api=True)
    online_chats = [llm.chat(f"online {i}", batch_api=False) for i in range(3)]
    batch_embeds = [llm.embed(chat) for chat in online_chats]
    batch_chats = [llm.chat(f"batch {i}") for i in range(3)]
    online_embeds = [llm.embed(chat, batch_api=False) for chat in batch_chats]

    results = feste.compute(online_chats, batch_embeds, batch_chats, online_embeds, **FAST)

    online_answers = [answer(f"online {i}") for i in range(3)]
    batch_answers = [answer(f"batch {i}") for i in range(3)]
    assert list(results[0]) == online_answers
    assert list(results[1]) == [embedding(EMBED, text, 8) for text in online_answers]
    assert list(results[2]) == batch_answers
    assert list(results[3]) == [embedding(EMBED, text, 8) for text in batch_answers]
    stats = server.stats()
    # One job per endpoint: the three batch chats, and the embeddings (one request).
    assert stats["batches"]["jobs_created"] == 2
    assert stats["batches"]["files_uploaded"] == 2
    assert stats["batches"]["lines_answered"] == 4
    assert stats["by_route"]["/v1/chat/completions"] == 3
    assert stats["by_route"]["/v1/embeddings"] == 1


@pytest.mark.parametrize("where", ["option", "backend"])
def test_batch_calls_are_not_held_to_the_concurrency_limit(server: TestServer, where: str) -> None:
    # A job is not a connection: 300 calls with max_concurrency=8 still go in one job.
    routing = {"batch_api": True}
    llm = openai(server, "http", max_concurrency=8, **(routing if where == "backend" else {}))
    calls = [llm.chat(f"many {index}") for index in range(300)]

    (values,) = feste.compute(calls, **(routing if where == "option" else {}), **FAST)

    assert values == [answer(f"many {index}") for index in range(300)]
    batches = server.stats()["batches"]
    assert (batches["jobs_created"], batches["lines_answered"]) == (1, 300)


def test_the_batch_api_option_routes_eligible_calls_and_leaves_cohere_online(
    server: TestServer,
) -> None:
    llm = openai(server, "http")
    cohere = Cohere(api_key="sk-test", base_url=server.cohere_base_url)
    calls = [llm.chat("a"), llm.chat("b"), cohere.chat("c")]

    results = feste.compute(calls, batch_api=True, **FAST)

    assert results[0][:2] == [answer("a"), answer("b")]
    stats = server.stats()
    assert stats["batches"]["lines_answered"] == 2
    assert stats["by_route"]["/v2/chat"] == 1
    assert "/v1/chat/completions" not in stats["by_route"]


def test_cohere_refuses_an_explicit_batch_api(server: TestServer) -> None:
    cohere = Cohere(api_key="sk-test", base_url=server.cohere_base_url)

    with pytest.raises(ConfigurationError, match=r"Cohere.chat does not take batch_api=.*Batch"):
        cohere.chat("c", batch_api=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_error_file_items_fail_alone(server: TestServer, transport: str) -> None:
    llm = openai(server, transport, batch_api=True)
    chats = [llm.chat("fine"), llm.chat("bad [[status:400]]")]
    embeds = [llm.embed(text) for text in ("a", "b [[status:400]]", "c")]

    chat_results, embed_results = feste.compute(chats, embeds, errors="return", **FAST)

    assert chat_results[0] == answer("fine")
    failure = chat_results[1]
    assert isinstance(failure, Failure)
    assert isinstance(failure.exception, BadRequestError)
    assert "HTTP 400: Injected error 400 triggered by input[0]" in str(failure.exception)
    assert embed_results[0] == embedding(EMBED, "a", 8)
    assert embed_results[2] == embedding(EMBED, "c", 8)
    assert isinstance(embed_results[1], Failure)
    assert "triggered by input[1]" in str(embed_results[1].exception)
    # The embeddings' one request failed on its bad item; the others went again alone.
    assert server.stats()["batches"]["lines_failed"] == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_expired_jobs_items_are_resubmitted(server: TestServer, transport: str) -> None:
    server.configure(batch_expire_jobs=1)
    llm = openai(server, transport, batch_api=True)

    (results,) = feste.compute([llm.chat(f"q{i}") for i in range(3)], **FAST)

    assert list(results) == [answer(f"q{i}") for i in range(3)]
    stats = server.stats()
    assert stats["batches"]["jobs_expired"] == 1
    assert stats["batches"]["jobs_created"] == 2
    assert "/v1/chat/completions" not in stats["by_route"]


def test_an_expired_job_can_fall_back_to_online_calls(server: TestServer) -> None:
    server.configure(batch_expire_jobs=1)
    llm = openai(server, "http", batch_api=True)

    (results,) = feste.compute(
        [llm.chat(f"q{i}") for i in range(3)], batch_api_on_expiry="online", **FAST
    )

    assert list(results) == [answer(f"q{i}") for i in range(3)]
    stats = server.stats()
    assert stats["batches"]["jobs_created"] == 1
    assert stats["by_route"]["/v1/chat/completions"] == 3


def test_a_malformed_output_line_names_the_job_and_line(server: TestServer) -> None:
    llm = openai(server, "http", batch_api=True)

    (result,) = feste.compute([llm.chat("[[malformed]]")], errors="return", **FAST)[0]

    assert isinstance(result, Failure)
    assert isinstance(result.exception, MalformedResponseError)
    assert "line 1 of its output file" in str(result.exception)
    assert "batch job batch_" in str(result.exception)


def test_jobs_are_split_at_the_job_limits(server: TestServer) -> None:
    llm = openai(server, "http", batch_api=True)

    (results,) = feste.compute(
        [llm.chat(f"q{i}") for i in range(5)], batch_api_job_limits={"requests": 2}, **FAST
    )

    assert list(results) == [answer(f"q{i}") for i in range(5)]
    assert server.stats()["batches"]["jobs_created"] == 3


def test_cached_batch_answers_are_not_sent_again(server: TestServer, tmp_path: Any) -> None:
    llm = openai(server, "http", batch_api=True)
    cache = str(tmp_path / "cache.sqlite")
    calls = [llm.chat(f"q{i}") for i in range(3)]

    (first,) = feste.compute(calls, cache=cache, **FAST)
    (online_rerun,) = feste.compute(
        [llm.chat(f"q{i}", batch_api=False) for i in range(3)], cache=cache, **FAST
    )

    assert list(first) == list(online_rerun) == [answer(f"q{i}") for i in range(3)]
    stats = server.stats()
    # batch_api is not part of a cache key: the online calls were cache hits.
    assert stats["batches"]["jobs_created"] == 1
    assert "/v1/chat/completions" not in stats["by_route"]


def test_invalid_job_limits_are_refused() -> None:
    with (
        pytest.raises(feste.errors.OptionError, match="unknown limit 'files'"),
        feste.context.set(batch_api_job_limits={"files": 2}),
    ):
        pass


CHILD = textwrap.dedent(
    """
    import sys
    import feste
    from feste.backend.openai import OpenAI

    url, transport, cache = sys.argv[1:4]
    llm = OpenAI(api_key="sk-test", base_url=url, transport=transport, batch_api=True)
    calls = [llm.chat(f"q{i}") for i in range(4)]
    feste.compute(calls, cache=cache, run="resume", batch_api_poll=0.02, batch_api_window=0.05)
    """
)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_killed_run_reattaches_to_its_job(
    llm_server_factory: Callable[..., TestServer], transport: str, tmp_path: Any
) -> None:
    server = llm_server_factory(batch_completion_delay=3600)
    cache = str(tmp_path / "cache.sqlite")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, server.openai_base_url, transport, cache],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        # Polled: the job was created and saved (it is saved before its first poll).
        assert wait_until(
            lambda: server.stats()["by_route"].get("/v1/batches/{batch_id}", 0) >= 1, timeout=60
        )
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    server.configure(batch_completion_delay=0)
    llm = openai(server, transport, batch_api=True)

    (results,) = feste.compute(
        [llm.chat(f"q{i}") for i in range(4)], cache=cache, run="resume", **FAST
    )

    assert list(results) == [answer(f"q{i}") for i in range(4)]
    stats = server.stats()
    assert stats["batches"]["jobs_created"] == 1
    assert stats["batches"]["files_uploaded"] == 1
    assert stats["batches"]["lines_answered"] == 4
    assert "/v1/chat/completions" not in stats["by_route"]


def test_explain_and_usage_show_batch_calls_at_batch_prices(server: TestServer) -> None:
    llm = openai(server, "http", batch_api=True)
    calls = [llm.chat(f"q{i}", max_tokens=10) for i in range(4)] + [
        llm.chat("online", max_tokens=10, batch_api=False)
    ]

    plan = feste.explain(calls)
    with feste.record_usage() as usage:
        feste.compute(calls, **FAST)

    assert plan.batch_api == {"openai.chat": 4}
    assert "4 through Batch API jobs at batch prices" in str(plan)
    batched = [record for record in usage.records if record.batch]
    online = [record for record in usage.records if not record.batch]
    assert len(batched) == 4
    assert len(online) == 1
    prices = feste.backend.prices.price_table().price("openai", CHAT)
    assert prices is not None and prices.batch_input is not None
    for record in batched:
        assert record.cost == pytest.approx(
            (
                record.prompt_tokens * prices.batch_input
                + record.completion_tokens * prices.batch_output
            )
            / 1_000_000
        )
    billed = server.stats()["billed"][CHAT]
    assert sum(record.prompt_tokens for record in usage.records) == billed["prompt_tokens"]
    assert sum(record.completion_tokens for record in usage.records) == billed["completion_tokens"]


# -- the stores' batch jobs table -----------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request: Any, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "cache.db")
    return str(request.getfixturevalue("postgres_url"))


def store_at(location: str) -> Any:
    if location.startswith("postgresql://"):
        return PostgresStore(location)
    return SQLiteStore(location)


def test_stores_keep_batch_jobs_per_run(store_location: str) -> None:
    store = store_at(store_location)
    store.save_batch_job("nightly", "batch_1", {"job_id": "batch_1", "custom_ids": ["a"]})
    store.save_batch_job("nightly", "batch_2", {"job_id": "batch_2", "custom_ids": ["b"]})
    store.save_batch_job("nightly", "batch_1", {"job_id": "batch_1", "status": "completed"})
    store.save_batch_job("", "batch_3", {"job_id": "batch_3"})
    store.save_run({"name": "nightly", "status": "failed", "started": 1.0})

    assert store.batch_jobs("nightly") == [
        {"job_id": "batch_1", "status": "completed"},
        {"job_id": "batch_2", "custom_ids": ["b"]},
    ]
    assert store.batch_jobs("") == [{"job_id": "batch_3"}]
    assert store.delete_run("nightly") is True
    assert store.batch_jobs("nightly") == []
    assert store.prune(-1.0) == 0  # no results; the old job records go too
    assert store.batch_jobs("") == []
    store.save_batch_job("", "batch_4", {"job_id": "batch_4"})
    assert store.clear() == 0
    assert store.batch_jobs("") == []


def execute(location: str, statement: str) -> Any:
    """Run SQL on the store's database behind its back; the first row it returns."""
    if location.startswith("postgresql://"):
        with psycopg.connect(location, autocommit=True) as connection:
            cursor = connection.execute(statement)
            return cursor.fetchone() if cursor.description is not None else None
    with sqlite3.connect(location) as connection:
        return connection.execute(statement).fetchone()


def test_a_version_1_store_gains_the_batch_jobs_table(store_location: str) -> None:
    store_at(store_location).close()
    execute(store_location, "DROP TABLE feste_batch_jobs")
    execute(store_location, "UPDATE feste_meta SET value = '1' WHERE name = 'schema_version'")

    store = store_at(store_location)
    store.save_batch_job("run", "batch_1", {"job_id": "batch_1"})

    assert store.batch_jobs("run") == [{"job_id": "batch_1"}]
    assert store.stats()["schema_version"] == SCHEMA_VERSION == 2
    (version,) = execute(
        store_location, "SELECT value FROM feste_meta WHERE name = 'schema_version'"
    )
    assert version == "2"
    store.close()


def test_the_progress_bar_shows_each_jobs_state_and_counts(
    server: TestServer, capsys: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # room for the whole line off a terminal
    llm = openai(server, "http", batch_api=True)

    feste.compute([llm.chat(f"q{i}") for i in range(3)], progress=True, **FAST)

    shown = capsys.readouterr().err
    assert re.search(r"job batch_[0-9a-f]+ completed 3/3", shown), shown


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_refused_upload_fails_every_call_of_the_job(
    llm_server_factory: Callable[..., TestServer], transport: str
) -> None:
    server = llm_server_factory(api_key="sk-right")
    llm = OpenAI(
        api_key="sk-wrong", base_url=server.openai_base_url, transport=transport, batch_api=True
    )

    (results,) = feste.compute([llm.chat("a"), llm.chat("b")], errors="return", **FAST)

    assert [type(result.exception) for result in results] == [AuthenticationError] * 2
    assert "HTTP 401: Incorrect API key provided." in str(results[0].exception)
    assert "sk-wrong" not in str(results[0].exception)
    stats = server.stats()
    assert stats["by_route"] == {"/v1/files": 1}
    assert stats["batches"]["jobs_created"] == 0


def test_transports_without_a_batch_api_say_so(server: TestServer) -> None:
    cohere = Cohere(api_key="sk-test", base_url=server.cohere_base_url, transport="sdk")
    transport = SDKTransport(cohere)

    with pytest.raises(ConfigurationError, match=r"cannot send cohere calls through a Batch API"):
        asyncio.run(transport.create_batch("file-1", "/v1/embeddings"))
    assert server.stats()["requests"] == 0


def test_jobs_of_one_model_wait_for_the_token_limit(
    llm_server_factory: Callable[..., TestServer],
) -> None:
    server = llm_server_factory(batch_completion_delay=3600)
    llm = openai(server, "http", batch_api=True)
    # Each call is estimated at its max_tokens (100) plus its prompt: two fit in 250.
    calls = [llm.chat(f"q{i}", max_tokens=100) for i in range(4)]
    outcome: list[Any] = []

    def run() -> None:
        outcome.extend(
            feste.compute(calls, batch_api_job_limits={"tokens": 250}, errors="return", **FAST)
        )

    worker = threading.Thread(target=run)
    worker.start()
    try:
        polls = "/v1/batches/{batch_id}"
        assert wait_until(lambda: server.stats()["by_route"].get(polls, 0) >= 5, timeout=60)
        # The first job holds the budget: the second is not submitted while it runs.
        assert server.stats()["batches"]["jobs_created"] == 1
    finally:
        server.configure(batch_completion_delay=0)
        worker.join(60)

    assert list(outcome[0]) == [answer(f"q{i}") for i in range(4)]
    assert server.stats()["batches"]["jobs_created"] == 2


def test_each_model_gets_its_own_job(server: TestServer) -> None:
    llm = openai(server, "http", batch_api=True)
    calls = [llm.chat("a"), llm.chat("b", model="gpt-4o"), llm.chat("c")]

    (results,) = feste.compute(calls, **FAST)

    assert list(results) == [answer("a"), chat_text("gpt-4o", "b"), answer("c")]
    assert server.stats()["batches"]["jobs_created"] == 2


def test_a_job_cancelled_elsewhere_is_resubmitted(
    llm_server_factory: Callable[..., TestServer],
) -> None:
    server = llm_server_factory(batch_completion_delay=3600)
    llm = openai(server, "http", batch_api=True)
    outcome: list[Any] = []

    def run() -> None:
        outcome.extend(feste.compute([llm.chat(f"q{i}") for i in range(3)], **FAST))

    worker = threading.Thread(target=run)
    worker.start()
    try:
        polls = "/v1/batches/{batch_id}"
        assert wait_until(lambda: server.stats()["by_route"].get(polls, 0) >= 1, timeout=60)
        client = sdk.OpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0)
        (job,) = client.batches.list().data
        client.batches.cancel(job.id)
    finally:
        server.configure(batch_completion_delay=0)
        worker.join(60)

    assert list(outcome[0]) == [answer(f"q{i}") for i in range(3)]
    stats = server.stats()["batches"]
    assert (stats["jobs_cancelled"], stats["jobs_created"]) == (1, 2)
