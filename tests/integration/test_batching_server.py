"""Automatic batching against the local OpenAI/Cohere server, counted at the server.

Every request count and item count below is what the server saw
(``stats()["items_per_request"]`` lists the items of each request answered 200, in
arrival order; ``by_route`` counts every request, failed ones included).
"""

from __future__ import annotations

from typing import Any

import pytest

import feste
from feste import feste_task
from feste.backend import Cohere, OpenAI
from feste.errors import BadRequestError, Failure
from feste.testing import (
    TestServer,
    chat_text,
    completion_text,
    embedding,
    truncate_to_tokens,
)

EMBED_MODEL = "text-embedding-3-small"  # OpenAI's default embedding model
EMBEDDINGS = "/v1/embeddings"

SCHEDULERS = ["sync", "threads", "async"]


@pytest.fixture
def server(llm_server_factory: Any) -> TestServer:
    return llm_server_factory(latency=0.01)


def openai(server: TestServer, **defaults: Any) -> OpenAI:
    return OpenAI(base_url=server.openai_base_url, api_key="k", **defaults)


def items_per_request(server: TestServer, route: str = EMBEDDINGS) -> list[int]:
    return sorted(server.stats()["items_per_request"].get(route, []), reverse=True)


@feste_task(pure=True)
def describe(vector: list[float]) -> str:
    """A text made from an embedding, to feed one call's output into the next."""
    return "v" + ",".join(f"{value:.3f}" for value in vector[:2])


def test_five_thousand_independent_embeds_are_three_requests(server: TestServer) -> None:
    backend = openai(server)
    texts = [f"document {i}" for i in range(5000)]
    vectors = [backend.embed(text) for text in texts]
    assert "openai.embed: 5000 calls -> 3 requests" in str(feste.explain(vectors))

    (results,) = feste.compute(vectors, scheduler="sync")

    assert items_per_request(server) == [2048, 2048, 904]
    assert server.stats()["requests"] == 3
    assert results[0] == embedding(EMBED_MODEL, texts[0])
    assert results[4999] == embedding(EMBED_MODEL, texts[4999])
    assert results == [embedding(EMBED_MODEL, text) for text in texts]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_calls_at_several_depths(server: TestServer, scheduler: str) -> None:
    backend = openai(server)
    direct = [backend.embed(f"text {i}") for i in range(5)]
    answers = [backend.chat(f"question {i}") for i in range(3)]
    after_chat = [backend.embed(answer) for answer in answers]
    after_embed = [backend.embed(describe(vector)) for vector in direct[:4]]

    (results,) = feste.compute([direct, after_chat, after_embed], scheduler=scheduler)

    # The 5 direct embeds are fused in advance. The 7 embeds of chat answers and of
    # texts made from embeddings wait on calls: the async scheduler batches them as
    # their inputs arrive, the others send them one by one.
    sizes = items_per_request(server)
    assert sum(sizes) == 12
    assert server.stats()["items_per_request"][EMBEDDINGS][0] == 5  # the first request
    if scheduler == "async":
        assert len(sizes) <= 8
    else:
        assert sizes == [5] + [1] * 7
    assert server.stats()["by_route"]["/v1/chat/completions"] == 3
    direct_values, chat_values, embed_values = results
    assert direct_values == [embedding(EMBED_MODEL, f"text {i}") for i in range(5)]
    model = "gpt-4o-mini"
    assert chat_values == [
        embedding(EMBED_MODEL, chat_text(model, f"question {i}")) for i in range(3)
    ]
    assert embed_values == [
        embedding(EMBED_MODEL, describe.func(embedding(EMBED_MODEL, f"text {i}"))) for i in range(4)
    ]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_chain_of_dependent_calls_is_never_fused(server: TestServer, scheduler: str) -> None:
    backend = openai(server)
    chains = []
    for start in ("a", "b", "c"):
        value: Any = start
        for _ in range(3):
            value = describe(backend.embed(value))
        chains.append(value)
    single: Any = "alone"
    for _ in range(2):
        single = describe(backend.embed(single, model="other-model"))

    (results,) = feste.compute([chains, single], scheduler=scheduler)

    # The first step of the three chains is one request of three; later steps wait on
    # calls, so they are never planned together with an earlier step.
    arrived = server.stats()["items_per_request"][EMBEDDINGS]
    assert sorted(arrived[:2]) == [1, 3]  # first steps: the three chains, and "alone"
    assert sum(arrived) == 11
    if scheduler != "async":
        assert sorted(arrived, reverse=True) == [3] + [1] * 8
    expected = []
    for start in ("a", "b", "c"):
        text = start
        for _ in range(3):
            text = describe.func(embedding(EMBED_MODEL, text))
        expected.append(text)
    assert results[0] == expected
    text = "alone"
    for _ in range(2):
        text = describe.func(embedding("other-model", text))
    assert results[1] == text


