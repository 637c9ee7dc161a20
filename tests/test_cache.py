"""The result stores (SQLite and PostgreSQL, one suite for both), keys and value encoding.

Every store test runs on a real SQLite file and on a real PostgreSQL database (a fresh
one per test, see ``postgres_url`` in conftest).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
import pytest

from feste import context
from feste.backend import Cohere, OpenAI
from feste.cache import (
    SCHEMA_VERSION,
    CacheEntry,
    CacheStore,
    PostgresStore,
    RunOutput,
    SQLiteStore,
    call_key,
    open_store,
    task_key,
)
from feste.cache._codec import decode, encode
from feste.cache.keys import canonical
from feste.cache.postgres import redact_url
from feste.errors import CacheError, OptionError


@pytest.fixture(params=["sqlite", "postgres"])
def store_spec(request: Any, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "cache.db")
    return str(request.getfixturevalue("postgres_url"))


def execute(spec: str, statement: str, params: tuple[Any, ...] = ()) -> None:
    """Run SQL on the store's database behind its back (to age entries, break things)."""
    if spec.startswith("postgresql://"):
        with psycopg.connect(spec, autocommit=True) as connection:
            connection.execute(statement.replace("?", "%s"), params)
    else:
        with sqlite3.connect(spec) as connection:
            connection.execute(statement, params)


def entry(index: int, value: Any = None, run: str | None = None) -> CacheEntry:
    text = encode(value if value is not None else f"value {index}")
    return CacheEntry(f"key-{index}", text, "openai.chat m", run)


# -- the store suite ------------------------------------------------------------------


def test_results_round_trip_in_bulk(store_spec: str) -> None:
    store = open_store(store_spec)
    store.put_many([entry(index) for index in range(1200)])

    # 1,300 keys in one call: SQLite answers them in chunks, PostgreSQL in one query.
    found = store.get_many([f"key-{index}" for index in range(1300)])

    assert len(found) == 1200
    assert decode(found["key-0"]) == "value 0"
    assert decode(found["key-1199"]) == "value 1199"
    assert "key-1200" not in found
    assert store.get_many([]) == {}


def test_a_stored_key_is_never_overwritten(store_spec: str) -> None:
    store = open_store(store_spec)
    store.put_many([entry(1, "first")])
    store.put_many([entry(1, "second"), entry(2, "other")])

    found = store.get_many(["key-1", "key-2"])

    assert decode(found["key-1"]) == "first"
    assert decode(found["key-2"]) == "other"
    assert store.stats()["entries"] == 2


def test_stats_clear_and_prune(store_spec: str) -> None:
    store = open_store(store_spec)
    store.put_many([entry(index) for index in range(5)])
    store.put_many([CacheEntry("vector", encode([0.5, 0.25]), "openai.embed e", None)])
    # Three entries stored ten days ago.
    old = time.time() - 10 * 86400
    execute(
        store_spec,
        "UPDATE feste_results SET created = ? WHERE key IN (?, ?, ?)",
        (old, "key-0", "key-1", "key-2"),
    )

    stats = store.stats()
    assert stats["entries"] == 6
    assert stats["by_label"] == {"openai.chat m": 5, "openai.embed e": 1}
    assert stats["value_bytes"] == sum(len(encode(f"value {i}")) for i in range(5)) + len(
        encode([0.5, 0.25])
    )
    assert stats["schema_version"] == SCHEMA_VERSION
    assert stats["oldest"] == pytest.approx(old)

    assert store.prune(7 * 86400) == 3
    assert sorted(store.get_many([f"key-{i}" for i in range(5)])) == ["key-3", "key-4"]
    assert store.clear() == 3
    assert store.stats()["entries"] == 0


