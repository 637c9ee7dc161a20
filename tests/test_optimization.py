"""The batching pass: grouping, levels, chunking, dedup, rewrite, and sending batches.

Graphs are built with a minimal backend defined here. Its transport answers in
process (no network) and records every request, so the tests can count requests and
items exactly; the same behaviour over real HTTP is in
tests/integration/test_batching_server.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from dask.task_spec import List, Task, TaskRef

import feste
from feste import feste_task
from feste._nodes import BackendCall, BatchCall, take_item
from feste.backend import Backend, MethodSpec
from feste.backend.transports import BaseTransport
from feste.backend.types import ItemFailure, Parsed, Request, Response
from feste.compute import prepare
from feste.errors import AuthenticationError, BadRequestError
from feste.graph import FesteGraph
from feste.optimization import (
    BatchOptimization,
    Optimization,
    Optimizer,
    call_levels,
    default_optimizer,
)


class RecordingTransport(BaseTransport):
    """Answers in process and records each request's items.

    Items holding ``BAD`` are rejected with a 400 (naming their index in the request,
    and in ``item_index`` when the backend says so); model ``"missing"`` is rejected
    as a whole with one message; items holding ``DENIED`` get a 401.
    """

    async def send(self, request: Request) -> Response:
        items = list(request.payload["input"])
        backend = self.backend
        assert isinstance(backend, FakeBackend)
        backend._requests.append(items)
        await asyncio.sleep(0)
        context = {"backend": "fake", "method": request.method, "model": request.model}
        if request.model == "missing":
            raise BadRequestError("model 'missing' does not exist", status=404, **context)
        for index, item in enumerate(items):
            if "DENIED" in item:
                raise AuthenticationError("invalid key", status=401, **context)
            if "BAD" in item:
                named = index if backend._name_bad_index else None
                raise BadRequestError(
                    f"input[{index}] is not acceptable", status=400, item_index=named, **context
                )
        return Response(200, [f"{request.method}({request.model}):{item}" for item in items])


class FakeBackend(Backend):
    provider = "fake"
    transport_class = RecordingTransport
    api_key_env = "FAKE_TEST_API_KEY"
    methods = {
        "embed": MethodSpec("embed", frozenset({"model", "dims"}), batch_size=4, batch_tokens=40),
        "chat": MethodSpec("chat", frozenset({"model"})),
    }

    def __init__(self, *, name_bad_index: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("api_key", "test-key-1234")
        super().__init__(**kwargs)
        self._requests: list[list[str]] = []
        self._name_bad_index = name_bad_index

    def embed(self, text: Any, *, pure: bool = True, **params: Any) -> Any:
        return self._call("embed", text, params, pure=pure)

    def chat(self, text: Any, **params: Any) -> Any:
        return self._call("chat", text, params)

    def build_request(self, method: str, items: list[Any], params: Mapping[str, Any]) -> Request:
        payload = {"input": list(items), **params}
        return Request("fake", method, f"/{method}", payload, params.get("model"), len(items))

    def parse_response(self, request: Request, response: Response) -> Parsed:
        return Parsed(list(response.body))


@feste_task(pure=True)
def shout(text: str) -> str:
    return text.upper()


def optimized(*values: Any) -> dict[Any, Any]:
    return prepare(*values).graph


def batch_nodes(graph: Mapping[Any, Any]) -> list[Task]:
    return [
        node for node in graph.values() if isinstance(node, Task) and type(node.func) is BatchCall
    ]


def batch_items(node: Task) -> list[Any]:
    items = node.args[0]
    assert isinstance(items, List)
    return list(items.args)


def request_sizes(backend: FakeBackend) -> list[int]:
    return sorted((len(items) for items in backend._requests), reverse=True)


# -- the optimizer --------------------------------------------------------------------


def test_default_optimizer_batches() -> None:
    passes = default_optimizer().optimizations
    assert [type(p) for p in passes] == [BatchOptimization]
    assert isinstance(passes[0], Optimization)
    assert repr(default_optimizer()) == "Optimizer([BatchOptimization()])"


def test_optimizer_refuses_non_passes() -> None:
    with pytest.raises(TypeError, match="Optimizer takes Optimization instances"):
        Optimizer([lambda graph, keys: graph])  # type: ignore[list-item]


# -- grouping and chunking ------------------------------------------------------------


def test_independent_calls_become_chunked_batches() -> None:
    backend = FakeBackend()
    values = [backend.embed(f"t{i}", model="m") for i in range(10)]
    graph = optimized(values)

    batches = batch_nodes(graph)
    assert sorted(len(batch_items(b)) for b in batches) == [2, 4, 4]
    all_items = sorted(item for b in batches for item in batch_items(b))
    assert all_items == sorted(f"t{i}" for i in range(10))
    for batch in batches:
        assert batch.kwargs == {"model": "m"}
        assert batch.func.backend is backend and batch.func.method == "embed"
        assert batch.key.startswith("fake-embed-batch-")
    # Every original key is still there, now picking its item out of a batch.
    batch_keys = {b.key for b in batches}
    for value in values:
        node = graph[value.key]
        assert node.func is take_item
        (source, index) = node.args
        assert isinstance(source, TaskRef) and source.key in batch_keys
        assert batch_items(graph[source.key])[index] == node_item(value)


def node_item(value: Any) -> Any:
    return value.dask[value.key].args[0]


def test_batch_keys_are_deterministic() -> None:
    backend = FakeBackend()
    first = optimized([backend.embed(f"t{i}") for i in range(6)])
    second = optimized([FakeBackend().embed(f"t{i}") for i in range(6)])
    assert sorted(map(str, first)) == sorted(map(str, second))


def test_token_budget_cuts_literal_chunks() -> None:
    # batch_tokens=40 and about four characters a token: two 80-character texts fill it.
    backend = FakeBackend()
    texts = [c * 80 for c in "abcd"]
    graph = optimized([backend.embed(text) for text in texts])
    assert sorted(len(batch_items(b)) for b in batch_nodes(graph)) == [2, 2]


def test_items_from_other_nodes_count_as_unknown_tokens() -> None:
    backend = FakeBackend()
    values = [backend.embed(shout(c * 80)) for c in "abcd"]
    graph = optimized(values)
    (batch,) = batch_nodes(graph)
    assert all(isinstance(item, TaskRef) for item in batch_items(batch))
    # The sender cuts the real values by the budget: two requests of two.
    assert feste.compute(values, scheduler="sync")[0] == [
        f"embed(None):{(c * 80).upper()}" for c in "abcd"
    ]
    assert request_sizes(backend) == [2, 2]


def test_different_parameters_and_backends_are_batched_apart() -> None:
    one, same_as_one, other_url = FakeBackend(), FakeBackend(), FakeBackend(base_url="http://x")
    other_key = FakeBackend(api_key="another-key-5678")
    values = [
        one.embed("a", model="m1"),
        same_as_one.embed("b", model="m1"),
        one.embed("c", model="m2"),
        one.embed("d", model="m2"),
        one.embed("e", model="m2", dims=8),
        one.embed("f", model="m2", dims=8),
        other_url.embed("g", model="m1"),
        other_url.embed("h", model="m1"),
        other_key.embed("i", model="m1"),
        other_key.embed("j", model="m1"),
    ]
    graph = optimized(values)
    groups = sorted(
        (sorted(batch_items(b)), tuple(sorted(b.kwargs.items())), b.func.backend.base_url)
        for b in batch_nodes(graph)
    )
    assert groups == [
        (["a", "b"], (("model", "m1"),), ""),
        (["c", "d"], (("model", "m2"),), ""),
        (["e", "f"], (("dims", 8), ("model", "m2")), ""),
        (["g", "h"], (("model", "m1"),), "http://x"),
        (["i", "j"], (("model", "m1"),), ""),
    ]
    (batch_ij,) = [b for b in batch_nodes(graph) if batch_items(b) == ["i", "j"]]
    assert batch_ij.func.backend is other_key


def test_parameters_equal_in_value_but_not_in_type_are_batched_apart() -> None:
    backend = FakeBackend()
    values = [
        backend.embed("a", model="m", dims=1),
        backend.embed("b", model="m", dims=1),
        backend.embed("c", model="m", dims=1.0),
        backend.embed("d", model="m", dims=1.0),
        backend.embed("e", dims=True, model="m"),
        backend.embed("f", dims=True, model="m"),
    ]
    graph = optimized(values)
    groups = sorted(
        (batch_items(b), [(name, type(value)) for name, value in sorted(b.kwargs.items())])
        for b in batch_nodes(graph)
    )
    assert groups == [
        (["a", "b"], [("dims", int), ("model", str)]),
        (["c", "d"], [("dims", float), ("model", str)]),
        (["e", "f"], [("dims", bool), ("model", str)]),
    ]


def test_calls_without_dependencies_and_calls_waiting_on_others_in_one_graph() -> None:
    backend = FakeBackend()
    independent = [backend.embed(f"text {index}", model="m") for index in range(3)]
    answer = backend.chat("question", model="m")
    rendered = shout("x")
    after_answer = backend.embed(answer, model="m")
    after_local_step = backend.embed(rendered, model="m")
    graph = optimized(independent, after_answer, after_local_step)
    (batch,) = batch_nodes(graph)
    # The embed of a local step's output joins the batch; the embed of an answer waits.
    items = batch_items(batch)
    assert items[:3] == ["text 0", "text 1", "text 2"]
    assert isinstance(items[3], TaskRef) and items[3].key == rendered.key
    assert graph[after_answer.key] is after_answer.dask[after_answer.key]
    assert graph[after_local_step.key].func is take_item


def test_group_of_one_and_chat_stay_as_they_are() -> None:
    backend = FakeBackend()
    values = [backend.embed("alone", model="m"), backend.chat("x"), backend.chat("y")]
    graph = optimized(values)
    assert batch_nodes(graph) == []
    for value in values:
        assert graph[value.key] is value.dask[value.key]


def test_chunk_serving_one_key_keeps_its_node() -> None:
    backend = FakeBackend()
    values = [backend.embed(f"t{i}") for i in range(5)]  # chunks of 4 and 1
    graph = optimized(values)
    (batch,) = batch_nodes(graph)
    assert len(batch_items(batch)) == 4
    kept = [v for v in values if type(graph[v.key].func) is BackendCall]
    assert len(kept) == 1


# -- levels: never fuse a call with one it depends on ------------------------------------


def test_only_calls_needing_no_other_call_are_fused_in_advance() -> None:
    backend = FakeBackend()
    chains = []
    for name in ("a", "b", "c"):
        first = backend.embed(name)
        second = backend.embed(shout(first))
        chains.append((first, second))
    graph = optimized([second for _, second in chains])

    # The first embeds are fused; the second ones wait on calls, so they are left to
    # runtime coalescing as their inputs arrive.
    (batch,) = batch_nodes(graph)
    assert sorted(batch_items(batch)) == ["a", "b", "c"]
    for _, second in chains:
        assert type(graph[second.key].func) is BackendCall
    FesteGraph(graph).topological_order()  # no cycle

    results = feste.compute([second for _, second in chains], scheduler="sync")[0]
    assert results == [f"embed(None):EMBED(NONE):{name.upper()}" for name in "abc"]
    # The sync scheduler does not coalesce at run time: the second embeds go alone.
    assert request_sizes(backend) == [3, 1, 1, 1]
    batched_at_run_time = FakeBackend()
    values = []
    for name in ("a", "b", "c"):
        values.append(batched_at_run_time.embed(shout(batched_at_run_time.embed(name))))
    assert feste.compute(values, batch_window=0.05)[0] == results
    assert request_sizes(batched_at_run_time) == [3, 3]


def test_single_chain_each_call_depends_on_the_previous() -> None:
    backend = FakeBackend()
    value: Any = "x"
    for _ in range(4):
        value = backend.embed(value)
    graph = optimized(value)
    assert batch_nodes(graph) == []
    assert feste.compute(value, scheduler="sync")[0] == "embed(None):" * 4 + "x"
    assert request_sizes(backend) == [1, 1, 1, 1]


def test_local_steps_do_not_separate_but_calls_do() -> None:
    backend = FakeBackend()
    literal = backend.embed("plain")
    rendered = backend.embed(shout("rendered"))
    after_chat = backend.embed(backend.chat("asked"))
    after_chat_too = backend.embed(backend.chat("asked again"))
    graph = optimized([literal, rendered, after_chat, after_chat_too])

    levels = call_levels(graph)
    assert levels is not None
    assert levels[literal.key] == levels[rendered.key] == 1
    assert levels[after_chat.key] == levels[after_chat_too.key] == 2
    # The literal and the rendered input share a batch; the calls after chats do not.
    (batch,) = batch_nodes(graph)
    items = batch_items(batch)
    assert len(items) == 2 and "plain" in items
    assert type(graph[after_chat.key].func) is BackendCall
    assert type(graph[after_chat_too.key].func) is BackendCall


def test_crossing_groups_cannot_make_a_cycle() -> None:
    # a2 depends on a1 and b1 depends on b2: fusing {a1, b1} and {a2, b2} would make
    # each batch wait for the other. Levels keep a1/b2 and a2/b1 apart.
    backend = FakeBackend()
    a1 = backend.embed("a1", model="g")
    a2 = backend.embed(shout(a1), model="h")
    b2 = backend.embed("b2", model="h")
    b1 = backend.embed(shout(b2), model="g")
    values = [a2, b1, backend.embed("c1", model="g"), backend.embed("c2", model="h")]
    graph = optimized(values)
    FesteGraph(graph).topological_order()
    results = feste.compute(values, scheduler="sync")[0]
    assert results == [
        "embed(h):EMBED(G):A1",
        "embed(g):EMBED(H):B2",
        "embed(g):c1",
        "embed(h):c2",
    ]


def test_call_levels_of_a_cycle_is_none() -> None:
    graph = {
        "x": Task("x", shout.func, TaskRef("y")),
        "y": Task("y", shout.func, TaskRef("x")),
    }
    assert call_levels(graph) is None
    assert BatchOptimization().apply(dict(graph), ["x"]) == graph


def test_dependencies_outside_the_graph_are_sources() -> None:
    backend = FakeBackend()
    call = BackendCall(backend, "embed")
    graph = {
        "e1": Task("e1", call, TaskRef("held-elsewhere")),
        "e2": Task("e2", call, "literal"),
    }
    optimized_graph = BatchOptimization().apply(graph, ["e1", "e2"])
    (batch,) = batch_nodes(optimized_graph)
    assert batch.dependencies == frozenset({"held-elsewhere"})


def test_second_pass_changes_nothing() -> None:
    backend = FakeBackend()
    values = [backend.embed(f"t{i}") for i in range(9)]
    values += [backend.embed(backend.chat("q")), backend.embed(shout(values[0]))]
    once = optimized(values)
    twice = BatchOptimization().apply(dict(once), [v.key for v in values])
    assert twice.keys() == once.keys()
    assert all(twice[key] is once[key] for key in once)


# -- deduplication ---------------------------------------------------------------------


def test_identical_pure_calls_share_one_key() -> None:
    backend = FakeBackend()
    assert backend.embed("same", model="m").key == FakeBackend().embed("same", model="m").key
    assert backend.embed("same", model="m").key != backend.embed("same", model="n").key


def test_identical_pure_calls_are_one_item_impure_calls_each_their_own() -> None:
    backend = FakeBackend()
    upstream = shout("u")
    values = [
        backend.embed("dup"),
        backend.embed("dup"),  # pure: the same node as the first
        backend.embed(upstream),
        backend.embed(upstream),
        backend.embed("dup", pure=False),  # asks for its own answer
        backend.embed("dup", pure=False),
    ]
    assert len({v.key for v in values}) == 4
    graph = optimized(values)
    (batch,) = batch_nodes(graph)
    assert batch.func.distinct
    assert len(batch_items(batch)) == 4
    results = feste.compute(values, scheduler="sync")[0]
    assert results == ["embed(None):dup"] * 2 + ["embed(None):U"] * 2 + ["embed(None):dup"] * 2
    assert backend._requests == [["dup", "U", "dup", "dup"]]


def test_explain_counts_calls_and_requests() -> None:
    backend = FakeBackend()
    values = [backend.embed(f"t{i}") for i in range(10)] + [backend.chat("a"), backend.chat("b")]
    values += [backend.embed("t0")]  # the same pure call: the same node
    stats = feste.explain(values)
    assert stats.calls == {"fake.embed": 10, "fake.chat": 2}
    assert stats.requests == {"fake.embed": 3, "fake.chat": 2}
    assert "fake.embed: 10 calls -> 3 requests" in str(stats)
    assert "fake.chat: 2 calls -> 2 requests" in str(stats)

    unoptimized = feste.explain(values, optimize_graph=False)
    assert unoptimized.requests == {"fake.embed": 10, "fake.chat": 2}

    raw_graph, _, _ = FesteGraph.collect(values)
    assert raw_graph.stats().requests == {"fake.embed": 3, "fake.chat": 2}
    assert raw_graph.stats(optimize=False).requests == {"fake.embed": 10, "fake.chat": 2}
    assert FesteGraph(optimized(values)).stats(optimize=False).calls == stats.calls
    assert backend._requests == []  # nothing ran


def test_explain_counts_duplicate_items_as_calls() -> None:
    backend = FakeBackend()
    values = [backend.embed("dup", pure=False) for _ in range(3)]
    stats = feste.explain(values)
    assert stats.calls == {"fake.embed": 3}
    assert stats.requests == {"fake.embed": 1}


# -- running batches --------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_results_match_without_the_pass(scheduler: str) -> None:
    batched_backend, plain_backend = FakeBackend(), FakeBackend()

    def build(backend: FakeBackend) -> list[Any]:
        firsts = [backend.embed(f"t{i}", model="m") for i in range(9)]
        return firsts + [backend.embed(shout(v), model="m") for v in firsts[:3]]

    batched = feste.compute(build(batched_backend), scheduler=scheduler)[0]
    plain = feste.compute(build(plain_backend), scheduler=scheduler, optimize_graph=False)[0]
    assert batched == plain
    assert batched[0] == "embed(m):t0"
    assert batched[9] == "embed(m):EMBED(M):T0"
    # The nine literal calls are fused; the three after them go one by one.
    assert request_sizes(batched_backend) == [4, 4, 1, 1, 1, 1]
    assert request_sizes(plain_backend) == [1] * 12


def run_batch_graph(
    backend: FakeBackend, items: list[str], **params: Any
) -> tuple[list[Any], list[Any]]:
    """Values of one batch node of ``items``, and the lazy calls."""
    values = [backend.embed(item, **params) for item in items]  # CALL_LINE
    graph = optimized(values)
    (batch,) = batch_nodes(graph)
    return batch.func(batch_items(batch), **batch.kwargs), values


CALL_LINE = next(
    number
    for number, line in enumerate(Path(__file__).read_text().splitlines(), 1)
    if line.endswith("# CALL_LINE")
)


def test_bad_item_is_isolated_by_bisection() -> None:
    backend = FakeBackend()
    results, _ = run_batch_graph(backend, ["a", "b", "BAD", "d"])
    assert results[:2] == ["embed(None):a", "embed(None):b"]
    assert results[3] == "embed(None):d"
    assert isinstance(results[2], ItemFailure)
    # The error names the item and the line of this file that made its call.
    assert str(results[2].error).endswith(
        "input[0] is not acceptable (input 'BAD', called at test_optimization.py:"
        f"{CALL_LINE} in <listcomp>)"
    )
    # the whole, two halves, then each of the bad half's items
    assert backend._requests == [["a", "b", "BAD", "d"], ["a", "b"], ["BAD", "d"], ["BAD"], ["d"]]


def test_item_named_by_the_provider_is_split_out_directly() -> None:
    backend = FakeBackend(name_bad_index=True)
    results, _ = run_batch_graph(backend, ["a", "BAD", "c", "d"])
    assert [r if isinstance(r, str) else "failed" for r in results] == [
        "embed(None):a",
        "failed",
        "embed(None):c",
        "embed(None):d",
    ]
    assert backend._requests == [["a", "BAD", "c", "d"], ["a", "c", "d"]]
    assert results[1].error.item_index is None


def test_request_level_rejection_fails_every_item_after_one_split() -> None:
    backend = FakeBackend()
    results, _ = run_batch_graph(backend, ["a", "b", "c", "d"], model="missing")
    assert all(isinstance(r, ItemFailure) for r in results)
    assert len({id(r.error) for r in results}) == 4  # one error object per item
    assert all("model 'missing' does not exist" in str(r.error) for r in results)
    assert len(backend._requests) == 3


def test_two_bad_items_in_different_halves_do_not_fail_the_rest() -> None:
    backend = FakeBackend()
    results, _ = run_batch_graph(backend, ["BAD1", "b", "c", "BAD2"])
    assert ["ok" if isinstance(r, str) else "failed" for r in results] == [
        "failed",
        "ok",
        "ok",
        "failed",
    ]


def test_other_errors_fail_every_item_of_the_request() -> None:
    backend = FakeBackend()
    results, _ = run_batch_graph(backend, ["a", "DENIED", "c"])
    assert all(isinstance(r, ItemFailure) for r in results)
    assert all(isinstance(r.error, AuthenticationError) for r in results)
    assert len(backend._requests) == 1


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_failed_item_raises_under_its_own_key(scheduler: str) -> None:
    backend = FakeBackend()
    values = [backend.embed(text) for text in ["a", "b", "c BAD", "d"]]
    good = [values[0], values[1], values[3]]
    graph = optimized(values)
    assert len(batch_nodes(graph)) == 1
    assert feste.compute(good, scheduler=scheduler)[0] == [
        "embed(None):a",
        "embed(None):b",
        "embed(None):d",
    ]
    with pytest.raises(BadRequestError) as caught:
        feste.compute(values, scheduler=scheduler)
    assert caught.value.key == values[2].key
    assert "is not acceptable" in str(caught.value)


def test_duplicates_of_a_failed_item_each_get_their_own_error() -> None:
    backend = FakeBackend()
    backend._name_bad_index = True  # the provider names the bad input
    values = [backend.embed("BAD", pure=False) for _ in range(2)] + [backend.embed("ok")]
    graph = optimized(values)
    (batch,) = batch_nodes(graph)
    assert batch_items(batch) == ["BAD", "BAD", "ok"]
    batch_result = batch.func(batch_items(batch), **batch.kwargs)
    errors = []
    for value in values[:2]:
        take = graph[value.key]
        with pytest.raises(BadRequestError) as caught:
            take({batch.key: batch_result})
        errors.append(caught.value)
    assert errors[0] is not errors[1]
    assert graph[values[2].key]({batch.key: batch_result}) == "embed(None):ok"


def test_run_batch_sends_identical_strings_once_unless_told_otherwise() -> None:
    from feste._calls import run_batch
    from feste._loop import run_sync

    backend = FakeBackend()
    results = run_sync(run_batch(backend, "embed", ["x", "y", "x", "BAD", "BAD"], {}))
    assert results[:3] == ["embed(None):x", "embed(None):y", "embed(None):x"]
    assert isinstance(results[3], ItemFailure) and isinstance(results[4], ItemFailure)
    assert results[3].error is not results[4].error
    assert backend._requests[0] == ["x", "y", "BAD"]
    run_sync(run_batch(backend, "embed", ["x", "x"], {}, dedupe=False))
    assert backend._requests[-1] == ["x", "x"]
    assert backend._requests[0] == ["x", "y", "BAD"]


class FakeClient:
    """Stands for a configured official client: only its key and address are read."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.base_url = "http://fake.invalid"


def test_backends_with_different_client_keys_are_batched_apart() -> None:
    first = FakeBackend(api_key=None, client=FakeClient("client-key-aaaa"))
    same_key = FakeBackend(api_key=None, client=FakeClient("client-key-aaaa"))
    other_key = FakeBackend(api_key=None, client=FakeClient("client-key-bbbb"))
    assert first.identity() == other_key.identity()  # the key is not part of identity
    values = [first.embed("a"), same_key.embed("b"), other_key.embed("c"), other_key.embed("d")]
    graph = optimized(values)
    assert sorted(sorted(batch_items(b)) for b in batch_nodes(graph)) == [["a", "b"], ["c", "d"]]
    for key in graph:
        assert "client-key" not in str(key)
