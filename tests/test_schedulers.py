"""One suite for every scheduler: the same graphs give the same results on all four.

In the manner of dask's ``GetFunctionTestMixin``: each test receives ``get``, the
scheduler's ``get(graph, keys)`` function, or its name for ``feste.compute``, and is
run for "async", "sync", "threads" and "processes". Task functions live at module level
so that worker processes can import them.
"""

from __future__ import annotations

import asyncio
import operator
from pathlib import Path

import dask
import pytest
from dask.task_spec import Alias, DataNode, List, Task, TaskRef

import feste
from feste import context
from feste.backend.openai import OpenAI
from feste.errors import BadRequestError
from feste.schedulers import SCHEDULERS, get_scheduler
from feste.task import FesteBase, feste_task
from feste.testing import chat_text, embedding

ALL = ["async", "sync", "threads", "processes"]

CALL_LINE = next(
    number
    for number, line in enumerate(Path(__file__).read_text().splitlines(), 1)
    if line.endswith("# CALL_LINE")
)


@pytest.fixture(params=ALL)
def scheduler(request):
    return request.param


@pytest.fixture
def get(scheduler):
    return get_scheduler(scheduler)


def add(x, y):
    return x + y


def total(values):
    return sum(values)


@feste_task
def inc(x):
    return x + 1


@feste_task
def mul(x, y):
    return x * y


@feste_task
def join(*parts, sep=" "):
    return sep.join(str(part) for part in parts)


@feste_task
async def async_double(x):
    await asyncio.sleep(0)
    return 2 * x


@feste_task(nout=2)
def halves(text):
    middle = len(text) // 2
    return text[:middle], text[middle:]


@feste_task
def explode(x):
    raise KeyError(f"no entry {x}")


@feste_task
def refuse(x):
    raise ValueError(f"refused {x}")


def mentions(exc, text):
    """``text`` is in the message of ``exc`` or in its notes (shown with the traceback)."""
    return text in str(exc) or any(text in note for note in getattr(exc, "__notes__", ()))


@feste_task
def read_option(name):
    return context.get(name)


@feste_task(pure=True)
def review(index):
    if index == 3:
        raise ValueError("review 3 is unreadable")
    return f"review {index}: the soup was fine"


class Greeter(FesteBase):
    def __init__(self, greeting):
        self.greeting = greeting

    @feste_task
    def greet(self, name):
        return f"{self.greeting}, {name}"


def test_every_scheduler_is_covered():
    assert sorted(SCHEDULERS) == sorted(ALL)


# -- raw graphs -----------------------------------------------------------------------


def test_raw_graphs_single_and_nested_keys(get):
    graph = {
        "x": DataNode("x", 1),
        "y": DataNode("y", 2),
        "z": Task("z", add, TaskRef("x"), TaskRef("y")),
        "w": Task("w", total, List(TaskRef("x"), TaskRef("y"), TaskRef("z"))),
        "pair": DataNode("pair", (3, 4)),
        "second": Task("second", operator.getitem, TaskRef("pair"), 1),
        "same": Alias("same", "second"),
    }
    assert get(graph, "w") == 6
    assert get(graph, ["x", "y"]) == (1, 2)
    assert get(graph, [["x"], ["y", "z"], ["same", "second"]]) == ((1,), (2, 3), (4, 4))
    legacy = {"a": 1, "b": 2, "c": (add, "a", "b"), "d": (total, ["a", "b", "c"])}
    assert get(legacy, ["d", "c"]) == (6, 3)


def test_error_keeps_type_and_names_the_task(get):
    graph = {
        "x": DataNode("x", 1),
        "bad": Task("bad", refuse.func, TaskRef("x")),
        "missing": Task("missing", explode.func, TaskRef("x")),
    }
    with pytest.raises(ValueError) as info:
        get(graph, "bad")
    assert str(info.value) == "refused 1 (in feste task 'bad')"
    with pytest.raises(KeyError) as key_info:
        get(graph, "missing")
    # KeyError quotes its message, so the key goes into a note instead.
    assert mentions(key_info.value, "'missing'")


# -- feste values ---------------------------------------------------------------------


def test_chains_diamonds_and_nested_structures(scheduler):
    a = inc(1)
    diamond = join(inc(a), mul(a, 10), sep="+")
    result = feste.compute(
        diamond,
        {"a": a, "list": [a, inc(a)], "tuple": (mul(a, a), "plain")},
        7,
        scheduler=scheduler,
    )
    assert result == ("3+20", {"a": 2, "list": [2, 3], "tuple": (4, "plain")}, 7)


def test_delayed_async_unpacking_and_methods(scheduler):
    doubled = dask.delayed(operator.mul)(inc(4), 2)
    combined = join(doubled, dask.delayed(str.upper)("x"))
    first, second = halves("abcdef")
    greeting = Greeter("hello").greet(join("a", "b"))
    result = feste.compute(
        combined,
        doubled,
        inc(async_double(inc(1))),
        first.upper(),
        second[0],
        greeting,
        scheduler=scheduler,
    )
    assert result == ("10 X", 10, 5, "ABC", "d", "hello, a b")


