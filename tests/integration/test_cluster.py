"""feste on a real Dask cluster: worker processes, the local test server, real HTTP.

One ``LocalCluster`` (two worker processes, one thread each, as ``LocalCluster`` gives
on two cores) serves most tests; the tests that kill a worker or start ``dask
scheduler`` / ``dask worker`` from the command line have their own. The server runs in
this process (thread mode) and the workers reach it over TCP; what it counts
(requests, peak in-flight, 429s) is what a provider would see from the whole cluster.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import feste
from feste import context
from feste.backend.openai import OpenAI
from feste.cache import call_key, open_store
from feste.errors import BadRequestError, SchedulerError, TransientError
from feste.schedulers import cluster as cluster_scheduler
from feste.testing import TestServer, chat_text, count_tokens, embedding, wait_until

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow

CHAT_MODEL = "gpt-4o-mini"
EMBED_MODEL = "text-embedding-3-small"
CHATS = "/v1/chat/completions"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as dask_client,
    ):
        yield dask_client


def openai(server: TestServer, **settings: Any) -> OpenAI:
    return OpenAI(base_url=server.openai_base_url, api_key="test-key", **settings)


def answers_of(prompts: list[str]) -> list[str]:
    return [chat_text(CHAT_MODEL, prompt) for prompt in prompts]


# -- throughput and limits ------------------------------------------------------------


@pytest.mark.parametrize("where", ["compute keyword", "backend"])
def test_results_exact_and_the_cap_holds_for_the_whole_cluster(
    client: Any, llm_server_factory: Any, where: str
) -> None:
    cap = 8
    # The server refuses (429) anything beyond the cap: an excess would show as 429s.
    server = llm_server_factory(latency=0.02, max_concurrency=cap)
    prompts = [f"question {index}" for index in range(240)]
    if where == "backend":
        llm = openai(server, max_concurrency=cap)
        (values,) = feste.compute([llm.chat(p) for p in prompts], scheduler=client)
    else:
        llm = openai(server)
        (values,) = feste.compute(
            [llm.chat(p) for p in prompts], scheduler=client, max_concurrency=cap
        )
    stats = server.stats()
    assert list(values) == answers_of(prompts)
    assert stats["requests"] == len(prompts)
    assert stats["faults"]["limit_429"] == 0
    assert "429" not in stats["status_counts"]
    assert stats["max_in_flight"] <= cap
    # More in flight than the two worker threads: the workers run requests
    # concurrently, not one blocking thread per call.
    assert stats["max_in_flight"] > 2


def test_five_thousand_embeds_are_three_requests_on_the_cluster(
    client: Any, llm_server_factory: Any
) -> None:
    server = llm_server_factory()
    texts = [f"text {index}" for index in range(5000)]
    llm = openai(server)
    (vectors,) = feste.compute([llm.embed(text) for text in texts], scheduler=client)
    assert sorted(server.stats()["items_per_request"]["/v1/embeddings"], reverse=True) == [
        2048,
        2048,
        904,
    ]
    assert vectors[0] == embedding(EMBED_MODEL, texts[0])
    assert vectors[4999] == embedding(EMBED_MODEL, texts[4999])


def test_a_run_is_a_few_dask_tasks_named_feste_block(client: Any, llm_server_factory: Any) -> None:
    def finished_blocks(dask_scheduler: Any) -> int:
        """Tasks of the "feste-block" prefix that reached memory (the dashboard's bars)."""
        prefix = dask_scheduler.task_prefixes.get("feste-block")
        return 0 if prefix is None else int(prefix.state_counts["memory"])

    server = llm_server_factory()
    llm = openai(server)
    before = client.run_on_scheduler(finished_blocks)
    feste.compute([llm.chat(f"block {index}") for index in range(500)], scheduler=client)
    blocks = client.run_on_scheduler(finished_blocks) - before
    # 500 calls on two workers: BLOCKS_PER_WORKER blocks each, not 500 Dask tasks.
    assert blocks == 2 * cluster_scheduler.BLOCKS_PER_WORKER
    assert server.stats()["requests"] == 500


def test_an_adaptive_cluster_runs_the_graph(llm_server_factory: Any) -> None:
    server = llm_server_factory(max_concurrency=4)
    llm = openai(server)
    prompts = [f"adaptive {index}" for index in range(60)]
    with (
        distributed.LocalCluster(
            n_workers=0, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as dask_client,
    ):
        cluster.adapt(minimum=1, maximum=2)
        dask_client.wait_for_workers(1, timeout=30)
        (values,) = feste.compute(
            [llm.chat(p) for p in prompts], scheduler=dask_client, max_concurrency=4
        )
    assert list(values) == answers_of(prompts)
    assert server.stats()["faults"]["limit_429"] == 0


# -- every option ---------------------------------------------------------------------


def test_errors_return_gives_failures_and_cancels_only_dependents(
    client: Any, llm_server_factory: Any
) -> None:
    server = llm_server_factory()
    llm = openai(server)
    prompts = [f"q {index}" + (" [[status:400]]" if index == 3 else "") for index in range(40)]
    first = [llm.chat(prompt) for prompt in prompts]
    second = [llm.chat(answer) for answer in first]
    (results,) = feste.compute(second, scheduler=client, errors="return")
    for index, result in enumerate(results):
        if index != 3:
            assert result == chat_text(CHAT_MODEL, chat_text(CHAT_MODEL, prompts[index]))
    failed = results[3]
    assert isinstance(failed, feste.Failure)
    assert failed.cancelled
    assert failed.key == second[3].key
    assert first[3].key in str(failed.exception)
    assert "BadRequestError" in str(failed.exception)
    # Only the bad call's dependent was not sent: 40 + 39 chat requests.
    assert server.stats()["requests"] == 79


def test_errors_raise_stops_the_run_with_the_error_of_the_task(
    client: Any, llm_server_factory: Any
) -> None:
    server = llm_server_factory()
    llm = openai(server)
    bad = llm.chat("hello [[status:400]]")
    with pytest.raises(BadRequestError) as raised:
        feste.compute([bad, llm.chat("fine")], scheduler=client)
    assert raised.value.key == bad.key


def test_context_settings_reach_the_workers(client: Any, llm_server_factory: Any) -> None:
    server = llm_server_factory(retry_after=0.01)
    llm = openai(server)
    flaky = llm.chat("always failing [[status:503]]")
    with context.set(max_retries=0, retry_backoff=0.01):
        (result,) = feste.compute(flaky, scheduler=client, errors="return")
    assert isinstance(result, feste.Failure)
    assert isinstance(result.exception, TransientError)
    assert server.stats()["requests"] == 1  # max_retries=0: sent once, not retried

    server.reset_stats()
    with context.set(max_retries=2, retry_backoff=0.01):
        feste.compute(flaky, scheduler=client, errors="return")
    assert server.stats()["requests"] == 3


def test_an_unknown_keyword_is_refused(client: Any, llm_server_factory: Any) -> None:
    server = llm_server_factory()
    with pytest.raises(SchedulerError, match=r"unknown keyword 'max_concurency'"):
        feste.compute(openai(server).chat("hi"), scheduler=client, max_concurency=4)
    assert server.stats()["requests"] == 0


def test_callbacks_run_on_the_client_for_every_task(client: Any, llm_server_factory: Any) -> None:
    server = llm_server_factory()
    llm = openai(server)
    prompts = [f"p {index}" for index in range(30)] + ["bad [[status:400]]"]
    calls = [llm.chat(prompt) for prompt in prompts]
    done: list[tuple[Any, Any]] = []
    failed: list[tuple[Any, str]] = []
    progress: list[tuple[int, int]] = []
    caller = threading.get_ident()
    threads: set[int] = set()

    def on_done(key: Any, value: Any) -> None:
        threads.add(threading.get_ident())
        done.append((key, value))

    feste.compute(
        calls,
        scheduler=client,
        errors="return",
        on_task_done=on_done,
        on_task_failed=lambda key, error: failed.append((key, type(error).__name__)),
        on_progress=lambda settled, total: progress.append((settled, total)),
    )
    assert sorted(done) == sorted(
        (call.key, chat_text(CHAT_MODEL, prompt)) for call, prompt in zip(calls[:30], prompts)
    )
    assert failed == [(calls[30].key, "BadRequestError")]
    assert progress[-1] == (31, 31)
    assert [settled for settled, _ in progress] == list(range(1, 32))
    assert threads == {caller}  # called in this process, on the caller's thread


def test_progress_bar_is_drawn_on_the_client(
    client: Any, llm_server_factory: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    server = llm_server_factory()
    llm = openai(server)
    feste.compute([llm.chat(f"p {index}") for index in range(12)], scheduler=client, progress=True)
    err = capfd.readouterr().err
    assert "feste" in err
    assert "12/12" in err
    assert "12 requests" in err  # request counts come back from the workers


def test_record_usage_sees_requests_made_on_workers(client: Any, llm_server_factory: Any) -> None:
    server = llm_server_factory()
    llm = openai(server)
    prompts = [f"count my tokens {index}" for index in range(25)]
    with feste.record_usage() as usage:
        feste.compute([llm.chat(prompt) for prompt in prompts], scheduler=client)
    assert usage.requests == 25 == server.stats()["requests"]
    assert {record.method for record in usage.records} == {"chat"}
    # The tokens and dollars of every request made on the workers, at list prices.
    prompt_tokens = sum(count_tokens(prompt) for prompt in prompts)
    completion_tokens = sum(count_tokens(chat_text(CHAT_MODEL, prompt)) for prompt in prompts)
    assert (usage.total.prompt_tokens, usage.total.completion_tokens) == (
        prompt_tokens,
        completion_tokens,
    )
    expected = (prompt_tokens * 0.15 + completion_tokens * 0.60) / 1_000_000
    assert usage.cost == pytest.approx(expected, abs=1e-12)


# -- faults ---------------------------------------------------------------------------


def test_a_worker_killed_mid_run_does_not_stop_the_run(
    llm_server_factory: Any, tmp_path: Path
) -> None:
    server = llm_server_factory(latency=0.05, max_concurrency=16)
    llm = openai(server)
    prompts = [f"survive {index}" for index in range(320)]
    calls = [llm.chat(prompt) for prompt in prompts]
    path = str(tmp_path / "c.db")
    store = open_store(path)
    # The cache keys of the calls: a chat's item is its messages, its model a parameter.
    keys = {
        call_key(llm, "chat", [{"role": "user", "content": prompt}], {"model": CHAT_MODEL}): prompt
        for prompt in prompts
    }

    def stored() -> set[str]:
        return {keys[key] for key in store.get_many(list(keys))}

    results: list[Any] = []
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as dask_client,
    ):
        victim = sorted(dask_client.scheduler_info()["workers"])[0]

        def run() -> None:
            (values,) = feste.compute(calls, scheduler=dask_client, max_concurrency=16, cache=path)
            results.append(values)

        runner = threading.Thread(target=run)
        runner.start()
        assert wait_until(lambda: len(stored()) >= 40, timeout=30)
        # Read before the kill: each of these answers was durable when the worker died.
        durable_before_kill = stored()
        with contextlib.suppress(Exception):  # the worker dies without answering
            dask_client.run(os._exit, 1, workers=[victim])
        assert wait_until(lambda: victim not in dask_client.scheduler_info()["workers"])
        runner.join(60)
        assert not runner.is_alive()
    assert list(results[0]) == answers_of(prompts)
    assert stored() == set(prompts)  # the keys above are the ones the run stores under
    # With the cache on, no call whose answer was stored before the worker died is sent
    # again: only those in flight on it, or answered but not yet committed, go twice.
    sent = Counter(text for request in server.stats()["inputs"][CHATS] for text in request)
    assert set(sent) == set(prompts)
    again = {text for text, count in sent.items() if count > 1}
    assert not again & durable_before_kill
    assert max(sent.values()) <= 2
    assert server.stats()["max_in_flight"] <= 16


def test_a_client_that_goes_away_cancels_its_outstanding_requests(
    llm_server_factory: Any,
) -> None:
    server = llm_server_factory(latency=0.2, max_concurrency=8)
    llm = openai(server)
    calls = [llm.chat(f"abandoned {index}") for index in range(400)]
    errors: list[BaseException] = []
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        dask_client = distributed.Client(cluster)

        def run() -> None:
            try:
                feste.compute(calls, scheduler=dask_client, max_concurrency=8)
            except BaseException as error:
                errors.append(error)

        runner = threading.Thread(target=run)
        runner.start()
        assert wait_until(lambda: server.stats()["requests"] >= 8, timeout=30)
        dask_client.close()
        runner.join(30)

        def quiet() -> bool:
            """Nothing in flight, and nothing new sent for a moment."""
            before = server.stats()["requests"]
            time.sleep(0.5)
            after = server.stats()
            return after["in_flight"] == 0 and after["requests"] == before

        assert wait_until(quiet, timeout=20)
    assert errors  # the computation did not pretend to finish
    # The whole run is 50 rounds of 8 requests; the workers stopped long before.
    assert server.stats()["requests"] < len(calls) // 2


# -- a cluster started from the command line ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_dask_scheduler_and_workers_started_from_the_command_line(
    llm_server_factory: Any,
) -> None:
    server = llm_server_factory(latency=0.01, max_concurrency=6)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    scheduler_command = [
        sys.executable, "-m", "distributed.cli.dask_scheduler",
        "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
    ]  # fmt: skip
    worker_command = [
        sys.executable, "-m", "distributed.cli.dask_worker", address,
        "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard", "--no-nanny",
    ]  # fmt: skip
    processes = [subprocess.Popen(scheduler_command, env=env, stderr=subprocess.DEVNULL)]
    try:
        processes += [
            subprocess.Popen(worker_command, env=env, stderr=subprocess.DEVNULL) for _ in range(2)
        ]
        with distributed.Client(address, timeout=30) as dask_client:
            dask_client.wait_for_workers(2, timeout=30)
            llm = openai(server)
            prompts = [f"from the command line {index}" for index in range(60)]
            (values,) = feste.compute(
                [llm.chat(p) for p in prompts], scheduler=dask_client, max_concurrency=6
            )
            assert len(dask_client.scheduler_info()["workers"]) == 2
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert list(values) == answers_of(prompts)
    assert server.stats()["max_in_flight"] <= 6
    assert server.stats()["faults"]["limit_429"] == 0


# -- the cache, shared by every worker --------------------------------------------------


def test_workers_share_one_postgresql_cache(
    client: Any, llm_server_factory: Any, postgres_url: str
) -> None:
    server = llm_server_factory(latency=0.01)
    llm = openai(server)
    prompts = [f"cached {index}" for index in range(40)]
    # The workers send every call and store each answer in the shared database.
    first = feste.compute(
        [llm.chat(prompt) for prompt in prompts], scheduler=client, cache=postgres_url
    )[0]
    assert first == answers_of(prompts)
    assert server.stats()["requests"] == 40
    # Another run, on the cluster, and one in this process: both served by the cache.
    again = feste.compute(
        [llm.chat(prompt) for prompt in prompts], scheduler=client, cache=postgres_url
    )[0]
    local = feste.compute([llm.chat(prompt) for prompt in prompts], cache=postgres_url)[0]
    assert again == local == first
    assert server.stats()["requests"] == 40


def test_requests_per_minute_hold_for_the_whole_cluster(
    client: Any, llm_server_factory: Any
) -> None:
    server = llm_server_factory()
    llm = openai(server, requests_per_minute=120)  # 2 a second, a burst of 2
    prompts = [f"paced {index}" for index in range(8)]
    started = time.monotonic()
    values = feste.compute([llm.chat(prompt) for prompt in prompts], scheduler=client)[0]
    elapsed = time.monotonic() - started
    assert values == answers_of(prompts)
    # One budget for both workers: 2 at once, then the other 6 at 2 a second. Two
    # budgets of their own would let the workers finish in about half that time.
    # (A lower bound: load only makes a run slower.)
    assert elapsed >= 2.5