def test_run_history(store_spec: str) -> None:
    store = open_store(store_spec)
    for name, started in (("second", 200.0), ("first", 100.0)):
        record = {"name": name, "status": "finished", "started": started, "ended": started + 1}
        store.save_run(record)
    store.save_run({"name": "first", "status": "failed", "started": 100.0, "error": "boom"})
    outputs = [
        RunOutput(0, "0", "k0", "d0", "text 0", False),
        RunOutput(1, "1", None, "d1", "", True),
    ]
    store.save_run_outputs("first", outputs)
    store.put_many([entry(1, run="first"), entry(2, run="second"), entry(3)])

    assert [run["name"] for run in store.list_runs()] == ["first", "second"]
    assert store.get_run("first") == {
        "name": "first",
        "status": "failed",
        "started": 100.0,
        "error": "boom",
    }
    assert store.get_run("missing") is None
    assert store.run_outputs("first") == outputs
    assert store.run_outputs("second") == []

    # Deleting a run deletes its outputs and the results cached for it alone.
    assert store.delete_run("first") is True
    assert store.delete_run("first") is False
    assert [run["name"] for run in store.list_runs()] == ["second"]
    assert store.run_outputs("first") == []
    assert sorted(store.get_many(["key-1", "key-2", "key-3"])) == ["key-2", "key-3"]


def test_a_newer_schema_is_refused(store_spec: str) -> None:
    open_store(store_spec)
    execute(store_spec, "UPDATE feste_meta SET value = ? WHERE name = ?", ("99", "schema_version"))

    store_type = PostgresStore if store_spec.startswith("postgresql://") else SQLiteStore
    with pytest.raises(CacheError) as raised:
        store_type(store_spec)

    message = str(raised.value)
    assert "written by a newer feste (schema version 99" in message
    assert f"this feste reads version {SCHEMA_VERSION}" in message
    assert "upgrade feste" in message


def test_threads_write_at_once(store_spec: str) -> None:
    store = open_store(store_spec)
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for batch in range(10):
                first = worker * 1000 + batch * 10
                store.put_many([entry(index) for index in range(first, first + 10)])
                # Every thread also writes keys the others write.
                store.put_many([entry(index) for index in range(batch * 5, batch * 5 + 5)])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    # Worker 0's own keys include the shared ones (key-0 ... key-49).
    assert store.stats()["entries"] == 800
    keys = [f"key-{w * 1000 + i}" for w in range(8) for i in range(100)]
    assert len(store.get_many(keys)) == 800


def test_a_store_reopens_from_its_location_when_unpickled(store_spec: str) -> None:
    import pickle

    store = open_store(store_spec)
    store.put_many([entry(1)])
    payload = pickle.dumps(store)

    copy = pickle.loads(payload)

    assert copy is store  # one store per location and process
    assert b"sk-" not in payload
    assert decode(copy.get_many(["key-1"])["key-1"]) == "value 1"


# -- keys -------------------------------------------------------------------------------


def openai(**settings: Any) -> OpenAI:
    return OpenAI(base_url="http://127.0.0.1:9/v1", api_key="sk-one-0123456789", **settings)


def test_each_part_of_a_call_key_counts() -> None:
    backend = openai()
    base = call_key(backend, "chat", "hello", {"model": "m1", "temperature": 0.0})

    assert call_key(backend, "chat", "hello", {"model": "m1", "temperature": 0.0}) == base
    assert call_key(backend, "chat", "hello", {"model": "m2", "temperature": 0.0}) != base
    assert call_key(backend, "chat", "hello", {"model": "m1", "temperature": 0.5}) != base
    assert call_key(backend, "chat", "hello", {"model": "m1"}) != base
    assert call_key(backend, "chat", "hello!", {"model": "m1", "temperature": 0.0}) != base
    assert call_key(backend, "complete", "hello", {"model": "m1", "temperature": 0.0}) != base
    elsewhere = OpenAI(base_url="http://127.0.0.1:10/v1", api_key="sk-one-0123456789")
    assert call_key(elsewhere, "chat", "hello", {"model": "m1", "temperature": 0.0}) != base
    cohere = Cohere(base_url="http://127.0.0.1:9/v1", api_key="sk-one-0123456789")
    assert call_key(cohere, "chat", "hello", {"model": "m1", "temperature": 0.0}) != base
    scoped = call_key(
        backend,
        "chat",
        "hello",
        {"model": "m1", "temperature": 0.0},
        scope={"run": "a", "occurrence": 0},
    )
    assert scoped != base
    assert len(base) == 64 and int(base, 16) >= 0


