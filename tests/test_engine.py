"""The async engine (scheduler="async"): where nodes run, failures, events, streaming.

Backend calls go to the local test server (thread mode, small latencies); its counters
(requests, items per request, in_flight, max_in_flight) are what the assertions read.
The same graphs on every scheduler are covered by tests/test_schedulers.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import dask
import pytest
from dask.task_spec import DataNode, Task, TaskRef

import feste
from feste import context
from feste.backend.openai import OpenAI
from feste.compute import prepare
from feste.errors import (
    BadRequestError,
    CancelledError,
    Failure,
    GraphError,
    RateLimitError,
    SchedulerError,
)
from feste.schedulers._engine import Engine
from feste.schedulers.asyncio import get
from feste.task import feste_task
from feste.testing import embedding

CHAT = "echo(gpt-4o-mini): {}"
EMBED_MODEL = "text-embedding-3-small"


@feste_task
def inc(x):
    return x + 1


@feste_task
def add(*values):
    return sum(values)


@feste_task(pure=False)
def thread_name(_=None):
    return threading.current_thread().name


@feste_task
async def loop_thread_name(_=None):
    await asyncio.sleep(0)
    return threading.current_thread().name


@feste_task(pure=False)
def fail(x):
    raise ValueError(f"cannot use {x}")


@feste_task
def text_of(x):
    return f"text {x}"


def wait_until(predicate, timeout=10.0):
    """Poll ``predicate`` until it holds; False if it never did within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def chat_backend(server, **kwargs):
    return OpenAI(base_url=server.openai_base_url, api_key="k", **kwargs)


# -- where nodes run ------------------------------------------------------------------


def test_plain_tasks_run_in_worker_threads_and_async_tasks_on_the_loop():
    plain, asynchronous = feste.compute(thread_name(), loop_thread_name())
    assert plain.startswith("feste-worker-")
    assert asynchronous == threading.current_thread().name


def test_options_and_context_variables_reach_worker_threads_and_coroutines():
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")

    @feste_task(pure=False)
    def read_plain():
        return context.get("max_retries"), marker.get()

    @feste_task(pure=False)
    async def read_async():
        return context.get("max_retries"), marker.get()

    marker.set("caller")
    with context.set(max_retries=2):
        assert feste.compute(read_plain(), read_async()) == ((2, "caller"), (2, "caller"))


def test_num_workers_bounds_python_tasks_in_parallel():
    lock = threading.Lock()
    running = [0, 0]  # now, most
    threads: set[str] = set()
    # The first three tasks wait for each other: they only get past the barrier if
    # three run at once (a timeout breaks it, failing the test, if they cannot).
    meeting = threading.Barrier(3, timeout=60)

    @feste_task(pure=False)
    def busy(i):
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
            threads.add(threading.current_thread().name)
        if i < 3:
            meeting.wait()
        with lock:
            running[0] -= 1
        return i

    results = feste.compute([busy(i) for i in range(12)], num_workers=3)[0]
    assert results == list(range(12))
    assert running[1] == 3
    # Three workers ran all twelve tasks, so no more than three ran at once.
    assert threads == {"feste-worker-0", "feste-worker-1", "feste-worker-2"}


def test_python_tasks_can_run_in_processes():
    @feste_task(pure=False)
    def pid(_):
        return os.getpid()

    @feste_task(pure=False)
    def square(x):
        return x * x

    pids = feste.compute(
        [pid(i) for i in range(3)] + [square(7)], python_executor="processes", num_workers=2
    )[0]
    assert pids[-1] == 49
    assert os.getpid() not in pids[:3]


def test_wide_graph_of_many_trivial_tasks():
    @feste_task(pure=False)
    def one(i):
        return i

    leaves = [one(i) for i in range(3000)]
    groups = [add(*leaves[i : i + 100]) for i in range(0, 3000, 100)]
    assert feste.compute(add(*groups))[0] == sum(range(3000))


def test_literal_and_alias_nodes_and_legacy_graphs():
    graph = {
        "a": DataNode("a", 2),
        "b": Task("b", int.__add__, TaskRef("a"), 3),
        "c": (sum, ["a", "b"]),  # a legacy tuple task is converted
    }
    assert get(graph, ["c", "a"]) == (7, 2)
    assert get(graph, "b") == 5


