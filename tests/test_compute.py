"""feste.compute: results, nesting, schedulers, errors, and interplay with Dask.

Task functions are defined at module level so that the processes scheduler can import
them in its workers. Each processes run starts a pool, so those runs are few.
"""

from __future__ import annotations

import dask
import pytest
from dask.delayed import Delayed

import feste
from feste import context
from feste.backend.openai import OpenAI
from feste.compute import compute, explain, prepare
from feste.errors import BadRequestError, SchedulerError
from feste.graph import GraphStats
from feste.task import FesteDelayed, feste_task


@feste_task
def inc(a):
    return a + 1


@feste_task
def add(a, b):
    return a + b


@feste_task(nout=2)
def split_words(text):
    first, _, rest = text.partition(" ")
    return first, rest


@feste_task
def read_option(name):
    return context.get(name)


@feste_task
def fail_with_value_error(x):
    raise ValueError(f"cannot use {x}")


@feste_task
def fail_with_key_error(x):
    return {}[x]


@feste_task
def fail_with_backend_error():
    raise BadRequestError("prompt too long", backend="openai", method="chat", status=400)


def _times_ten(x):
    return x * 10


def diamond_and_friends():
    """A small graph with shared nodes, unpacking, nesting and a plain value."""
    a = inc(1, dask_key_name="a")
    b = inc(a, dask_key_name="b")
    c = add(a, 10, dask_key_name="c")
    d = add(b, c, dask_key_name="d")
    head, tail = split_words("hello lazy world")
    return [d, {"c": c, "words": (head, tail)}, "plain", 7]


EXPECTED = [15, {"c": 12, "words": ("hello", "lazy world")}, "plain", 7]


# -- results -------------------------------------------------------------------------------


def test_returns_a_tuple_with_one_result_per_argument_like_dask():
    a, b = inc(1), inc(2)
    assert compute(a, scheduler="sync") == (2,)
    assert compute(a, b, scheduler="sync") == (2, 3)
    assert isinstance(compute(a, scheduler="sync"), tuple)
    # The same shape dask.compute gives for the equivalent dask.delayed values.
    plain = (dask.delayed(_times_ten)(1), [dask.delayed(_times_ten)(2)])
    assert compute(*plain, scheduler="sync") == dask.compute(*plain, scheduler="sync")


def test_nested_containers_are_rebuilt_with_results():
    assert list(compute(*diamond_and_friends(), scheduler="sync")) == EXPECTED
    nested = {"list": [inc(0), [inc(1)]], "tuple": (inc(2), "x"), "set-like": {"k": inc(3)}}
    assert compute(nested, scheduler="sync") == (
        {"list": [1, [2]], "tuple": (3, "x"), "set-like": {"k": 4}},
    )


def test_non_lazy_arguments_pass_through():
    marker = object()
    assert compute(1, "two", [3], scheduler="sync") == (1, "two", [3])
    assert compute(marker)[0] is marker
    assert compute() == ()
    assert feste.compute is compute


def test_traverse_false_leaves_containers_alone():
    x = inc(1)
    (holder,) = compute([x], traverse=False, scheduler="sync")
    assert holder == [x]
    assert isinstance(holder[0], FesteDelayed)


def test_optimize_graph_false_gives_the_same_results():
    assert list(compute(*diamond_and_friends(), scheduler="sync", optimize_graph=False)) == (
        EXPECTED
    )


def test_shared_nodes_run_once():
    calls = []

    @feste_task
    def record(x):
        calls.append(x)
        return x

    shared = record(5)
    assert compute(add(shared, shared), [shared], scheduler="sync") == (10, [5])
    assert calls == [5]


def test_prepare_returns_graph_keys_repack_and_postcomputes():
    d = diamond_and_friends()[0]
    prepared = prepare([d, "x"])
    graph, keys, repack, postcomputes = (
        prepared.graph,
        prepared.keys,
        prepared.repack,
        prepared.postcomputes,
    )
    assert sorted(graph) == ["a", "b", "c", "d"]
    assert keys == [["d"]]
    assert len(postcomputes) == 1
    finalize, extra = postcomputes[0]
    assert repack([finalize([15], *extra)]) == ([15, "x"],)


def test_explain_counts_without_running():
    calls = []

    @feste_task
    def record(x):
        calls.append(x)
        return x

    stats = explain(add(record(1), record(2)), [record(3)])
    assert isinstance(stats, GraphStats)
    assert (stats.nodes, stats.depth) == (4, 2)
    assert stats.calls == {}
    assert calls == []


# -- schedulers ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["threads", "synchronous", "threading", "sync"])
def test_threads_and_aliases_match_sync(scheduler):
    assert list(compute(*diamond_and_friends(), scheduler=scheduler)) == EXPECTED


def test_threads_scheduler_passes_num_workers():
    with context.set(num_workers=2):
        assert list(compute(*diamond_and_friends(), scheduler="threads")) == EXPECTED
    assert list(compute(*diamond_and_friends(), scheduler="threads", num_workers=1)) == EXPECTED