def test_the_api_key_and_limits_are_not_part_of_a_key() -> None:
    params = {"model": "m1"}
    first = call_key(openai(), "chat", "hello", params)
    other_key = OpenAI(base_url="http://127.0.0.1:9/v1", api_key="sk-two-9876543210")
    limited = OpenAI(
        base_url="http://127.0.0.1:9/v1",
        api_key="sk-one-0123456789",
        max_concurrency=2,
        requests_per_minute=10,
        timeout=5,
    )

    assert call_key(other_key, "chat", "hello", params) == first
    assert call_key(limited, "chat", "hello", params) == first


def test_keys_are_the_same_in_another_process() -> None:
    script = (
        "from feste.backend import OpenAI; from feste.cache import call_key; "
        "b = OpenAI(base_url='http://127.0.0.1:9/v1', api_key='sk-x-0123456789'); "
        "print(call_key(b, 'chat', [{'role': 'user', 'content': 'hi'}], {'model': 'm', 'n': 2}))"
    )
    child = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    here = call_key(openai(), "chat", [{"role": "user", "content": "hi"}], {"n": 2, "model": "m"})

    assert child.stdout.strip() == here


def double(x: int) -> int:
    return 2 * x


def triple(x: int) -> int:
    return 3 * x


def test_keys_stored_by_earlier_versions_still_hit() -> None:
    # Keys are persistent: these were written by feste before keys were computed from
    # one head per backend, method and parameters. A change here must bump KEY_VERSION.
    backend = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-a")
    text = 'h\u00e9llo "w\u00f6rld"\n'
    embed = call_key(backend, "embed", text, {"model": "text-embedding-3-small"})
    assert embed == "1d6356db1d9bfd9110f820c422f52fb8225e13813d99ff27521b0e17ef4f089c"
    messages = [{"role": "user", "content": "hi"}]
    chat = call_key(backend, "chat", messages, {"model": "m", "temperature": 0.5})
    assert chat == "cb4c50c2939dce8512731d55807449a4f29a9fa57cf85c083fef302dd3bd7101"


@pytest.mark.parametrize(
    "item",
    ["plain", 'quo"te\\ \n\t \u2028 \x00 \u00e9 \U0001f600', "", ["a", 1, 2.5, None, True]],
)
def test_a_key_encodes_items_as_canonical_json(item: Any) -> None:
    expected = json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical(item) == expected


def test_task_keys_cover_code_and_arguments() -> None:
    assert task_key(double, (1,), {}) == task_key(double, (1,), {})
    assert task_key(double, (1,), {}) != task_key(double, (2,), {})
    assert task_key(double, (1,), {}) != task_key(triple, (1,), {})
    assert task_key(double, (1,), {"z": 1}) != task_key(double, (1,), {})


# -- values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        'text with ünïcode and "quotes"',
        "",
        [0.1, -2.5, 3, 1e-30],
        {"index": 2, "relevance_score": 0.75},
        [{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}],
        ("a", ("nested", 1)),
        {1: "int key", (2, 3): "tuple key"},
        {"$feste": "a user's own key", "other": [1, 2]},
        [True, False, None, 1.5, "mixed"],
        float("inf"),
    ],
)
def test_values_come_back_equal_and_of_the_same_types(value: Any) -> None:
    back = decode(encode(value))

    assert back == value
    assert repr(back) == repr(value)


def test_a_value_that_cannot_be_stored_is_named() -> None:
    with pytest.raises(TypeError) as raised:
        encode({"scores": [1.0, {2, 3}]})

    assert "set at the result['scores'][1] cannot be stored as JSON" in str(raised.value)


# -- opening and faults -------------------------------------------------------------------


def test_open_store_refuses_what_is_not_a_cache(tmp_path: Any) -> None:
    with pytest.raises(CacheError, match="unknown cache URL scheme 'redis'"):
        open_store("redis://localhost/0")
    with pytest.raises(CacheError, match="got int 3"):
        open_store(3)
    with pytest.raises(CacheError, match="the cache location is empty"):
        open_store("  ")
    with pytest.raises(CacheError, match=r"the folder .*missing does not exist"):
        open_store(str(tmp_path / "missing" / "cache.db"))
    with pytest.raises(CacheError, match=r"no cache at .*absent\.db: check the path"):
        open_store(str(tmp_path / "absent.db"), create=False)
    assert not (tmp_path / "absent.db").exists()