def test_intermediate_values_are_released_outputs_kept():
    a = inc(1)
    b = inc(a)
    c = inc(b)
    prepared = prepare(c, a)
    graph, keys = prepared.graph, prepared.keys

    async def run():
        engine = Engine(graph, keys)
        results = await engine.run()
        return engine, results

    engine, results = asyncio.run(run())
    assert results == ((4,), (2,))
    assert set(engine.values) == {c.key, a.key}


def test_tasks_start_in_priority_order():
    started: list[str] = []

    @feste_task(pure=False)
    def record(name, *_):
        started.append(name)
        return name

    # Leaves of different depths under one sink: dask.order ranks them; with one
    # worker, tasks start exactly in that rank among those ready.
    chains = []
    for length in (1, 3, 2, 4):
        node = record(f"len{length}-0")
        for step in range(1, length):
            node = record(f"len{length}-{step}", node)
        chains.append(node)
    sink = record("sink", *chains)
    graph = prepare(sink).graph
    from dask.order import order

    priority = order(graph)
    name_of = {key: graph[key].args[0] for key in graph}
    feste.compute(sink, num_workers=1)
    assert len(started) == 11
    assert started[-1] == "sink"
    # The leaves were all ready at the start: they left the ready heap by rank.
    leaves = sorted((k for k in graph if not graph[k].dependencies), key=priority.__getitem__)
    leaf_names = [name_of[key] for key in leaves]
    assert [name for name in started if name in leaf_names] == leaf_names


# -- errors ---------------------------------------------------------------------------


def test_raise_mode_keeps_the_type_and_names_the_task():
    bad = fail(3)
    with pytest.raises(ValueError, match="cannot use 3") as info:
        feste.compute(inc(bad))
    assert bad.key in str(info.value)


def test_return_mode_fails_cancels_dependents_and_finishes_the_rest():
    bad = fail(1)
    downstream = inc(inc(bad))
    independent = inc(inc(10))
    failed, cancelled, fine = feste.compute(bad, downstream, independent, errors="return")
    assert isinstance(failed, Failure)
    assert isinstance(failed.exception, ValueError)
    assert failed.key == bad.key
    assert not failed.cancelled
    assert isinstance(cancelled, Failure)
    assert cancelled.cancelled
    assert isinstance(cancelled.exception, CancelledError)
    assert bad.key in str(cancelled.exception)
    assert cancelled.key == downstream.key
    assert fine == 12


def test_errors_mode_from_the_context():
    with context.set(errors="return"):
        (result,) = feste.compute(fail(2))
    assert isinstance(result, Failure)


def test_backend_error_in_raise_mode_names_backend_and_task(llm_server):
    llm = chat_backend(llm_server)
    call = llm.chat("hello [[status:400]]")
    with pytest.raises(BadRequestError) as info:
        feste.compute([call, llm.chat("fine")])
    message = str(info.value)
    assert "openai.chat" in message
    assert call.key in message
    assert llm_server.stats()["status_counts"]["400"] == 1


def test_raise_mode_sends_nothing_after_the_first_error(llm_server):
    # One request at a time: the task whose request failed must not go on with the
    # next call of its lane (a failure is settled before the next job is taken).
    llm = chat_backend(llm_server, max_concurrency=1)
    calls = [llm.chat(f"bad {i} [[status:400]]") for i in range(3)]
    with pytest.raises(BadRequestError):
        feste.compute(calls)
    assert llm_server.stats()["requests"] == 1


def test_every_answer_settles_once_with_one_request_at_a_time(llm_server):
    # Settling a successful answer is put off to a callback: every value still lands,
    # in its place, and each call's on_task_done runs once.
    llm = chat_backend(llm_server, max_concurrency=1)
    done = []
    calls = [llm.chat(f"q{i}") for i in range(5)]
    results = feste.compute(calls, on_task_done=lambda key, value: done.append(value))[0]
    assert results == [CHAT.format(f"q{i}") for i in range(5)]
    assert sorted(done) == results
    assert llm_server.stats()["requests"] == 5