def test_processes_scheduler_matches_sync_and_receives_options():
    # One pool start for several checks: same results, lambdas via cloudpickle, options.
    lambda_task = feste_task(lambda x: x * 3)
    with context.set(max_retries=2, errors="return"):
        results = compute(
            *diamond_and_friends(),
            lambda_task(4),
            read_option("max_retries"),
            read_option("errors"),
            scheduler="processes",
            num_workers=2,
        )
    assert list(results[:4]) == EXPECTED
    assert results[4:] == (12, 2, "return")


def test_unknown_scheduler_lists_the_valid_ones():
    with pytest.raises(SchedulerError) as raised:
        compute(inc(1), scheduler="gpu")
    message = str(raised.value)
    assert message.startswith("unknown scheduler 'gpu'; valid schedulers: ")
    for name in ("'async'", "'processes'", "'sync'", "'threads'"):
        assert name in message
    assert isinstance(raised.value, ValueError)


def test_an_object_that_cannot_schedule_is_refused():
    with pytest.raises(SchedulerError, match=r"cannot schedule with 42"):
        compute(inc(1), scheduler=42)


def test_a_get_function_is_a_scheduler():
    seen = []

    def my_get(graph, keys, **kwargs):
        seen.append((sorted(graph), keys, kwargs))
        from dask.local import get_sync

        return get_sync(graph, keys)

    x = inc(1, dask_key_name="x")
    assert compute(x, scheduler=my_get, flag=True) == (2,)
    assert seen == [(["x"], [["x"]], {"flag": True})]


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_a_failing_task_raises_its_own_exception_naming_the_key(scheduler):
    failing = fail_with_value_error("bad input", dask_key_name="parse-1")
    with pytest.raises(ValueError) as raised:
        compute(add(failing, 1), scheduler=scheduler)
    assert type(raised.value) is ValueError
    assert str(raised.value) == "cannot use bad input (in feste task 'parse-1')"


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_exceptions_with_their_own_str_get_the_key_as_a_note(scheduler):
    # KeyError's args are the missing key itself, so feste leaves them alone.
    failing = fail_with_key_error("missing", dask_key_name="lookup-1")
    with pytest.raises(KeyError) as raised:
        compute(failing, scheduler=scheduler)
    assert raised.value.args == ("missing",)
    assert raised.value.__notes__ == ["raised in feste task 'lookup-1'"]


def test_a_failing_task_in_a_process_raises_its_own_exception_naming_the_key():
    failing = fail_with_value_error(3, dask_key_name="parse-3")
    with pytest.raises(ValueError, match=r"^cannot use 3 \(in feste task 'parse-3'\)$"):
        compute(failing, scheduler="processes", num_workers=1)


def test_a_backend_error_gets_the_task_key_as_an_attribute():
    failing = fail_with_backend_error(dask_key_name="chat-1")
    with pytest.raises(BadRequestError) as raised:
        compute(failing, scheduler="threads")
    assert raised.value.key == "chat-1"
    assert str(raised.value) == "[openai.chat status=400 task='chat-1'] prompt too long"


# -- interplay with Dask -------------------------------------------------------------------


def test_dask_compute_accepts_feste_values():
    assert dask.compute(inc(1), [add(2, 3)]) == (2, [5])
    assert dask.compute(inc(1), scheduler="sync") == (2,)


def test_dask_delayed_on_a_feste_value_computed_by_both():
    on_top = dask.delayed(_times_ten)(inc(1))
    assert type(on_top) is Delayed  # dask's own, not feste's
    assert dask.compute(on_top) == (20,)
    assert compute(on_top, scheduler="sync") == (20,)
    assert compute(on_top, scheduler="threads") == (20,)


def test_feste_task_on_a_dask_delayed_value():
    base = dask.delayed(_times_ten)(2)
    on_top = add(base, 1)
    assert isinstance(on_top, FesteDelayed)
    assert on_top.compute(scheduler="sync") == 21
    assert dask.compute(on_top) == (21,)


def test_mixing_feste_and_dask_values():
    feste_value, dask_value = inc(1), dask.delayed(_times_ten)(3)
    assert compute(feste_value, dask_value, scheduler="sync") == (2, 30)
    # dask.compute refuses collections with different default schedulers unless told one.
    with pytest.raises(ValueError, match="differing default schedulers"):
        dask.compute(feste_value, dask_value)
    assert dask.compute(feste_value, dask_value, scheduler="sync") == (2, 30)


def test_explain_says_which_calls_are_batched_at_run_time(llm_server):
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key="k")
    literal = [llm.embed(f"text {index}") for index in range(5)]
    after_chat = [llm.embed(llm.chat(f"question {index}")) for index in range(3)]
    stats = feste.explain(literal, after_chat)
    assert stats.at_run_time == {"openai.embed": 3}
    assert "openai.chat: 3 calls -> 3 requests" in str(stats)
    assert (
        "openai.embed: 8 calls -> at most 4 requests (3 batched at run time as their inputs "
        "arrive)" in str(stats)
    )
    # Nothing was sent.
    assert llm_server.stats()["requests"] == 0