def test_open_store_takes_paths_and_store_objects(tmp_path: Any) -> None:
    path = tmp_path / "cache.db"
    store = open_store(path)

    assert open_store(str(path)) is store
    assert open_store(store) is store
    assert isinstance(store, SQLiteStore) and isinstance(store, CacheStore)
    assert repr(store) == f"SQLiteStore({str(path)!r})"


def test_a_corrupt_file_is_named_with_the_fix(tmp_path: Any) -> None:
    path = tmp_path / "cache.db"
    path.write_bytes(b"this is not a database, just some text " * 100)

    with pytest.raises(CacheError) as raised:
        SQLiteStore(path)

    message = str(raised.value)
    assert str(path) in message
    assert "is not a readable SQLite database" in message
    assert "move the file away" in message


def test_a_lock_held_too_long_is_named_with_the_fix(tmp_path: Any) -> None:
    path = tmp_path / "cache.db"
    store = SQLiteStore(path, timeout=0.2)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(CacheError) as raised:
            store.put_many([entry(1)])
    finally:
        other.execute("ROLLBACK")
        other.close()

    message = str(raised.value)
    assert f"the cache {path} stayed locked by another connection for 0.2 s" in message
    assert "while storing results" in message
    assert "longer timeout" in message


def _make_read_only(*paths: Any) -> list[Any]:
    """Make ``paths`` read-only even for root (immutable), else by permissions."""
    if os.geteuid() != 0:
        for path in paths:
            os.chmod(path, 0o555 if os.path.isdir(path) else 0o444)
        return []
    done = []
    for path in paths:
        result = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            _undo_read_only(done)
            pytest.skip(f"cannot make a file read-only for root here: {result.stderr.strip()}")
        done.append(path)
    return done


def _undo_read_only(paths: list[Any]) -> None:
    for path in paths:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_cache_is_named_with_the_fix(tmp_path: Any) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "cache.db"
    SQLiteStore(path).close()
    immutable = _make_read_only(path, folder)
    try:
        with pytest.raises(CacheError) as raised:
            SQLiteStore(path).put_many([entry(1)])
    finally:
        _undo_read_only(immutable)
        os.chmod(folder, 0o755)
        os.chmod(path, 0o644)

    message = str(raised.value)
    assert f"{path}" in message
    assert "read-only" in message or "cannot open" in message
    assert "writable by this user" in message


def test_a_postgres_url_password_is_never_shown() -> None:
    url = "postgresql://feste:s3cret-pass@db.example:5433/cache"

    assert redact_url(url) == "postgresql://feste:***@db.example:5433/cache"
    assert redact_url("postgresql://feste@db/cache") == "postgresql://feste@db/cache"


def test_postgres_connection_failure_names_the_server() -> None:
    with pytest.raises(CacheError) as raised:
        PostgresStore("postgresql://feste:pw-123456@127.0.0.1:9/none", timeout=1)

    message = str(raised.value)
    assert (
        "cannot connect to the PostgreSQL cache postgresql://feste:***@127.0.0.1:9/none" in message
    )
    assert "pw-123456" not in message


# -- options ----------------------------------------------------------------------------


def test_cache_and_run_options_are_checked_when_set(tmp_path: Any) -> None:
    with context.set(cache=str(tmp_path / "c.db"), run="nightly"):
        assert context.get("cache") == str(tmp_path / "c.db")
        assert context.get("run") == "nightly"
    with context.set(cache=tmp_path / "c.db"), context.set(cache=False):
        assert context.get("cache") is False
    bad = [
        ({"cache": 3}, "invalid value for feste option 'cache': expected a file path"),
        ({"cache": ""}, "the cache location is empty"),
        ({"run": "two\nlines"}, "a run name is 1 to 200 printable characters"),
        ({"run": 5}, "expected a run name"),
    ]
    for options, message in bad:
        with pytest.raises(OptionError, match=message), context.set(**options):
            pass