class BuildCountingOpenAI(OpenAI):
    """Records each request it builds, and whether a task of the run built it (the
    call being sent) or the engine built it ahead, outside any task."""

    def build_request(self, method, items, params):
        built = self.__dict__.setdefault("_test_built", [])
        built.append((items[0][-1]["content"], asyncio.current_task() is not None))
        return super().build_request(method, items, params)


def test_queued_calls_have_their_requests_built_ahead_once(llm_server_factory):
    # Four calls start at once and build their requests as they are sent; the other
    # 60 wait in their lane and are built while the first answers are awaited (100 ms
    # away), each once.
    server = llm_server_factory(latency=0.1)
    llm = BuildCountingOpenAI(base_url=server.openai_base_url, api_key="k", max_concurrency=4)
    prompts = [f"q{i}" for i in range(64)]
    results = feste.compute([llm.chat(prompt) for prompt in prompts])[0]

    assert results == [CHAT.format(prompt) for prompt in prompts]
    built = llm.__dict__["_test_built"]
    assert sorted(prompt for prompt, _ in built) == sorted(prompts)
    # Those built by the tasks sending them are the four that left first.
    in_tasks = [prompt for prompt, in_task in built if in_task]
    assert len(in_tasks) == 4
    first_sent = [texts[0] for texts in server.stats()["inputs"]["/v1/chat/completions"][:4]]
    assert sorted(in_tasks) == sorted(first_sent)
    assert server.stats()["requests"] == 64


def test_with_a_cache_on_requests_are_built_where_calls_are_sent(llm_server_factory, tmp_path):
    # A call is looked up before its request is built (a hit needs none): nothing is
    # built ahead, and every request is built once, by the task that sends it.
    server = llm_server_factory(latency=0.05)
    llm = BuildCountingOpenAI(base_url=server.openai_base_url, api_key="k", max_concurrency=2)
    prompts = [f"q{i}" for i in range(6)]
    results = feste.compute([llm.chat(prompt) for prompt in prompts], cache=str(tmp_path / "c.db"))

    assert results[0] == [CHAT.format(prompt) for prompt in prompts]
    built = llm.__dict__["_test_built"]
    assert sorted(built) == [(prompt, True) for prompt in prompts]


@feste_task
def not_a_prompt(number):
    return number


def test_a_queued_call_whose_request_cannot_be_built_fails_with_its_own_error(
    llm_server_factory,
):
    # Built ahead, the bad call's request fails to build; it is then built where it is
    # sent, and fails there as it would have, alone.
    server = llm_server_factory(latency=0.05)
    llm = chat_backend(server, max_concurrency=1)
    calls = [llm.chat(f"q{i}") for i in range(3)] + [llm.chat(not_a_prompt(42))]
    results = feste.compute(calls, errors="return")[0]

    assert results[:3] == [CHAT.format(f"q{i}") for i in range(3)]
    failure = results[3]
    assert isinstance(failure, Failure)
    assert isinstance(failure.exception, BadRequestError)
    assert failure.exception.args[0] == (
        "expected a prompt string or a list of messages like "
        "[{'role': 'user', 'content': 'some text'}], got int"
    )
    assert "test_engine.py" in str(failure.exception)  # where the call was made
    assert server.stats()["requests"] == 3


def test_raise_mode_cancels_in_flight_requests(llm_server_factory):
    server = llm_server_factory(latency=0.01)
    llm = chat_backend(server)
    slow = [llm.chat(f"slow {i} [[hang]]") for i in range(5)]
    with pytest.raises(BadRequestError):
        feste.compute([*slow, llm.chat("bad [[status:400]]")], task_timeout=30)
    # The hanging requests were cancelled with the run: nothing stays in flight.
    assert wait_until(lambda: server.stats()["in_flight"] == 0)
    assert server.stats()["status_counts"].get("200", 0) == 0


def test_return_mode_isolates_failed_calls(llm_server):
    llm = chat_backend(llm_server)
    calls = [llm.chat("a"), llm.chat("b [[status:400]]"), llm.chat("c")]
    results = feste.compute(calls, errors="return")[0]
    assert results[0] == CHAT.format("a")
    assert isinstance(results[1], Failure)
    assert isinstance(results[1].exception, BadRequestError)
    assert results[1].attempts == 1
    assert results[2] == CHAT.format("c")


