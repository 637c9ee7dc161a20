"""The result cache against the local OpenAI-compatible server, counted at the server.

Request counts are what the server received (``stats()["requests"]``); texts are what
it answered (``echo(model): prompt``). The store tests run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import feste
from feste import context, feste_task
from feste.backend import OpenAI
from feste.cache import SQLiteStore, call_key, open_store
from feste.cache._codec import decode
from feste.errors import CacheError, OptionError
from feste.testing import TestServer, chat_text, embedding

ROOT = Path(feste.__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
MODEL = "gpt-4o-mini"
EMBED_MODEL = "text-embedding-3-small"
SECRET = "sk-test-5f3a9c0e7b2d4a61"


@pytest.fixture(params=["sqlite", "postgres"])
def store_spec(request: Any, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "cache.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def server(llm_server_factory: Any) -> TestServer:
    return llm_server_factory(latency=0.005)


def openai(server: TestServer, **settings: Any) -> OpenAI:
    return OpenAI(base_url=server.openai_base_url, api_key=SECRET, **settings)


def requests(server: TestServer) -> int:
    return int(server.stats()["requests"])


def sent_prompts(server: TestServer) -> list[str]:
    return [texts[0] for texts in server.stats()["inputs"].get(CHAT, [])]


# -- hits and misses ---------------------------------------------------------------------


def test_a_second_run_sends_nothing(server: TestServer, store_spec: str) -> None:
    llm = openai(server)
    prompts = [f"question {i}" for i in range(20)]

    (first,) = feste.compute([llm.chat(p) for p in prompts], cache=store_spec)
    assert requests(server) == 20
    (second,) = feste.compute([llm.chat(p) for p in prompts], cache=store_spec)

    assert requests(server) == 20
    assert list(second) == list(first) == [chat_text(MODEL, p) for p in prompts]


@pytest.mark.parametrize(
    ("change", "expected_prompt"),
    [
        ("model", "same"),
        ("parameter", "same"),
        ("input", "other"),
        ("base URL", "same"),
    ],
)
def test_each_part_of_the_key_misses_on_change(
    llm_server_factory: Any, store_spec: str, change: str, expected_prompt: str
) -> None:
    server = llm_server_factory()
    other_server = llm_server_factory()
    llm = openai(server)
    (before,) = feste.compute(llm.chat("same", temperature=0.0), cache=store_spec)
    assert before == chat_text(MODEL, "same")
    assert requests(server) == 1

    if change == "model":
        changed = llm.chat("same", temperature=0.0, model="gpt-4.1-nano")
    elif change == "parameter":
        changed = llm.chat("same", temperature=0.5)
    elif change == "input":
        changed = llm.chat("other", temperature=0.0)
    else:
        changed = openai(other_server).chat("same", temperature=0.0)
    feste.compute(changed, cache=store_spec)
    # The unchanged call still hits.
    feste.compute(llm.chat("same", temperature=0.0), cache=store_spec)

    sent = requests(server) + requests(other_server)
    assert sent == 2
    receiver = other_server if change == "base URL" else server
    assert sent_prompts(receiver)[-1] == expected_prompt


def test_a_batched_run_then_single_calls_hit_item_by_item(
    server: TestServer, store_spec: str
) -> None:
    llm = openai(server)
    texts = [f"document {i}" for i in range(300)]

    (batched,) = feste.compute([llm.embed(t) for t in texts[:200]], cache=store_spec)
    assert server.stats()["items_per_request"][EMBEDDINGS] == [200]

    # The same items as single calls (no static batching pass; the sync scheduler
    # sends each call alone), plus 100 new ones.
    (single,) = feste.compute(
        [llm.embed(t) for t in texts], cache=store_spec, optimize_graph=False, scheduler="sync"
    )

    assert requests(server) == 1 + 100
    assert server.stats()["items_per_request"][EMBEDDINGS][1:] == [1] * 100
    assert list(single[:200]) == list(batched)
    assert list(single) == [embedding(EMBED_MODEL, t) for t in texts]

    # And batched again, differently mixed: every item is a hit.
    (again,) = feste.compute([llm.embed(t) for t in reversed(texts)], cache=store_spec)
    assert requests(server) == 101
    assert list(again) == list(reversed(list(single)))

    # A batch partly known: the sender looks its items up and sends only the new ones.
    more = [f"document {i}" for i in range(250, 350)]
    (mixed,) = feste.compute([llm.embed(t) for t in more], cache=store_spec)
    assert requests(server) == 102
    assert server.stats()["items_per_request"][EMBEDDINGS][-1] == 50
    assert list(mixed) == [embedding(EMBED_MODEL, t) for t in more]


def test_hits_never_reach_the_limiter(server: TestServer, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache.db")
    prompts = [f"q{i}" for i in range(40)]
    feste.compute([openai(server).chat(p) for p in prompts], cache=cache)

    # One request a minute: 40 calls through the limiter would take 40 minutes (the
    # test timeout stops that long before); hits take no admission at all.
    slow = openai(server, requests_per_minute=1, max_concurrency=1)
    (values,) = feste.compute([slow.chat(p) for p in prompts], cache=cache)

    assert requests(server) == 40
    assert list(values) == [chat_text(MODEL, p) for p in prompts]


@pytest.mark.parametrize("scheduler", ["sync", "threads", "async", "processes"])
def test_every_scheduler_uses_the_cache(server: TestServer, tmp_path: Path, scheduler: str) -> None:
    cache = str(tmp_path / "cache.db")
    prompts = [f"s{i}" for i in range(6)]
    feste.compute([openai(server).chat(p) for p in prompts], cache=cache, scheduler=scheduler)
    assert requests(server) == 6

    # The store object travels to worker processes and reopens there.
    store = open_store(cache)
    (values,) = feste.compute(
        [openai(server).chat(p) for p in prompts], cache=store, scheduler=scheduler
    )

    assert requests(server) == 6
    assert list(values) == [chat_text(MODEL, p) for p in prompts]


def test_the_environment_variable_turns_the_cache_on(
    server: TestServer, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("FESTE_CACHE", str(tmp_path / "env.db"))
    llm = openai(server)
    feste.compute(llm.chat("hello"))
    feste.compute(llm.chat("hello"))
    assert requests(server) == 1
    assert open_store(tmp_path / "env.db").stats()["entries"] == 1

    # cache=False turns it off for one computation, context.set(cache=False) for a block.
    feste.compute(llm.chat("hello"), cache=False)
    with context.set(cache=False):
        feste.compute(llm.chat("hello"))
    assert requests(server) == 3


def test_a_value_is_stored_before_it_is_handed_on(server: TestServer, store_spec: str) -> None:
    llm = openai(server)
    calls = [llm.chat(f"d{i}") for i in range(10)]
    keys = {
        call.key: call_key(llm, "chat", [{"role": "user", "content": f"d{i}"}], {"model": MODEL})
        for i, call in enumerate(calls)
    }
    store = open_store(store_spec)
    seen_in_store: list[bool] = []

    def on_task_done(key: Any, value: Any) -> None:
        if key in keys:
            seen_in_store.append(keys[key] in store.get_many([keys[key]]))

    feste.compute(calls, cache=store_spec, on_task_done=on_task_done)

    assert seen_in_store == [True] * 10


@feste_task
async def spell(number: int) -> str:
    return f"bulk {number}"


def test_calls_known_before_the_run_are_answered_without_running(
    server: TestServer, tmp_path: Path
) -> None:
    cache = str(tmp_path / "cache.db")
    llm = openai(server)
    feste.compute([llm.chat(f"w{i}") for i in range(5)], cache=cache)
    started: list[Any] = []

    (values,) = feste.compute(
        [llm.chat(f"w{i}") for i in range(5)],
        cache=cache,
        on_task_done=lambda key, value: started.append(key),
    )

    # Answered in one lookup before the graph ran: no call task ran at all.
    assert started == []
    assert list(values) == [chat_text(MODEL, f"w{i}") for i in range(5)]
    assert requests(server) == 5


def test_a_partly_warm_graph_answers_the_stored_calls_and_sends_the_rest(
    server: TestServer, tmp_path: Path
) -> None:
    cache = str(tmp_path / "cache.db")
    llm = openai(server)
    feste.compute([llm.chat(f"p{i}") for i in range(0, 6, 2)], cache=cache)  # p0, p2, p4
    assert requests(server) == 3
    ran: list[Any] = []

    calls = [llm.chat(f"p{i}") for i in range(6)]
    (values,) = feste.compute(calls, cache=cache, on_task_done=lambda key, value: ran.append(key))

    assert list(values) == [chat_text(MODEL, f"p{i}") for i in range(6)]
    assert sorted(ran) == sorted(calls[i].key for i in (1, 3, 5))
    assert requests(server) == 6
    assert sorted(sent_prompts(server)[3:]) == ["p1", "p3", "p5"]


def test_a_warm_run_looks_up_in_bulk(server: TestServer, tmp_path: Path) -> None:
    class CountingStore(SQLiteStore):
        lookups = 0

        def get_many(self, keys: Any) -> dict[str, str]:
            CountingStore.lookups += 1
            return super().get_many(keys)

    store = CountingStore(tmp_path / "cache.db")
    # Prompts made by a task (not cached): the calls are looked up where they are sent.
    # The task is async, so it runs on the loop and the count is the same under load.
    calls = [openai(server).chat(spell(i)) for i in range(1000)]
    feste.compute(calls, cache=store)
    assert requests(server) == 1000
    CountingStore.lookups = 0

    (values,) = feste.compute(calls, cache=store)

    assert requests(server) == 1000
    assert values[999] == chat_text(MODEL, "bulk 999")
    # The start readies 64 async tasks per turn of the loop: the 1,000 calls they make
    # are looked up in one query per turn (16), not one per call.
    assert CountingStore.lookups == 16, CountingStore.lookups


# -- pure=False and runs -------------------------------------------------------------------


def test_impure_calls_replay_within_a_run_and_are_not_shared(
    server: TestServer, store_spec: str
) -> None:
    llm = openai(server)

    def graph() -> list[Any]:
        # Three identical impure calls: each asks for its own answer.
        return [llm.chat("sample", pure=False) for _ in range(3)]

    feste.compute(graph(), cache=store_spec)
    feste.compute(graph(), cache=store_spec)
    assert requests(server) == 6  # outside a named run they are never cached

    feste.compute(graph(), cache=store_spec, run="a")
    assert requests(server) == 9
    feste.compute(graph(), cache=store_spec, run="a")
    assert requests(server) == 9  # the same run replays its three answers
    feste.compute(graph() + graph(), cache=store_spec, run="a")
    assert requests(server) == 12  # three more occurrences than recorded
    feste.compute(graph(), cache=store_spec, run="b")
    assert requests(server) == 15  # another run never sees them

    store = open_store(store_spec)
    assert store.stats()["entries"] == 9
    store.delete_run("a")
    assert store.stats()["entries"] == 3


def test_a_run_records_counts_and_outputs(server: TestServer, store_spec: str) -> None:
    llm = openai(server)
    prompts = [f"r{i}" for i in range(8)]
    feste.compute([llm.chat(p) for p in prompts[:5]], cache=store_spec)
    assert requests(server) == 5

    (values,) = feste.compute(
        {"answers": [llm.chat(p) for p in prompts]}, cache=store_spec, run="nightly"
    )

    store = open_store(store_spec)
    record = store.get_run("nightly")
    assert record is not None
    assert record["status"] == "finished"
    assert record["graph"]["calls"] == {"openai.chat": 8}
    assert (record["cache_hits"], record["calls_sent"], record["requests"]) == (5, 3, 3)
    assert requests(server) == 8
    assert record["failed_requests"] == 0 and record["outputs"] == 8
    assert record["prompt_tokens"] > 0 and record["completion_tokens"] > 0
    assert record["ended"] >= record["started"]
    outputs = store.run_outputs("nightly")
    assert [output.path for output in outputs] == [f"0['answers'][{i}]" for i in range(8)]
    assert [output.text for output in outputs] == list(values["answers"])


def test_a_failed_run_is_recorded_as_failed(server: TestServer, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache.db")
    llm = openai(server)
    calls = [llm.chat("fine"), llm.chat("[[status:400]] broken")]

    with pytest.raises(feste.FesteError):
        feste.compute(calls, cache=cache, run="bad", max_retries=0)
    record = open_store(cache).get_run("bad")
    assert record is not None and record["status"] == "failed"
    assert "BadRequestError" in record["error"]

    (values,) = feste.compute(calls, cache=cache, run="returned", errors="return")
    record = open_store(cache).get_run("returned")
    assert record is not None and record["status"] == "finished"
    assert (record["outputs"], record["failed_outputs"]) == (2, 1)
    assert isinstance(values[1], feste.Failure)


def test_a_run_needs_a_cache(server: TestServer) -> None:
    with pytest.raises(OptionError, match="run='x' is recorded in the cache, and no cache is set"):
        feste.compute(openai(server).chat("hello"), run="x", cache=False)
    assert requests(server) == 0


# -- plain Python tasks ---------------------------------------------------------------------


calls_made: list[str] = []


@feste_task(pure=True)
def shout(text: str) -> str:
    calls_made.append(text)
    return text.upper() + "!"


@feste_task(pure=True)
def as_set(text: str) -> set[str]:
    return set(text)


def test_pure_tasks_are_cached(server: TestServer, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache.db")
    llm = openai(server)
    calls_made.clear()
    answers = [shout(llm.chat(f"t{i}")) for i in range(4)]

    (first,) = feste.compute(answers, cache=cache)
    (second,) = feste.compute(answers, cache=cache, scheduler="threads")

    assert (
        list(first) == list(second) == [chat_text(MODEL, f"t{i}").upper() + "!" for i in range(4)]
    )
    assert len(calls_made) == 4
    assert requests(server) == 4


def test_a_result_that_cannot_be_stored_names_the_task(tmp_path: Path) -> None:
    with pytest.raises(CacheError) as raised:
        feste.compute(as_set("abc"), cache=str(tmp_path / "cache.db"))

    message = str(raised.value)
    assert "the result of feste task as_set cannot be stored" in message
    assert "set at the result cannot be stored as JSON" in message
    assert "as_set-" in message  # the task key


# -- secrets ----------------------------------------------------------------------------------


def test_no_api_key_in_the_database(server: TestServer, store_spec: str) -> None:
    llm = openai(server)
    feste.compute(
        [llm.chat(f"k{i}") for i in range(5)] + [llm.embed("vector")],
        cache=store_spec,
        run="secret-check",
    )
    assert requests(server) == 6

    if store_spec.startswith("postgresql://"):
        dump = b""
        with psycopg.connect(store_spec) as connection, connection.cursor() as cursor:
            for table in ("feste_meta", "feste_results", "feste_runs", "feste_run_outputs"):
                with cursor.copy(f"COPY {table} TO STDOUT") as copy:
                    for data in copy:
                        dump += bytes(data)
        assert b"echo(gpt-4o-mini): k0" in dump
        assert SECRET.encode() not in dump
    else:
        files = [Path(store_spec + suffix) for suffix in ("", "-wal", "-shm")]
        raw = b"".join(path.read_bytes() for path in files if path.exists())
        assert b"echo(gpt-4o-mini): k0" in raw
        assert SECRET.encode() not in raw


# -- processes -------------------------------------------------------------------------------


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.py"
    path.write_text(body)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


JOB = """
import json, sys
import feste
from feste.backend import OpenAI