def test_fan_out_fan_in(scheduler):
    leaves = [mul(i, i) for i in range(60)]
    sums = [join(*leaves[i : i + 10], sep=",") for i in range(0, 60, 10)]
    expected = tuple(",".join(str(i * i) for i in range(j, j + 10)) for j in range(0, 60, 10))
    assert feste.compute(*sums, scheduler=scheduler) == expected


def test_options_reach_the_tasks(scheduler):
    with context.set(max_retries=2):
        assert feste.compute(read_option("max_retries"), scheduler=scheduler) == (2,)


def test_task_error_keeps_type_and_names_the_task(scheduler):
    bad = refuse(inc(1))
    with pytest.raises(ValueError) as info:
        feste.compute(inc(bad), scheduler=scheduler)
    assert str(info.value) == f"refused 2 (in feste task {bad.key!r})"
    missing = explode(inc(1))
    with pytest.raises(KeyError) as key_info:
        feste.compute(missing, scheduler=scheduler)
    assert mentions(key_info.value, missing.key)


# -- backend calls --------------------------------------------------------------------


def test_backend_calls(scheduler, llm_server):
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="k")
    answers = [llm.chat(join("question", i)) for i in range(5)]
    vectors = [llm.embed(f"text {i}") for i in range(5)]
    chained = llm.embed(llm.chat("hi"))
    result = feste.compute(answers, vectors, chained, scheduler=scheduler)
    assert result == (
        [chat_text("gpt-4o-mini", f"question {i}") for i in range(5)],
        [embedding("text-embedding-3-small", f"text {i}") for i in range(5)],
        embedding("text-embedding-3-small", chat_text("gpt-4o-mini", "hi")),
    )
    # The optimizer batched the five literal embeds into one request, everywhere.
    assert llm_server.stats()["by_route"]["/v1/embeddings"] == 2


def test_backend_error_names_backend_and_task(scheduler, llm_server):
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="k")
    call = llm.chat("x [[status:400]]")  # CALL_LINE
    with pytest.raises(BadRequestError) as info:
        feste.compute(call, scheduler=scheduler)
    assert "openai.chat" in str(info.value)
    assert call.key in str(info.value)
    # It also names the input and the line that made the call.
    assert str(info.value).endswith(
        f"(input 'x [[status:400]]', called at test_schedulers.py:{CALL_LINE} in "
        "test_backend_error_names_backend_and_task)"
    )


# -- partial failure, callbacks and keywords ------------------------------------------


def test_errors_return_gives_failures_and_cancels_dependents(scheduler):
    bad = refuse(1)
    dependent = inc(bad)
    fan_in = total_task([dependent, inc(10)])
    independent = inc(5)
    ((bad_out, dependent_out, fan_in_out, independent_out),) = feste.compute(
        [bad, dependent, fan_in, independent], scheduler=scheduler, errors="return"
    )
    assert independent_out == 6
    assert isinstance(bad_out, feste.Failure)
    assert not bad_out.cancelled
    assert bad_out.key == bad.key
    assert isinstance(bad_out.exception, ValueError)
    assert str(bad_out.exception) == f"refused 1 (in feste task {bad.key!r})"
    for out, task in ((dependent_out, dependent), (fan_in_out, fan_in)):
        assert isinstance(out, feste.Failure)
        assert out.cancelled
        assert out.key == task.key
        assert isinstance(out.exception, feste.errors.CancelledError)
        assert bad.key in str(out.exception)


def test_a_chain_of_cancelled_tasks_names_each_task_and_the_failed_one(scheduler):
    bad = refuse(1)
    first = inc(bad)
    second = mul(first, 2)
    ((first_out, second_out),) = feste.compute(
        [first, second], scheduler=scheduler, errors="return"
    )
    for out, task in ((first_out, first), (second_out, second)):
        assert out.cancelled
        assert out.key == task.key
        assert out.attempts == 0
        assert str(out.exception) == (
            f"task {task.key!r} was not run because task {bad.key!r} failed: "
            f"ValueError: refused 1 (in feste task {bad.key!r})"
        )


def test_a_failed_input_costs_only_its_own_item_of_a_planned_batch(scheduler, llm_server):
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="k")
    reviews = [review(index) for index in range(10)]
    vectors = [llm.embed(text) for text in reviews]
    # The ten embeds need no other call: the optimizer plans them as one batch.
    assert "openai.embed: 10 calls -> 1 request" in str(feste.explain(vectors))
    (results,) = feste.compute(vectors, scheduler=scheduler, errors="return")
    texts = [f"review {index}: the soup was fine" for index in range(10) if index != 3]
    for index, result in enumerate(results):
        if index != 3:
            assert result == embedding(
                "text-embedding-3-small", f"review {index}: the soup was fine"
            )
    failed = results[3]
    assert failed.cancelled
    assert failed.key == vectors[3].key
    assert str(failed.exception).startswith(
        f"task {vectors[3].key!r} was not run because task {reviews[3].key!r} failed: "
        "ValueError: review 3 is unreadable"
    )
    # One request with exactly the nine good items.
    assert llm_server.stats()["inputs"]["/v1/embeddings"] == [texts]