def test_retries_are_counted_in_the_failure(llm_server):
    llm = chat_backend(llm_server)
    (result,) = feste.compute(
        llm.chat("x [[status:503]]"), errors="return", max_retries=2, retry_backoff=0.001
    )
    assert isinstance(result, Failure)
    assert result.attempts == 3
    assert llm_server.stats()["status_counts"]["503"] == 3


def test_graph_errors():
    with pytest.raises(GraphError, match="no node for key 'missing'"):
        get({"a": Task("a", inc.func, TaskRef("missing"))}, ["a"])
    with pytest.raises(GraphError, match="cycle"):
        get({"a": Task("a", inc.func, TaskRef("b")), "b": Task("b", inc.func, TaskRef("a"))}, "a")


def test_unknown_keywords_are_refused():
    with pytest.raises(SchedulerError, match="unknown keyword 'chunksize'"):
        feste.compute(inc(1), chunksize=4)


# -- retries (feste._calls.send) ------------------------------------------------------


def test_transient_errors_are_retried_until_success(llm_server_factory):
    server = llm_server_factory(fault_500=0.5, seed=1)
    llm = chat_backend(server)
    results = feste.compute([llm.chat(f"q{i}") for i in range(10)], retry_backoff=0.001)[0]
    assert results == [CHAT.format(f"q{i}") for i in range(10)]
    stats = server.stats()
    assert stats["status_counts"]["500"] > 0
    assert stats["requests"] == 10 + stats["status_counts"]["500"]


def test_authentication_errors_are_never_retried(llm_server_factory):
    from feste.errors import AuthenticationError

    server = llm_server_factory(api_key="right-key")
    llm = OpenAI(base_url=server.openai_base_url, api_key="wrong-key")
    with pytest.raises(AuthenticationError) as info:
        feste.compute(llm.chat("q"), retry_backoff=0.001)
    assert "wrong-key" not in str(info.value)
    assert server.stats()["requests"] == 1


def test_a_request_over_task_timeout_is_retried_then_fails(llm_server):
    from feste.errors import TransientError

    llm = chat_backend(llm_server)
    (result,) = feste.compute(
        llm.chat("q [[hang]]"),
        task_timeout=0.1,
        max_retries=1,
        retry_backoff=0.001,
        errors="return",
    )
    assert isinstance(result.exception, TransientError)
    assert "no answer within 0.1 s" in str(result.exception)
    assert result.attempts == 2
    # Each attempt was abandoned: the server answered neither. (Under load an attempt
    # may time out before the server has even read it, so the hangs it counts are at
    # most the two attempts.)
    stats = llm_server.stats()
    assert stats["status_counts"] == {}
    assert stats["faults"]["hang"] <= stats["requests"] <= 2


def test_retry_after_is_honoured(llm_server_factory):
    # The server asks for 30 s; the backoff alone would retry after at most 1 ms.
    server = llm_server_factory(retry_after=30)
    llm = chat_backend(server)

    async def main():
        run = asyncio.ensure_future(
            feste.compute_async(llm.chat("q [[status:429]]"), max_retries=1, retry_backoff=0.001)
        )
        while server.stats()["status_counts"].get("429", 0) == 0:
            await asyncio.sleep(0.01)
        # A client deadline of one second after the 429: the run is still waiting.
        finished, _ = await asyncio.wait({run}, timeout=1.0)
        run.cancel()
        await asyncio.wait({run})
        return bool(finished)

    assert asyncio.run(main()) is False
    # The retry had not gone out.
    stats = server.stats()
    assert stats["requests"] == 1
    assert stats["status_counts"] == {"429": 1}