def test_models_and_parameters_are_batched_apart(server: TestServer) -> None:
    backend = openai(server)
    same_settings = openai(server)
    values = [backend.embed(f"a{i}", model="model-a") for i in range(3)]
    values += [same_settings.embed(f"a{i}", model="model-a") for i in range(3, 5)]
    values += [backend.embed(f"b{i}", model="model-b") for i in range(3)]
    values += [backend.embed(f"d{i}", model="model-a", dimensions=4) for i in range(2)]

    (results,) = feste.compute(values, scheduler="sync")

    assert items_per_request(server) == [5, 3, 2]
    inputs = sorted(sorted(texts) for texts in server.stats()["inputs"][EMBEDDINGS])
    assert inputs == [
        ["a0", "a1", "a2", "a3", "a4"],
        ["b0", "b1", "b2"],
        ["d0", "d1"],
    ]
    assert results[0] == embedding("model-a", "a0")
    assert results[5] == embedding("model-b", "b0")
    assert results[8] == embedding("model-a", "d0", 4)


@pytest.mark.parametrize(
    ("scheduler", "optimize_graph"),
    [("sync", True), ("threads", True), ("async", True), ("async", False)],
)
def test_identical_pure_calls_are_requested_once_impure_ones_each_time(
    server: TestServer, scheduler: str, optimize_graph: bool
) -> None:
    backend = openai(server)
    values = [
        backend.embed("same"),
        backend.embed("same"),  # pure: the same node
        backend.embed("same", pure=False),  # its own node, and its own item
        backend.embed("other", pure=False),
        backend.embed("other", pure=False),
        backend.embed("third"),
    ]
    assert values[0].key == values[1].key and values[2].key != values[0].key

    (results,) = feste.compute(values, scheduler=scheduler, optimize_graph=optimize_graph)

    # One request either way: the optimizer's batch node, or the async scheduler
    # gathering the ready calls of one group (optimize_graph=False).
    assert items_per_request(server) == [5]
    sent = sorted(server.stats()["inputs"][EMBEDDINGS][0])
    assert sent == ["other", "other", "same", "same", "third"]
    same, other = embedding(EMBED_MODEL, "same"), embedding(EMBED_MODEL, "other")
    assert results == [same, same, same, other, other, embedding(EMBED_MODEL, "third")]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_poisoned_item_fails_alone_under_its_own_key(server: TestServer, scheduler: str) -> None:
    backend = openai(server)
    texts = [f"text {i}" for i in range(10)]
    texts[6] = "text 6 [[status:400]]"
    values = [backend.embed(text) for text in texts]

    with pytest.raises(BadRequestError) as caught:
        feste.compute(values, scheduler=scheduler)

    error = caught.value
    assert error.key == values[6].key
    assert error.status == 400
    assert "input[6]" in str(error)
    # The provider named the item: one rejected request, then the nine others in one.
    assert server.stats()["by_route"][EMBEDDINGS] == 2
    assert items_per_request(server) == [9]


def test_poisoned_item_with_errors_returned(server: TestServer) -> None:
    backend = openai(server)
    texts = [f"text {i}" for i in range(6)]
    texts[2] = "too long " * 40
    server.configure(max_input_tokens=50)
    values = [backend.embed(text) for text in texts]

    with feste.context.set(errors="return"):
        (results,) = feste.compute(values, scheduler="async")

    failure = results[2]
    assert isinstance(failure, Failure)
    assert failure.key == values[2].key
    assert isinstance(failure.exception, BadRequestError)
    assert "over the 50-token limit" in str(failure.exception)
    assert [r for i, r in enumerate(results) if i != 2] == [
        embedding(EMBED_MODEL, text) for i, text in enumerate(texts) if i != 2
    ]
    assert items_per_request(server) == [5]


