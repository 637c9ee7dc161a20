"""Tests of feste.backend.cohere (API v2) against the local feste.testing server.

Every test that sends runs over both transports ("http": aiohttp, "sdk": the official
cohere.AsyncClientV2) and checks exact values and the requests the server saw.
"""

from __future__ import annotations

import cohere
import pytest

import feste
from feste import context
from feste._calls import RunObserver, current_observer
from feste._nodes import BatchCall
from feste.backend import Cohere
from feste.backend.types import Usage
from feste.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    MalformedResponseError,
    RateLimitError,
    TransientError,
)
from feste.testing import chat_text, count_tokens, embedding, rerank_order

# cohere's own response models use a pydantic API that pydantic deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:The `__fields__` attribute is deprecated")

KEY = "co-test-key-0123456789"
TRANSPORTS = ["http", "sdk"]
CHAT = "/v2/chat"
EMBED = "/v2/embed"
RERANK = "/v2/rerank"
DOCUMENTS = ["the cat sat", "a dog and a cat", "nothing here", "dog"]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def backend(server, transport: str, **kwargs) -> Cohere:
    return Cohere(api_key=KEY, base_url=server.cohere_base_url, transport=transport, **kwargs)


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_lazy_chat_embed_rerank_give_exact_values(llm_server, transport, scheduler):
    co = backend(llm_server, transport)
    answer = co.chat("hello", system="be kind")
    vector = co.embed("a document")
    query_vector = co.embed("a query", input_type="search_query")
    ranking = co.rerank("cat dog", DOCUMENTS)
    assert llm_server.stats()["requests"] == 0

    results = feste.compute(answer, vector, query_vector, ranking, scheduler=scheduler)

    assert results == (
        chat_text("command-a-03-2025", "hello"),
        embedding("embed-v4.0", "a document"),
        embedding("embed-v4.0", "a query"),
        rerank_order("cat dog", DOCUMENTS),
    )
    assert results[3] == [(1, 1.0), (0, 0.5), (3, 0.5), (2, 0.0)]
    assert llm_server.stats()["by_route"] == {CHAT: 1, EMBED: 2, RERANK: 1}


def test_eager_calls_return_plain_values(llm_server, transport):
    co = backend(llm_server, transport, model="custom")
    with context.set(eager=True):
        assert co.chat("hi") == "echo(custom): hi"
        assert co.embed("text", output_dimension=4) == embedding("custom", "text", 4)
        assert co.rerank("cat", DOCUMENTS, top_n=2) == rerank_order("cat", DOCUMENTS, 2)


def test_message_lists_are_sent_as_they_are(llm_server, transport):
    co = backend(llm_server, transport)
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    with context.set(eager=True):
        assert co.chat(messages) == "echo(command-a-03-2025): three"


def test_usage_is_recorded(llm_server, transport):
    class Recorder(RunObserver):
        def __init__(self) -> None:
            self.usages: list[Usage | None] = []

        def request_finished(self, request, usage, seconds) -> None:
            self.usages.append(usage)

    co = backend(llm_server, transport)
    recorder = Recorder()
    token = current_observer.set(recorder)
    try:
        with context.set(eager=True):
            answer = co.chat("count")
            co.embed("embed me")
            co.rerank("q", ["d"])
    finally:
        current_observer.reset(token)
    assert recorder.usages == [
        Usage("command-a-03-2025", count_tokens("count"), count_tokens(answer)),
        Usage("embed-v4.0", count_tokens("embed me"), 0),
        Usage("rerank-v3.5", search_units=1),  # rerank is billed in searches, not tokens
    ]


def test_embed_batches_up_to_96_texts_per_request(llm_server, transport):
    co = backend(llm_server, transport)
    texts = [f"text {index}" for index in range(100)]
    vectors = BatchCall(co, "embed")(texts, model="embed-v4.0", input_type="search_document")
    assert vectors == [embedding("embed-v4.0", text) for text in texts]
    assert sorted(llm_server.stats()["items_per_request"][EMBED]) == [4, 96]


def test_input_type_is_a_parameter_of_the_node():
    co = Cohere(api_key=KEY)
    (document,) = dict(co.embed("x").dask).values()
    (query,) = dict(co.embed("x", input_type="search_query").dask).values()
    assert document.kwargs == {"model": "embed-v4.0", "input_type": "search_document"}
    assert query.kwargs == {"model": "embed-v4.0", "input_type": "search_query"}
    with_default = Cohere(api_key=KEY, input_type="clustering").embed("x")
    (node,) = dict(with_default.dask).values()
    assert node.kwargs["input_type"] == "clustering"