def test_rate_limit_retries_are_bounded_by_time_not_by_attempts(llm_server_factory):
    server = llm_server_factory(retry_after=0.3)
    llm = chat_backend(server)
    (result,) = feste.compute(
        llm.chat("q [[status:429]]"),
        max_retries=0,  # 429s do not count against it
        rate_limit_timeout=0.5,
        retry_backoff=0.001,
        errors="return",
    )
    assert isinstance(result.exception, RateLimitError)
    assert result.exception.retry_after == pytest.approx(0.3)
    # One retry: a second one would start past rate_limit_timeout (0.3 + 0.3 > 0.5).
    assert result.attempts == 2
    assert server.stats()["requests"] == 2


# -- events and progress --------------------------------------------------------------


def test_callbacks_as_keywords():
    done: list[tuple[str, int]] = []
    failed: list[tuple[str, str]] = []
    progress: list[tuple[int, int]] = []
    a = inc(1)
    b = inc(a)
    bad = fail(b)
    feste.compute(
        [b, bad],
        errors="return",
        on_task_done=lambda key, value: done.append((key, value)),
        on_task_failed=lambda key, exc: failed.append((key, type(exc).__name__)),
        on_progress=lambda n, total: progress.append((n, total)),
    )
    assert sorted(done) == sorted([(a.key, 2), (b.key, 3)])
    assert failed == [(bad.key, "ValueError")]
    assert progress == [(1, 3), (2, 3), (3, 3)]


def test_a_failing_callback_stops_the_run():
    def broken(key, value):
        raise RuntimeError("callback broke")

    with pytest.raises(RuntimeError, match="callback broke"):
        feste.compute(inc(1), on_task_done=broken)


def test_no_progress_output_when_not_asked(capsys):
    feste.compute(inc(1), progress=False)
    assert capsys.readouterr().err == ""


# -- running from async code ----------------------------------------------------------


def test_compute_inside_a_running_loop_uses_a_helper_thread(llm_server):
    llm = chat_backend(llm_server)

    async def main():
        # Blocking compute from async code (as in Jupyter) still works.
        return feste.compute(llm.chat("inside"), inc(1))

    assert asyncio.run(main()) == (CHAT.format("inside"), 2)


def test_compute_async_runs_on_the_callers_loop(llm_server):
    llm = chat_backend(llm_server)

    @feste_task(pure=False)
    async def loop_id(_=None):
        return id(asyncio.get_running_loop())

    async def main():
        here = id(asyncio.get_running_loop())
        answer, there = await feste.compute_async(llm.chat("q"), loop_id(), errors="return")
        return answer, here == there

    assert asyncio.run(main()) == (CHAT.format("q"), True)


def test_compute_async_with_another_scheduler():
    async def main():
        return await feste.compute_async(inc(inc(1)), scheduler="sync")

    assert asyncio.run(main()) == (3,)


# -- streaming ------------------------------------------------------------------------


@feste_task(pure=False)
async def after(value, *earlier):
    """``value``, once the values in ``earlier`` are known (an order, not a delay)."""
    await asyncio.sleep(0)
    return value


def test_as_completed_yields_each_as_it_settles_with_indexes():
    first = after("first")
    second = after("second", first)
    third = after("third", second)
    pairs = list(feste.as_completed([third, first, "plain", second]))
    assert pairs == [(2, "plain"), (1, "first"), (3, "second"), (0, "third")]


def test_as_completed_preserve_order():
    b = after("b")
    c = after("c", b)
    a = after("a", c)
    pairs = list(feste.as_completed([a, b, c], preserve_order=True))
    assert pairs == [(0, "a"), (1, "b"), (2, "c")]


def test_as_completed_with_structures_and_duplicates():
    x = inc(1)
    pairs = sorted(feste.as_completed([x, {"k": [x, inc(x)]}, x]))
    assert pairs == [(0, 2), (1, {"k": [2, 3]}), (2, 2)]


def test_as_completed_yields_failures_by_default():
    pairs = dict(feste.as_completed([inc(1), fail(5), inc(fail(6))]))
    assert pairs[0] == 2
    assert isinstance(pairs[1], Failure) and isinstance(pairs[1].exception, ValueError)
    assert isinstance(pairs[2], Failure) and pairs[2].cancelled


def test_as_completed_raises_when_asked():
    stream = feste.as_completed([after(1), fail(5)], errors="raise")
    with pytest.raises(ValueError, match="cannot use 5"):
        list(stream)