def test_rejection_of_the_whole_request_is_not_split_per_item(server: TestServer) -> None:
    # A bad parameter is about the request, not an item: after one split whose halves
    # fail alike, every call fails with it (3 requests, not one per item).
    backend = openai(server)
    values = [backend.embed(f"text {i}", dimensions=0) for i in range(40)]
    with pytest.raises(BadRequestError) as caught:
        feste.compute(values, scheduler="sync")
    assert "dimensions must be a positive integer" in str(caught.value)
    assert caught.value.key in {value.key for value in values}
    assert server.stats()["by_route"][EMBEDDINGS] == 3


def test_openai_complete_is_batched(server: TestServer) -> None:
    backend = openai(server)
    prompts = [f"prompt {i}" for i in range(70)]
    values = [backend.complete(prompt, max_tokens=5) for prompt in prompts]

    (results,) = feste.compute(values, scheduler="threads")

    assert items_per_request(server, "/v1/completions") == [64, 6]
    model = "gpt-3.5-turbo-instruct"
    assert results == [truncate_to_tokens(completion_text(model, p), 5) for p in prompts]


def test_cohere_embed_is_batched_96_per_request(server: TestServer) -> None:
    backend = Cohere(base_url=server.cohere_base_url, api_key="k")
    texts = [f"passage {i}" for i in range(200)]
    documents = [backend.embed(text) for text in texts]
    queries = [backend.embed(text, input_type="search_query") for text in texts[:10]]

    (results,) = feste.compute([documents, queries], scheduler="threads")

    assert items_per_request(server, "/v2/embed") == [96, 96, 10, 8]
    assert results[0] == [embedding("embed-v4.0", text) for text in texts]
    assert results[1] == [embedding("embed-v4.0", text) for text in texts[:10]]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_results_are_identical_without_the_pass(llm_server_factory: Any, scheduler: str) -> None:
    def build(server: TestServer) -> list[Any]:
        backend = openai(server)
        firsts = [backend.embed(f"t{i}") for i in range(30)]
        seconds = [backend.embed(describe(v), model="m2") for v in firsts[:10]]
        answers = [backend.chat(f"q{i}") for i in range(3)]
        completions = [backend.complete(answer) for answer in answers]
        return [firsts, seconds, answers, completions]

    batched_server = llm_server_factory(latency=0.005)
    plain_server = llm_server_factory(latency=0.005)
    (batched,) = feste.compute(build(batched_server), scheduler=scheduler)
    (plain,) = feste.compute(build(plain_server), scheduler=scheduler, optimize_graph=False)

    assert batched == plain
    assert sum(items_per_request(batched_server)) == 40
    assert items_per_request(batched_server)[0] == 30  # the literal texts, fused
    assert sum(items_per_request(plain_server)) == 40
    if scheduler != "async":  # the async engine coalesces ready calls by itself
        assert items_per_request(batched_server) == [30] + [1] * 10
        assert items_per_request(plain_server) == [1] * 40
    completions = items_per_request(batched_server, "/v1/completions")
    assert sum(completions) == 3
    if scheduler != "async":  # completions of chat answers wait on calls: one by one
        assert completions == [1, 1, 1]


def test_distributed_client_gets_the_batched_graph(server: TestServer) -> None:
    distributed = pytest.importorskip("distributed")
    backend = openai(server)
    texts = [f"text {i}" for i in range(50)]
    values = [backend.embed(text) for text in texts]
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        (results,) = feste.compute(values, scheduler=client)
    assert items_per_request(server) == [50]
    assert results == [embedding(EMBED_MODEL, text) for text in texts]


@pytest.mark.parametrize("optimize_graph", [True, False])
def test_backends_with_different_keys_never_share_a_request(
    llm_server_factory: Any, optimize_graph: bool
) -> None:
    server = llm_server_factory(api_key="right-key")
    good = OpenAI(base_url=server.openai_base_url, api_key="right-key")
    wrong = OpenAI(base_url=server.openai_base_url, api_key="wrong-key")
    assert good.identity() == wrong.identity()  # the key is not part of the identity

    values = [good.embed("a"), wrong.embed("b"), good.embed("c")]
    (results,) = feste.compute(
        values, scheduler="async", optimize_graph=optimize_graph, errors="return"
    )

    assert results[0] == embedding(EMBED_MODEL, "a")
    assert results[2] == embedding(EMBED_MODEL, "c")
    assert isinstance(results[1], Failure)
    assert "AuthenticationError" in repr(results[1])
    assert "wrong-key" not in repr(results[1])
    assert items_per_request(server) == [2]