base_url, cache, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = OpenAI(base_url=base_url, api_key="sk-job-0123456789", max_concurrency=int(sys.argv[5]))
prompts = [f"item {i}" for i in range(first, last)]
(values,) = feste.compute([llm.chat(p) for p in prompts], cache=cache, run=sys.argv[6])
print(json.dumps(list(values)))
"""


def _stored_prompts(path: str) -> set[str]:
    with sqlite3.connect(path) as connection:
        try:
            rows = connection.execute("SELECT value FROM feste_results").fetchall()
        except sqlite3.OperationalError:  # the tables do not exist yet
            return set()
    prefix = f"echo({MODEL}): "
    return {decode(value)[len(prefix) :] for (value,) in rows}


def test_a_run_killed_with_sigkill_resumes_where_it_stopped(
    llm_server_factory: Any, tmp_path: Path
) -> None:
    server = llm_server_factory(latency=0.05)
    cache = str(tmp_path / "cache.db")
    script = _script(tmp_path, JOB)
    child = subprocess.Popen(
        [sys.executable, str(script), server.openai_base_url, cache, "0", "200", "4", "job"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        while len(_stored_prompts(cache)) < 40:
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    stored = _stored_prompts(cache)
    answered_before = server.stats()["items"]
    assert 40 <= len(stored) < 200
    assert answered_before >= len(stored)  # requests in flight at the kill may be lost
    record = open_store(cache).get_run("job")
    assert record is not None and record["status"] == "unfinished"
    server.reset_stats()

    llm = OpenAI(base_url=server.openai_base_url, api_key=SECRET)
    prompts = [f"item {i}" for i in range(200)]
    (values,) = feste.compute([llm.chat(p) for p in prompts], cache=cache, run="job")

    # Exactly the calls that were not stored are sent again, each once.
    resent = sent_prompts(server)
    assert len(resent) == requests(server) == 200 - len(stored)
    assert set(resent) == set(prompts) - stored
    assert list(values) == [chat_text(MODEL, p) for p in prompts]
    record = open_store(cache).get_run("job")
    assert record is not None and record["status"] == "finished"
    assert (record["cache_hits"], record["requests"]) == (len(stored), 200 - len(stored))


def test_two_processes_share_one_cache_at_once(
    llm_server_factory: Any, store_spec: str, tmp_path: Path
) -> None:
    server = llm_server_factory(latency=0.01)
    script = _script(tmp_path, JOB)
    ranges = [("0", "150", "one"), ("75", "225", "two")]
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                server.openai_base_url,
                store_spec,
                first,
                last,
                "8",
                name,
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for first, last, name in ranges
    ]
    outputs = [child.communicate(timeout=100) for child in children]

    for child, (_, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr
    for (first, last, _), (stdout, _) in zip(ranges, outputs):
        expected = [chat_text(MODEL, f"item {i}") for i in range(int(first), int(last))]
        assert json.loads(stdout) == expected
    store = open_store(store_spec)
    assert store.stats()["entries"] == 225
    # Overlapping calls may be sent by both processes (each missed before the other
    # stored), never more than that; the first answer stored is kept.
    assert 225 <= requests(server) <= 300
    assert {run["name"] for run in store.list_runs()} == {"one", "two"}