def test_as_completed_async_iteration():
    async def main():
        pairs = []
        b = after("b")
        async for pair in feste.as_completed([after("a", b), b]):
            pairs.append(pair)
        return pairs

    assert asyncio.run(main()) == [(1, "b"), (0, "a")]


@feste_task
def hanging_prompt(answer, i):
    return f"after {answer}: {i} [[hang]]"


def answer_then_hanging_calls(server):
    """One call, then 100 calls that need its answer and hang (until cancelled).

    At most four requests are in flight, and a hanging one never ends by itself: while
    the first answer is being used, no more than 1 + 4 requests can have been sent.
    """
    llm = chat_backend(server, max_concurrency=4)
    first = llm.chat("q")
    return [first] + [llm.chat(hanging_prompt(first, i)) for i in range(100)]


def test_breaking_out_of_as_completed_cancels_the_rest(llm_server_factory):
    server = llm_server_factory(hang_seconds=600)
    calls = answer_then_hanging_calls(server)
    for index, value in feste.as_completed(calls, task_timeout=300):
        assert (index, value) == (0, CHAT.format("q"))
        break
    # The hanging requests in flight were cancelled, the others never sent.
    assert wait_until(lambda: server.stats()["in_flight"] == 0)
    stats = server.stats()
    assert stats["status_counts"] == {"200": 1}
    assert 1 + stats["faults"]["hang"] <= stats["requests"] <= 5


def test_breaking_out_of_async_as_completed_cancels_the_rest(llm_server_factory):
    server = llm_server_factory(hang_seconds=600)
    calls = answer_then_hanging_calls(server)

    async def main():
        async with feste.as_completed(calls, task_timeout=300) as stream:
            async for pair in stream:
                return pair
        return None

    assert asyncio.run(main()) == (0, CHAT.format("q"))
    assert wait_until(lambda: server.stats()["in_flight"] == 0)
    stats = server.stats()
    assert stats["status_counts"] == {"200": 1}
    assert 1 + stats["faults"]["hang"] <= stats["requests"] <= 5


def test_as_completed_refuses_other_schedulers_and_bad_options():
    with pytest.raises(SchedulerError, match="async engine"):
        feste.as_completed([inc(1)], scheduler="threads")
    with pytest.raises(feste.errors.OptionError, match="errors"):
        feste.as_completed([inc(1)], errors="ignore")


# -- runtime coalescing ---------------------------------------------------------------


def test_calls_ready_at_different_moments_share_one_request(llm_server):
    from feste.backend.cohere import Cohere

    co = Cohere(base_url=llm_server.cohere_base_url, api_key="k")
    # Cohere embeds 96 texts per request: a full group goes out at once, so the long
    # window never has to close (however slowly the texts are made).
    texts = [text_of(i) for i in range(96)]
    embeds = [co.embed(text) for text in texts]
    # Without the optimizer the embeds stay separate nodes: the engine gathers them.
    results = feste.compute(embeds, optimize_graph=False, batch_window=600)[0]
    assert results == [embedding("embed-v4.0", f"text {i}") for i in range(96)]
    stats = llm_server.stats()
    assert stats["by_route"]["/v2/embed"] == 1
    (sent,) = stats["inputs"]["/v2/embed"]
    assert sorted(sent) == sorted(f"text {i}" for i in range(96))


def test_coalesced_items_fail_alone(llm_server):
    llm = chat_backend(llm_server)
    texts = ["one", "two [[status:400]]", "three"]
    embeds = [llm.embed(text_of(text)) for text in texts]
    results = feste.compute(embeds, optimize_graph=False, batch_window=0.5, errors="return")[0]
    assert results[0] == embedding(EMBED_MODEL, "text one")
    assert isinstance(results[1], Failure)
    assert isinstance(results[1].exception, BadRequestError)
    assert results[1].key == embeds[1].key
    assert results[2] == embedding(EMBED_MODEL, "text three")


def test_batch_window_zero_sends_what_is_ready(llm_server):
    llm = chat_backend(llm_server)
    embeds = [llm.embed(f"t{i}") for i in range(4)]
    results = feste.compute(embeds, optimize_graph=False, batch_window=0)[0]
    assert results == [embedding(EMBED_MODEL, f"t{i}") for i in range(4)]
    # All four were ready at once: one request.
    assert llm_server.stats()["items_per_request"]["/v1/embeddings"] == [4]