def test_a_failed_call_upstream_costs_only_its_own_embedding(scheduler, llm_server):
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="k")
    questions = [
        f"review {index}" + (" [[status:400]]" if index == 3 else "") for index in range(10)
    ]
    answers = [llm.chat(question) for question in questions]
    vectors = [llm.embed(answer) for answer in answers]
    (results,) = feste.compute(vectors, scheduler=scheduler, errors="return")
    for index, result in enumerate(results):
        if index != 3:
            expected = chat_text("gpt-4o-mini", questions[index])
            assert result == embedding("text-embedding-3-small", expected)
    assert results[3].cancelled
    assert answers[3].key in str(results[3].exception)
    assert "BadRequestError" in str(results[3].exception)
    # The server embedded exactly the nine answers, whichever requests carried them.
    sent = [text for request in llm_server.stats()["inputs"]["/v1/embeddings"] for text in request]
    assert sorted(sent) == sorted(
        chat_text("gpt-4o-mini", questions[index]) for index in range(10) if index != 3
    )


def test_progress_counts_tasks_not_literals(get):
    progress = []
    graph = {
        "x": DataNode("x", 1),
        "y": Task("y", add, TaskRef("x"), 1),
        "z": Task("z", add, TaskRef("y"), TaskRef("x")),
    }
    result = get(graph, "z", on_progress=lambda finished, total: progress.append((finished, total)))
    assert result == 3
    assert progress == [(1, 2), (2, 2)]


def test_the_progress_bar_counts_calls_requests_and_failures(scheduler, llm_server, capsys):
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="k")
    chats = [llm.chat(join("question", index)) for index in range(3)]
    vectors = [llm.embed(f"text {index}") for index in range(5)]  # one batched request
    broken = llm.chat("x [[status:400]]")
    feste.compute(chats, vectors, broken, scheduler=scheduler, errors="return", progress=True)
    drawn = capsys.readouterr().err
    final = drawn.strip().splitlines()[-1]
    # Nine calls as written (not graph steps), one of them failed.
    assert "9/9 calls" in final
    assert "1 failed" in final
    assert "5 requests" in final


def test_a_limit_holds_for_the_whole_computation(scheduler, llm_server_factory):
    server = llm_server_factory(latency=0.02)
    llm = OpenAI(base_url=server.openai_base_url, api_key="k")
    questions = [join("question", index) for index in range(24)]  # plain tasks first
    answers = feste.compute(
        [llm.chat(question) for question in questions], scheduler=scheduler, max_concurrency=3
    )[0]
    assert answers == [chat_text("gpt-4o-mini", f"question {index}") for index in range(24)]
    # Whatever runs the plain tasks (threads, processes), requests share one limit.
    most = server.stats()["max_in_flight"]
    if scheduler in ("async", "processes"):  # calls as coroutines: the cap is reached
        assert most == 3
    else:  # dask's pool runs one call per worker at a time
        assert most <= 3


def test_record_usage_sees_every_request(scheduler, llm_server):
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="k")
    calls = [llm.chat(join("question", index)) for index in range(4)]
    calls += [llm.embed(f"text {index}") for index in range(3)]
    with feste.record_usage() as usage:
        feste.compute(calls, scheduler=scheduler)
    assert len(usage.records) == llm_server.stats()["requests"] == 5
    assert sorted(record.items for record in usage.records) == [1, 1, 1, 1, 3]


def test_callbacks_see_every_task(scheduler):
    done, failed, progress = [], [], []
    values = [inc(i) for i in range(3)]
    bad = refuse(7)
    feste.compute(
        values,
        bad,
        scheduler=scheduler,
        errors="return",
        on_task_done=lambda key, value: done.append((key, value)),
        on_task_failed=lambda key, exc: failed.append((key, type(exc).__name__)),
        on_progress=lambda finished, total: progress.append((finished, total)),
    )
    assert sorted(done) == sorted((value.key, i + 1) for i, value in enumerate(values))
    assert failed == [(bad.key, "ValueError")]
    assert progress[-1] == (4, 4)


def test_unknown_keyword_is_refused(scheduler):
    with pytest.raises(feste.errors.SchedulerError, match=r"unknown keyword 'bogus'.*errors"):
        feste.compute(inc(1), scheduler=scheduler, bogus=True)


@feste_task
def total_task(values):
    return sum(values)