def test_rerank_item_is_the_query_and_documents_are_a_parameter():
    co = Cohere(api_key=KEY)
    ranking = co.rerank("query", ("a", "b"), top_n=1)
    (node,) = dict(ranking.dask).values()
    assert node.args == ("query",)
    assert node.kwargs == {"model": "rerank-v3.5", "documents": ["a", "b"], "top_n": 1}
    assert not co.spec("rerank").batchable
    assert co.spec("embed").batch_size == 96


def test_bad_input_is_refused():
    co = Cohere(api_key=KEY)
    with pytest.raises(BadRequestError, match="documents must be a list of strings, got str"):
        co.rerank("q", "one document")
    with pytest.raises(BadRequestError, match="documents is empty"):
        co.rerank("q", [])
    with pytest.raises(BadRequestError, match=r"documents\[1\] must be a string, got int"):
        co.rerank("q", ["a", 2])
    with pytest.raises(BadRequestError, match="the text is empty"):
        co.rerank("", ["a"])
    with pytest.raises(BadRequestError, match="message 0 has role 'developer'"):
        co.chat([{"role": "developer", "content": "x"}])
    with pytest.raises(ConfigurationError, match=r"'temperature'.*Cohere.embed"):
        co.embed("x", temperature=0)
    with pytest.raises(
        ConfigurationError,
        match=r"'top_k' for Cohere\(\.\.\.\); valid parameters: .*, k, logprobs, max_tokens",
    ):
        Cohere(top_k=3)


def test_errors_map_to_feste_errors(llm_server_factory, transport):
    server = llm_server_factory(api_key=KEY, hang_seconds=5)
    co = backend(server, transport)
    # Only the hang meets the short timeout, so a slow first call (cohere imports its
    # response types on first use) cannot turn another case into a timeout. Building
    # the client happens before the deadline starts (the transport's prepare()).
    impatient = backend(server, transport, timeout=0.2)
    wrong = Cohere(
        api_key="co-wrong-key-000000", base_url=server.cohere_base_url, transport=transport
    )

    with (
        context.set(eager=True, max_retries=3),
        pytest.raises(AuthenticationError, match="CO_API_KEY"),
    ):
        wrong.chat("x")
    assert server.stats()["requests"] == 1  # never retried
    with (
        context.set(eager=True, max_retries=0, rate_limit_timeout=0),
        pytest.raises(RateLimitError) as info,
    ):
        co.embed("[[status:429]]")
    assert info.value.retry_after == 0.05
    with context.set(eager=True, max_retries=0), pytest.raises(TransientError, match="HTTP 503"):
        co.rerank("q", ["[[status:503]]"])
    with context.set(eager=True, max_retries=0), pytest.raises(TransientError, match="connection"):
        co.chat("[[drop]]")
    with context.set(eager=True, max_retries=0), pytest.raises(TransientError, match=r"0.2 s"):
        impatient.chat("[[hang]]")
    with context.set(eager=True, max_retries=0), pytest.raises(MalformedResponseError):
        co.embed("[[malformed]]")
    with context.set(eager=True, max_retries=0), pytest.raises(BadRequestError) as bad:
        co.embed("fine", input_type="nonsense")
    assert "input_type is required and must be one of" in str(bad.value)


def test_server_error_is_retried(llm_server, transport):
    co = backend(llm_server, transport)
    with (
        context.set(eager=True, max_retries=2, retry_backoff=0.001),
        pytest.raises(TransientError),
    ):
        co.chat("[[status:500]]")
    assert llm_server.stats()["requests"] == 3


def test_both_transports_give_the_same_messages(llm_server):
    messages = {}
    for transport in TRANSPORTS:
        co = backend(llm_server, transport)
        seen = []
        for text in ("[[status:429]]", "[[status:500]]", "[[status:422]]", "[[malformed]]"):
            try:
                with context.set(eager=True, max_retries=0, rate_limit_timeout=0):
                    co.chat(text)
            except Exception as error:
                seen.append((type(error).__name__, str(error)))
        messages[transport] = seen
    assert messages["http"] == messages["sdk"]
    assert len(messages["http"]) == 4


def test_sync_client_is_refused_and_async_client_is_used(llm_server):
    with pytest.raises(ConfigurationError, match=r"AsyncClientV2.*synchronous client"):
        Cohere(client=cohere.ClientV2(api_key=KEY))
    client = cohere.AsyncClientV2(api_key=KEY, base_url=llm_server.cohere_base_url, max_retries=3)
    co = Cohere(client=client)
    with context.set(eager=True):
        assert co.chat("via client") == "echo(command-a-03-2025): via client"
    with context.set(eager=True, max_retries=0), pytest.raises(TransientError):
        co.chat("[[status:500]]")
    assert llm_server.stats()["requests"] == 2  # the client's own retries are off