@pytest.mark.parametrize("window", [0.0, 0.0005])
def test_calls_ready_at_the_start_fill_their_requests(llm_server, window):
    # The start readies its calls in slices (sending full groups early); a group is
    # never cut by the window, nor sent at once with window 0, before the start has
    # readied every call: 3,000 ready embeds are full requests of 96 and the rest.
    from feste.backend.cohere import Cohere

    co = Cohere(base_url=llm_server.cohere_base_url, api_key="k")
    embeds = [co.embed(f"t{i}") for i in range(3000)]
    results = feste.compute(embeds, optimize_graph=False, batch_window=window)[0]
    assert results == [embedding("embed-v4.0", f"t{i}") for i in range(3000)]
    sizes = llm_server.stats()["items_per_request"]["/v2/embed"]
    assert sorted(sizes, reverse=True) == [96] * 31 + [24]


def test_coalescing_respects_the_batch_size(llm_server):
    from feste.backend.cohere import Cohere

    co = Cohere(base_url=llm_server.cohere_base_url, api_key="k")
    embeds = [co.embed(f"t{i}") for i in range(200)]
    results = feste.compute(embeds, optimize_graph=False, batch_window=0.2)[0]
    assert len(results) == 200
    sizes = llm_server.stats()["items_per_request"]["/v2/embed"]
    assert sum(sizes) == 200
    assert max(sizes) <= 96


# -- interruption ---------------------------------------------------------------------

INTERRUPTED_SCRIPT = textwrap.dedent(
    """
    import sys
    import feste
    from feste.backend.openai import OpenAI

    llm = OpenAI(base_url=sys.argv[1], api_key="k", max_concurrency=8)
    print("started", flush=True)
    feste.compute([llm.chat(f"slow {i} [[hang]]") for i in range(20)], task_timeout=60)
    print("finished", flush=True)
    """
)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted_while_hanging(server, script: str) -> tuple[int, str, str]:
    """Run ``script`` against ``server``, Ctrl-C it once 8 requests hang; its outcome."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, server.openai_base_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as in a terminal: a shell that started pytest in the background made
        # it ignore SIGINT, and a child that inherits that never sees the interrupt.
        preexec_fn=_default_sigint,
    )
    try:
        assert wait_until(lambda: server.stats()["in_flight"] == 8, timeout=60)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, out, err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_cancels_in_flight_requests(llm_server_factory):
    server = llm_server_factory(mode="process")
    returncode, out, err = interrupted_while_hanging(server, INTERRUPTED_SCRIPT)
    assert returncode != 0
    assert "KeyboardInterrupt" in err
    assert "finished" not in out
    assert wait_until(lambda: server.stats()["in_flight"] == 0)


INTERRUPTED_INSIDE_ASYNCIO_RUN = textwrap.dedent(
    """
    import asyncio
    import sys
    import feste
    from feste.backend.openai import OpenAI

    async def main():
        llm = OpenAI(base_url=sys.argv[1], api_key="k", max_concurrency=8)
        print("started", flush=True)
        # A synchronous compute inside async code (it runs on feste's helper thread).
        feste.compute([llm.chat(f"slow {i} [[hang]]") for i in range(20)], task_timeout=60)
        print("finished", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_a_synchronous_compute_inside_asyncio_run(llm_server_factory):
    server = llm_server_factory(mode="process")
    returncode, out, err = interrupted_while_hanging(server, INTERRUPTED_INSIDE_ASYNCIO_RUN)
    assert returncode != 0
    assert "KeyboardInterrupt" in err
    assert "finished" not in out
    # Only the first eight were ever sent; the in-flight ones were cancelled.
    assert server.stats()["requests"] == 8
    assert wait_until(lambda: server.stats()["in_flight"] == 0)


def test_dask_compute_of_feste_values_uses_the_engine():
    # dask.compute hands feste values to feste's scheduler (async by default).
    assert dask.compute(thread_name())[0].startswith("feste-worker-")
