"""Tests of feste.testing: the local OpenAI/Cohere imitation server.

Every answer is deterministic, so the assertions compare exact values. Calls
go through the official ``openai`` and ``cohere`` clients (to prove their
parsers accept the shapes) and through raw aiohttp (to see status codes,
headers and bodies exactly).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import math
import re
import struct
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import cohere
import openai
import pytest

from feste.testing import (
    ServerConfig,
    TestServer,
    chat_text,
    completion_text,
    count_tokens,
    embedding,
    embedding_base64,
    invalid_json_text,
    json_answer_text,
    key_label,
    rerank_order,
    rerank_scores,
    schema_instance,
    source_text,
    token_chunks,
    token_logprob,
    tool_call,
    wrong_schema_value,
)
from feste.testing.__main__ import build_parser
from feste.testing.__main__ import main as cli_main
from feste.testing._config import config_from_namespace, config_to_argv
from feste.testing._limits import go_duration
from feste.testing._responses import delay_of

CHAT = "/v1/chat/completions"


# Clients made by the helpers below are closed after each test, so their
# sockets never leak into a later test as ResourceWarnings.
_clients = contextlib.ExitStack()


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    _clients.close()


def openai_client(server: TestServer, api_key: str = "test-key") -> openai.OpenAI:
    client = openai.OpenAI(base_url=server.openai_base_url, api_key=api_key, max_retries=0)
    return _clients.enter_context(client)


def cohere_client(server: TestServer, api_key: str = "test-key") -> cohere.ClientV2:
    client = cohere.ClientV2(api_key=api_key, base_url=server.cohere_base_url, max_retries=0)
    return _clients.enter_context(client)


def chat_body(content: str, model: str = "gpt-x") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


async def _post(
    url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def post(
    url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """Raw POST: (status, headers, parsed JSON body)."""
    status, response_headers, raw = asyncio.run(_post(url, body, headers))
    return status, response_headers, json.loads(raw)


# --- the pure deterministic functions ---------------------------------------


def test_deterministic_functions_have_simple_literal_formats() -> None:
    assert [count_tokens(text) for text in ("", "a", "abcd", "abcde", "x" * 9000)] == [
        0,
        1,
        1,
        2,
        2250,
    ]
    assert chat_text("gpt-x", "hi") == "echo(gpt-x): hi"
    assert completion_text("gpt-x", "hi") == "complete(gpt-x): hi"

    vector = embedding("m", "hello", 8)
    assert vector == embedding("m", "hello")  # default dim is 8
    assert all(-1.0 <= value <= 1.0 and round(value, 6) == value for value in vector)
    assert embedding("m", "hello", 20)[:8] == vector  # longer vectors extend shorter ones
    assert embedding("m2", "hello") != vector and embedding("m", "hello!") != vector
    assert struct.unpack("<8f", base64.b64decode(embedding_base64(vector))) == pytest.approx(
        vector, abs=1e-6
    )

    documents = ["the dog", "a cat sat on the mat", "Cat", "nothing here"]
    assert rerank_scores("the cat", documents) == [0.5, 1.0, 0.5, 0.0]
    assert rerank_order("the cat", documents) == [(1, 1.0), (0, 0.5), (2, 0.5), (3, 0.0)]
    assert rerank_order("the cat", documents, top_n=2) == [(1, 1.0), (0, 0.5)]


# --- OpenAI endpoints ----------------------------------------------------------


def test_openai_chat_exact_text_and_usage(llm_server: TestServer) -> None:
    client = openai_client(llm_server)
    reply = client.chat.completions.create(
        model="gpt-x",
        messages=[
            {"role": "system", "content": "be brief"},  # 8 chars: 2 tokens
            {"role": "user", "content": "first"},  # 5 chars: 2 tokens
            {"role": "assistant", "content": "ok"},  # 1 token
            {"role": "user", "content": "hello there"},  # 11 chars: 3 tokens
        ],
        temperature=0.3,
        n=1,
    )
    assert reply.object == "chat.completion"
    assert reply.model == "gpt-x"
    assert len(reply.choices) == 1
    choice = reply.choices[0]
    assert (choice.index, choice.finish_reason) == (0, "stop")
    assert choice.message.role == "assistant"
    assert choice.message.content == "echo(gpt-x): hello there"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (8, 6)
    assert reply.usage.total_tokens == 14


def test_openai_chat_content_parts_and_max_tokens(llm_server: TestServer) -> None:
    client = openai_client(llm_server)
    parts = client.chat.completions.create(
        model="gpt-x",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}],
            }
        ],
    )
    assert parts.choices[0].message.content == "echo(gpt-x): hello"

    cut = client.chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "hello"}], max_tokens=2
    )
    assert cut.choices[0].message.content == "echo(gpt"  # 2 tokens of 4 characters
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"content": "no role"}], "messages[0].role"),
        (
            [{"role": "user", "content": "ok"}, {"role": "robot", "content": "x"}],
            "messages[1].role",
        ),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 42}], "messages[0].content"),
    ],
)
def test_openai_chat_rejects_invalid_messages(
    llm_server: TestServer, messages: list[Any], param: str
) -> None:
    status, _, body = post(llm_server.url + CHAT, {"model": "gpt-x", "messages": messages})
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    assert llm_server.stats()["faults"]["400"] == 1


def test_openai_completions_one_choice_per_prompt(llm_server: TestServer) -> None:
    client = openai_client(llm_server)
    reply = client.completions.create(model="gpt-x", prompt=["a", "bb", "ccccc"])
    assert [(choice.index, choice.text) for choice in reply.choices] == [
        (0, "complete(gpt-x): a"),
        (1, "complete(gpt-x): bb"),
        (2, "complete(gpt-x): ccccc"),
    ]
    assert all(choice.finish_reason == "stop" for choice in reply.choices)
    assert reply.usage is not None
    # prompts: 1 + 1 + 2 tokens; answers: 18, 19 and 22 characters = 5 + 5 + 6 tokens
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 16)

    single = client.completions.create(model="gpt-x", prompt="solo")
    assert [choice.text for choice in single.choices] == ["complete(gpt-x): solo"]

    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="gpt-x", prompt=[])
    assert error.value.status_code == 400
    assert llm_server.stats()["items_per_request"]["/v1/completions"] == [3, 1]


def test_openai_embeddings_base64_by_default_and_float(llm_server: TestServer) -> None:
    client = openai_client(llm_server)
    texts = ["alpha", "beta gamma"]
    # The official client asks for base64 unless told otherwise, and decodes it.
    default = client.embeddings.create(model="text-embedding-3-small", input=texts)
    assert [item.index for item in default.data] == [0, 1]
    for item, text in zip(default.data, texts):
        assert item.object == "embedding"
        assert item.embedding == pytest.approx(embedding("text-embedding-3-small", text), abs=1e-6)
    assert default.usage.prompt_tokens == default.usage.total_tokens == 2 + 3

    floats = client.embeddings.create(
        model="text-embedding-3-small", input="alpha", encoding_format="float"
    )
    assert floats.data[0].embedding == embedding("text-embedding-3-small", "alpha")

    status, _, body = post(
        llm_server.openai_base_url + "/embeddings",
        {"model": "m", "input": ["x"], "encoding_format": "base64", "dimensions": 12},
    )
    assert status == 200
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert len(raw) == 12 * 4
    assert list(struct.unpack("<12f", raw)) == pytest.approx(embedding("m", "x", 12), abs=1e-6)


def test_openai_embeddings_limits_name_the_item(llm_server_factory: Any) -> None:
    server = llm_server_factory(max_batch_openai_embed=4)
    url = server.openai_base_url + "/embeddings"
    model = "text-embedding-3-small"

    status, _, body = post(url, {"model": model, "input": ["a", "b", "c", "x" * 36_000]})
    assert status == 400
    assert body["error"]["message"] == (
        "input[3] has 9000 tokens, over the 8191-token limit of model text-embedding-3-small"
    )
    assert body["error"]["param"] == "input"

    for bad_input in ([], "", ["ok", ""]):
        status, _, body = post(url, {"model": model, "input": bad_input})
        assert status == 400, bad_input
        assert body["error"]["param"] == "input"

    status, _, body = post(url, {"model": model, "input": ["a"] * 5})
    assert status == 400
    assert "limit of 4" in body["error"]["message"]
    assert server.stats()["faults"]["400"] == 5


def test_openai_models_list(llm_server: TestServer) -> None:
    ids = [model.id for model in openai_client(llm_server).models.list()]
    assert "text-embedding-3-small" in ids


# --- Cohere endpoints ------------------------------------------------------------


def test_cohere_chat_exact_text_and_usage(llm_server: TestServer) -> None:
    reply = cohere_client(llm_server).chat(
        model="command-x",
        messages=[
            {"role": "system", "content": "sys!"},  # 1 token
            {"role": "user", "content": "hello there"},  # 3 tokens
        ],
    )
    assert reply.finish_reason == "COMPLETE"
    assert reply.message.role == "assistant"
    assert reply.message.content is not None
    assert [part.text for part in reply.message.content] == ["echo(command-x): hello there"]
    assert reply.usage is not None and reply.usage.tokens is not None
    assert reply.usage.billed_units is not None
    assert (reply.usage.tokens.input_tokens, reply.usage.tokens.output_tokens) == (4, 7)
    assert reply.usage.billed_units.input_tokens == 4
    assert reply.usage.billed_units.output_tokens == 7


def test_cohere_embed_matches_openai_vectors(llm_server: TestServer) -> None:
    texts = ["alpha", "beta gamma"]
    reply = cohere_client(llm_server).embed(
        model="embed-v4", texts=texts, input_type="search_document", embedding_types=["float"]
    )
    assert reply.response_type == "embeddings_by_type"
    assert reply.embeddings.float_ == [embedding("embed-v4", text) for text in texts]
    assert reply.texts == texts
    assert reply.meta is not None and reply.meta.billed_units is not None
    assert reply.meta.billed_units.input_tokens == 5
    assert reply.meta.api_version is not None and reply.meta.api_version.version == "2"

    same = openai_client(llm_server).embeddings.create(
        model="embed-v4", input=texts, encoding_format="float"
    )
    assert [item.embedding for item in same.data] == reply.embeddings.float_


def test_cohere_embed_validation(llm_server: TestServer) -> None:
    client = cohere_client(llm_server)
    with pytest.raises(cohere.BadRequestError) as too_many:
        client.embed(model="embed-v4", texts=["t"] * 97, input_type="search_query")
    assert too_many.value.body == {
        "message": "texts has 97 items, over the limit of 96 per request"
    }

    status, _, body = post(llm_server.url + "/v2/embed", {"model": "embed-v4", "texts": ["t"]})
    assert status == 400
    assert "input_type" in body["message"]


def test_cohere_rerank_sorted_by_score(llm_server: TestServer) -> None:
    documents = ["the dog", "a cat sat on the mat", "Cat", "nothing here"]
    reply = cohere_client(llm_server).rerank(
        model="rerank-v3.5", query="The cat", documents=documents, top_n=3
    )
    assert [(result.index, result.relevance_score) for result in reply.results] == [
        (1, 1.0),
        (0, 0.5),
        (2, 0.5),
    ]
    assert reply.meta is not None and reply.meta.billed_units is not None
    assert reply.meta.billed_units.search_units == 1
    assert llm_server.stats()["inputs"]["/v2/rerank"] == [documents]
    assert llm_server.stats()["billed"] == {
        "rerank-v3.5": {
            "requests": 1,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "search_units": 1,
        }
    }


# --- statistics ---------------------------------------------------------------


def test_stats_count_requests_items_and_inputs(llm_server: TestServer) -> None:
    client = openai_client(llm_server)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "one"}])
    client.embeddings.create(model="m", input=["a", "b", "c"])
    client.embeddings.create(model="m", input="d")
    post(llm_server.url + CHAT, {"model": "m", "messages": []})  # a 400: no items recorded

    stats = llm_server.stats()
    assert stats["requests"] == 4
    assert stats["by_route"] == {CHAT: 2, "/v1/embeddings": 2}
    assert stats["items"] == 1 + 3 + 1
    assert stats["items_per_request"] == {CHAT: [1], "/v1/embeddings": [3, 1]}
    assert stats["inputs"] == {CHAT: [["one"]], "/v1/embeddings": [["a", "b", "c"], ["d"]]}
    assert stats["status_counts"] == {"200": 3, "400": 1}
    assert stats["max_in_flight"] == 1 and stats["in_flight"] == 0
    assert stats["by_api_key"] == {key_label("test-key"): 3, key_label(None): 1}
    assert set(stats) == {
        "requests",
        "by_route",
        "first_arrival",
        "by_api_key",
        "items",
        "items_per_request",
        "max_in_flight",
        "in_flight",
        "faults",
        "status_counts",
        "billed",
        "inputs",
        "batches",
    }
    assert stats["batches"]["jobs_created"] == 0
    # Both chat and embeddings asked for model "m": one entry, what the answers reported.
    assert stats["billed"] == {
        "m": {
            "requests": 3,
            "prompt_tokens": count_tokens("one") + 3 + 1,
            "completion_tokens": count_tokens(chat_text("m", "one")),
            "search_units": 0,
        }
    }

    status, _, over_http = asyncio.run(_get_json(llm_server.url + "/_stats"))
    assert status == 200 and over_http == stats

    llm_server.reset_stats()
    cleared = llm_server.stats()
    assert (cleared["requests"], cleared["items"], cleared["by_route"]) == (0, 0, {})
    assert cleared["first_arrival"] == {}
    assert llm_server.config == ServerConfig()  # knobs survive a reset


async def _get_json(url: str) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, dict(response.headers), await response.json()


def test_concurrency_limit_admits_exactly_the_limit(llm_server_factory: Any) -> None:
    server = llm_server_factory(max_concurrency=5, latency=0.5)

    async def burst() -> list[tuple[int, dict[str, str], bytes]]:
        # Every request is refused or admitted on arrival, long before the
        # first admitted one finishes its 0.5 s latency.
        return await asyncio.gather(
            *(_post(server.url + CHAT, chat_body(f"q{i}")) for i in range(20))
        )

    results = asyncio.run(burst())
    assert sorted(status for status, _, _ in results) == [200] * 5 + [429] * 15
    refused_headers = next(headers for status, headers, _ in results if status == 429)
    assert refused_headers["retry-after-ms"] == "50"
    assert refused_headers["Retry-After"] == "0.05"

    stats = server.stats()
    assert stats["max_in_flight"] == 5
    assert stats["faults"]["limit_429"] == 15
    assert stats["status_counts"] == {"200": 5, "429": 15}
    assert stats["items_per_request"][CHAT] == [1] * 5


def test_requests_per_minute_window(llm_server_factory: Any) -> None:
    server = llm_server_factory(requests_per_minute=3)
    client = openai_client(server)
    for _ in range(3):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    retry_after = float(refused.value.response.headers["Retry-After"])
    retry_after_ms = int(refused.value.response.headers["retry-after-ms"])
    assert 55 < retry_after <= 60
    assert retry_after_ms == pytest.approx(retry_after * 1000, abs=1)
    assert server.stats()["faults"]["limit_429"] == 1


def test_latency_and_latency_per_item(llm_server_factory: Any) -> None:
    # The delays are shown by client timeouts shorter than them, not by a clock.
    def embed_ten(server: TestServer, timeout: float) -> None:
        client = openai.OpenAI(
            base_url=server.openai_base_url, api_key="k", max_retries=0, timeout=timeout
        )
        with client:
            client.embeddings.create(model="m", input=["x"] * 10, encoding_format="float")

    fixed = llm_server_factory(latency=0.6)
    with pytest.raises(openai.APITimeoutError):
        embed_ten(fixed, timeout=0.2)
    per_item = llm_server_factory(latency_per_item=0.06)  # 10 items: 0.6 s
    with pytest.raises(openai.APITimeoutError):
        embed_ten(per_item, timeout=0.2)
    quick = llm_server_factory(latency=0.0)
    embed_ten(quick, timeout=30)
    assert quick.stats()["items_per_request"]["/v1/embeddings"] == [10]


# --- triggers and faults -----------------------------------------------------------


def test_status_trigger_names_the_poisoned_item(llm_server: TestServer) -> None:
    status, _, body = post(
        llm_server.openai_base_url + "/embeddings",
        {"model": "m", "input": ["fine", "fine", "bad [[status:400]]", "fine"]},
    )
    assert status == 400
    assert "triggered by input[2]" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"

    with pytest.raises(cohere.ServiceUnavailableError) as unavailable:
        cohere_client(llm_server).embed(
            model="e", texts=["ok", "[[status:503]]"], input_type="search_document"
        )
    assert unavailable.value.body == {"message": "Injected error 503 triggered by input[1]"}

    with pytest.raises(openai.RateLimitError) as limited:
        openai_client(llm_server).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "please [[status:429]]"}]
        )
    assert limited.value.response.headers["retry-after-ms"] == "50"
    assert limited.value.response.headers["Retry-After"] == "0.05"

    faults = llm_server.stats()["faults"]
    assert (faults["400"], faults["503"], faults["429"]) == (1, 1, 1)


def test_malformed_trigger_answers_200_with_invalid_json(llm_server: TestServer) -> None:
    status, _, raw = asyncio.run(_post(llm_server.url + CHAT, chat_body("[[malformed]]")))
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)
    stats = llm_server.stats()
    assert stats["faults"]["malformed"] == 1
    assert stats["items"] == 0


def test_hang_trigger_delays_then_answers(llm_server_factory: Any) -> None:
    server = llm_server_factory(hang_seconds=0.5)
    impatient = openai.OpenAI(
        base_url=server.openai_base_url, api_key="k", max_retries=0, timeout=0.1
    )
    with impatient, pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "slow [[hang]]"}]
        )
    status, _, body = post(server.url + CHAT, chat_body("slow [[hang]]"))
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "echo(gpt-x): slow [[hang]]"
    assert server.stats()["faults"]["hang"] == 2


def test_api_key_required_and_never_echoed(llm_server_factory: Any) -> None:
    server = llm_server_factory(api_key="right-key")
    assert "right-key" not in repr(server) and "***" in repr(server)
    assert "right-key" not in repr(server.config)

    with pytest.raises(openai.AuthenticationError) as wrong:
        openai_client(server, api_key="wrong-key-123").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert wrong.value.status_code == 401
    assert wrong.value.code == "invalid_api_key"
    assert wrong.value.type == "invalid_request_error"
    assert "wrong-key-123" not in wrong.value.response.text

    with pytest.raises(cohere.UnauthorizedError):
        cohere_client(server, api_key="wrong-key-123").chat(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    status, _, _ = post(server.url + CHAT, chat_body("x"))  # no Authorization header
    assert status == 401

    ok = openai_client(server, api_key="right-key").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}]
    )
    assert ok.choices[0].message.content == "echo(m): x"
    stats = server.stats()
    assert stats["faults"]["401"] == 3
    assert stats["status_counts"] == {"401": 3, "200": 1}


def test_fault_drop_is_a_disconnect(llm_server_factory: Any) -> None:
    server = llm_server_factory(fault_drop=1.0)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        asyncio.run(_post(server.url + CHAT, chat_body("x")))
    with pytest.raises(openai.APIConnectionError):
        openai_client(server).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    stats = server.stats()
    assert stats["faults"]["drop"] == 2
    assert stats["status_counts"] == {}

    server.configure(fault_drop=0.0)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        asyncio.run(_post(server.url + CHAT, chat_body("x [[drop]]")))


def test_fault_hang_times_out_the_client_and_stop_is_prompt() -> None:
    server = TestServer(fault_hang=1.0, hang_seconds=30.0).start()

    async def ask(timeout: float) -> None:
        async with openai.AsyncOpenAI(
            base_url=server.openai_base_url, api_key="k", max_retries=0, timeout=timeout
        ) as client:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )

    async def stop_while_hanging() -> BaseException | None:
        pending = asyncio.ensure_future(ask(timeout=30))
        deadline = time.monotonic() + 5
        while server.stats()["in_flight"] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # Had stop waited for the 30 s hang, the client would get a 200, not an error.
        await asyncio.to_thread(server.stop)
        (outcome,) = await asyncio.gather(pending, return_exceptions=True)
        return outcome if isinstance(outcome, BaseException) else None

    try:
        with pytest.raises(openai.APITimeoutError):
            asyncio.run(ask(timeout=0.2))
        # The client hung up, so the server cancels the hanging request.
        deadline = time.monotonic() + 5
        while server.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stats()["in_flight"] == 0
        assert server.stats()["faults"]["hang"] == 1

        # A request still hanging when the server stops is cut off at once.
        assert isinstance(asyncio.run(stop_while_hanging()), openai.APIConnectionError)
    finally:
        server.stop()
        server.stop()  # stopping twice is harmless


def test_random_faults_replay_with_the_same_seed() -> None:
    def statuses(seed: int) -> list[int]:
        with TestServer(fault_429=0.3, fault_500=0.3, seed=seed, retry_after=0) as server:
            return [post(server.url + CHAT, chat_body("x"))[0] for _ in range(30)]

    first = statuses(7)
    assert first == statuses(7)
    assert set(first) == {200, 429, 500}
    assert first != statuses(8)


# --- knobs -------------------------------------------------------------------------


def test_configure_validates_knobs(llm_server: TestServer) -> None:
    with pytest.raises(ValueError, match="valid knobs: latency, latency_per_item") as unknown:
        llm_server.configure(latencyy=1.0)
    assert "max_concurrency" in str(unknown.value)
    with pytest.raises(ValueError, match="fault_500 must be at most 1"):
        llm_server.configure(fault_500=1.5)
    with pytest.raises(ValueError, match="at most 1"):
        llm_server.configure(fault_429=0.6, fault_drop=0.6)
    with pytest.raises(ValueError, match="max_concurrency must be at least 1"):
        llm_server.configure(max_concurrency=0)

    changed = llm_server.configure(latency=0.01, max_concurrency=3)
    assert (changed.latency, changed.max_concurrency) == (0.01, 3)
    assert llm_server.config == changed

    status, _, body = post(llm_server.url + "/_config", {"nope": 1})
    assert status == 400 and "valid knobs" in body["error"]
    status, _, body = post(llm_server.url + "/_config", {"embedding_dim": 4})
    assert status == 200 and body["embedding_dim"] == 4
    assert llm_server.config.embedding_dim == 4


def test_only_loopback_hosts_are_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="loopback"):
        TestServer(host="0.0.0.0")
    with pytest.raises(SystemExit) as exited:
        cli_main(["--host", "0.0.0.0", "--port", "0"])
    assert exited.value.code == 2
    assert "loopback" in capsys.readouterr().err


def test_async_context_manager_and_restart() -> None:
    async def use() -> str:
        async with TestServer(latency=0.01) as server:
            async with openai.AsyncOpenAI(
                base_url=server.openai_base_url, api_key="k", max_retries=0
            ) as client:
                reply = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "async"}]
                )
            assert server.stats()["requests"] == 1
            return reply.choices[0].message.content or ""

    assert asyncio.run(use()) == "echo(m): async"

    server = TestServer()
    server.start()
    server.start()  # starting twice is harmless
    first_url = server.url
    server.stop()
    with pytest.raises(RuntimeError):
        _ = server.url
    assert server.stats()["requests"] == 0
    server.start()
    assert server.url.startswith("http://127.0.0.1:") and first_url
    server.stop()


@pytest.mark.slow
def test_process_mode_serves_and_reports_stats() -> None:
    with TestServer(mode="process", latency=0.01, api_key="proc-key") as server:
        assert server.url.startswith("http://127.0.0.1:")
        reply = openai_client(server, api_key="proc-key").chat.completions.create(
            model="gpt-p", messages=[{"role": "user", "content": "from afar"}]
        )
        assert reply.choices[0].message.content == "echo(gpt-p): from afar"
        stats = server.stats()
        assert stats["requests"] == 1 and stats["inputs"] == {CHAT: [["from afar"]]}

        server.configure(embedding_dim=3)
        assert server.config.embedding_dim == 3
        floats = openai_client(server, api_key="proc-key").embeddings.create(
            model="m", input="x", encoding_format="float"
        )
        assert floats.data[0].embedding == embedding("m", "x", 3)
        with pytest.raises(ValueError, match="valid knobs"):
            server.configure(bogus=1)
        server.reset_stats()
        assert server.stats()["requests"] == 0
    assert not server.running


# --- capabilities for client tests: credentials, arrival order, retry hints --------


def test_by_api_key_counts_each_credential_under_a_digest_label(
    llm_server_factory: Any,
) -> None:
    assert key_label("abc") == "sha256:ba7816bf8f01"  # the first 12 hex digits of SHA-256
    assert key_label(None) == "(no key)"
    # Keys differing only early on still get different labels.
    assert key_label("sk-first-key-000000") != key_label("sk-second-key-00000")

    server = llm_server_factory()
    for _ in range(2):
        openai_client(server, api_key="sk-key-A").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a"}]
        )
    cohere_client(server, api_key="co-key-B").chat(
        model="c", messages=[{"role": "user", "content": "b"}]
    )
    post(server.url + CHAT, chat_body("no key"))
    post(server.url + CHAT, chat_body("basic"), headers={"Authorization": "Basic c2VjcmV0"})

    stats = server.stats()
    assert stats["by_api_key"] == {
        key_label("sk-key-A"): 2,
        key_label("co-key-B"): 1,
        "(no key)": 2,
    }
    assert sum(stats["by_api_key"].values()) == stats["requests"] == 5
    shown = json.dumps(stats)
    assert "sk-key-A" not in shown and "co-key-B" not in shown

    # Refused requests count under the key they came with.
    guarded = llm_server_factory(api_key="right-key")
    with pytest.raises(openai.AuthenticationError):
        openai_client(guarded, api_key="wrong-key").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert guarded.stats()["by_api_key"] == {key_label("wrong-key"): 1}


async def _wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


def test_inputs_are_in_arrival_order_not_answer_order(llm_server: TestServer) -> None:
    host, port = llm_server.url.removeprefix("http://").split(":")

    async def scenario() -> tuple[list[list[str]], list[list[str]], bytes]:
        # "first" sends its headers (so it has arrived) but holds its body back,
        # so "second", sent afterwards, is answered first.
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps(chat_body("first")).encode()
        writer.write(
            f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        await _wait_until(lambda: llm_server.stats()["in_flight"] == 1, "the first request")
        status, _, _ = await _post(llm_server.url + CHAT, chat_body("second"))
        assert status == 200
        while_first_waits = llm_server.stats()["inputs"][CHAT]
        writer.write(body)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        return while_first_waits, llm_server.stats()["inputs"][CHAT], answer

    while_first_waits, at_the_end, answer = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 200")
    assert while_first_waits == [["second"]]  # answered first...
    assert at_the_end == [["first"], ["second"]]  # ...listed second: arrival order


def test_retry_after_as_an_http_date(llm_server_factory: Any) -> None:
    server = llm_server_factory(retry_after=120, retry_after_http_date=True)
    before = time.time()
    status, headers, _ = post(server.url + CHAT, chat_body("[[status:429]]"))
    after = time.time()
    assert status == 429
    assert "retry-after-ms" not in {name.lower() for name in headers}
    date = headers["Retry-After"]
    assert re.fullmatch(
        r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} "
        r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT",
        date,
    )
    moment = email.utils.parsedate_to_datetime(date).timestamp()
    assert before + 120 <= moment <= math.ceil(after + 120)

    server.configure(retry_after_http_date=False)
    _, headers, _ = post(server.url + CHAT, chat_body("[[status:429]]"))
    assert (headers["Retry-After"], headers["retry-after-ms"]) == ("120", "120000")


def _go_seconds(duration: str) -> float:
    """Seconds of an OpenAI (Go-style) duration such as "20ms", "59.5s" or "1m0s"."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:([\d.]+)s)?(?:(\d+)ms)?", duration)
    assert match is not None and duration, duration
    hours, minutes, seconds, milliseconds = (float(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds + milliseconds / 1000


def test_go_durations_are_written_like_openai() -> None:
    written = [go_duration(seconds) for seconds in (0, 0.02, 1, 8.64, 59.9994, 360, 3725.5)]
    assert written == ["0s", "20ms", "1s", "8.64s", "1m0s", "6m0s", "1h2m5.5s"]
    assert [_go_seconds(text) for text in written] == [0, 0.02, 1, 8.64, 60, 360, 3725.5]


def test_rate_limit_headers_and_tokens_per_minute(llm_server_factory: Any) -> None:
    server = llm_server_factory(
        requests_per_minute=3, tokens_per_minute=20, rate_limit_headers=True
    )

    def limits(headers: dict[str, str]) -> dict[str, str]:
        return {name: value for name, value in headers.items() if name.startswith("x-ratelimit")}

    status, headers, _ = post(server.url + CHAT, chat_body("x" * 16))  # 4 tokens
    assert status == 200
    shown = limits(headers)
    assert {name: shown[name] for name in shown if "reset" not in name} == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-limit-tokens": "20",
        "x-ratelimit-remaining-tokens": "16",
    }
    assert 0 < _go_seconds(shown["x-ratelimit-reset-requests"]) <= 60
    assert 0 < _go_seconds(shown["x-ratelimit-reset-tokens"]) <= 60

    # 17 more tokens would make 21: refused until the first request leaves the window.
    status, headers, body = post(server.url + CHAT, chat_body("y" * 68))
    assert status == 429
    assert body["error"]["type"] == "tokens"
    assert body["error"]["message"] == (
        "Rate limit reached: 20 tokens per minute, 4 used, 17 requested"
    )
    assert 55 < float(headers["Retry-After"]) <= 60
    assert limits(headers)["x-ratelimit-remaining-tokens"] == "16"
    # Refused for its tokens, it still used a request slot (as with OpenAI).
    assert limits(headers)["x-ratelimit-remaining-requests"] == "1"

    # More tokens than the limit itself: waiting cannot help, so no Retry-After.
    status, headers, body = post(server.url + CHAT, chat_body("z" * 100))
    assert status == 429
    assert body["error"]["message"] == (
        "Request too large: 25 tokens, over the limit of 20 tokens per minute"
    )
    assert "Retry-After" not in headers

    status, headers, _ = post(server.url + CHAT, chat_body("x"))
    assert status == 429  # the requests window is full
    assert limits(headers)["x-ratelimit-remaining-requests"] == "0"
    assert server.stats()["faults"]["limit_429"] == 3

    # Cohere routes, and servers without the knob, send none of these headers.
    status, headers, _ = post(
        server.url + "/v2/chat", {"model": "c", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 429 and limits(headers) == {}
    plain = llm_server_factory(requests_per_minute=3)
    status, headers, _ = post(plain.url + CHAT, chat_body("x"))
    assert status == 200 and limits(headers) == {}


def test_fault_429_retry_after_overrides_injected_429s_only(llm_server_factory: Any) -> None:
    server = llm_server_factory(fault_429=1.0, fault_429_retry_after=3600)

    def retry_hint(content: str) -> tuple[int, str, str]:
        status, headers, _ = post(server.url + CHAT, chat_body(content))
        return status, headers["retry-after-ms"], headers["Retry-After"]

    assert retry_hint("random") == (429, "3600000", "3600")
    assert retry_hint("[[status:429]]") == (429, "3600000", "3600")
    assert retry_hint("[[status:503]]") == (503, "50", "0.05")  # retry_after, as before
    server.configure(fault_429_retry_after=None)
    assert retry_hint("random") == (429, "50", "0.05")
    assert server.stats()["faults"]["429"] == 3


def test_retry_after_marker_refuses_each_text_once(llm_server: TestServer) -> None:
    client = openai_client(llm_server)
    ask = "wait [[retry_after:3600]]"
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": ask}])
    headers = refused.value.response.headers
    assert (headers["retry-after-ms"], headers["Retry-After"]) == ("3600000", "3600")
    assert "triggered by input[0]" in refused.value.message
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": ask}])
    assert reply.choices[0].message.content == f"echo(m): {ask}"

    status, headers, _ = post(llm_server.url + CHAT, chat_body("other [[retry_after:1.5]]"))
    assert (status, headers["retry-after-ms"], headers["Retry-After"]) == (429, "1500", "1.5")

    texts = ["fine", "later [[retry_after:2]]"]
    with pytest.raises(cohere.TooManyRequestsError):
        cohere_client(llm_server).embed(model="e", texts=texts, input_type="search_query")
    embedded = cohere_client(llm_server).embed(model="e", texts=texts, input_type="search_query")
    assert embedded.embeddings.float_ == [embedding("e", text) for text in texts]

    stats = llm_server.stats()
    assert stats["faults"]["429"] == 3
    assert stats["inputs"][CHAT] == [[ask]]
    llm_server.reset_stats()  # also forgets which texts were refused
    status, _, _ = post(llm_server.url + CHAT, chat_body(ask))
    assert status == 429


def test_bad_usage_marker_spoils_only_the_usage(llm_server: TestServer) -> None:
    url = llm_server.url
    status, _, body = post(url + CHAT, chat_body("count [[bad_usage]]"))
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "echo(gpt-x): count [[bad_usage]]"
    assert body["usage"] == {"prompt_tokens": "many"}

    status, _, body = post(url + "/v1/embeddings", {"model": "m", "input": ["[[bad_usage]]"]})
    assert status == 200 and body["usage"] == {"prompt_tokens": "many"}
    assert body["data"][0]["embedding"] == embedding("m", "[[bad_usage]]")

    cohere_chat = {"model": "c", "messages": [{"role": "user", "content": "[[bad_usage]]"}]}
    status, _, body = post(url + "/v2/chat", cohere_chat)
    assert status == 200 and body["usage"] == {"billed_units": {"input_tokens": "many"}}
    assert body["message"]["content"][0]["text"] == "echo(c): [[bad_usage]]"

    embed = {"model": "e", "texts": ["[[bad_usage]]"], "input_type": "search_query"}
    status, _, body = post(url + "/v2/embed", embed)
    assert status == 200 and body["meta"]["billed_units"] == {"input_tokens": "many"}

    rerank = {"model": "r", "query": "q [[bad_usage]]", "documents": ["a", "q"]}
    status, _, body = post(url + "/v2/rerank", rerank)
    assert status == 200 and body["meta"]["billed_units"] == {"search_units": "many"}

    stats = llm_server.stats()
    assert stats["faults"]["bad_usage"] == 5
    assert stats["items"] == 0  # fault answers are not counted as served items


def test_deep_json_marker_nests_one_field_past_any_parser(llm_server: TestServer) -> None:
    status, _, raw = asyncio.run(_post(llm_server.url + CHAT, chat_body("[[deep_json]]")))
    assert status == 200
    with pytest.raises(RecursionError):
        json.loads(raw)
    head, _, deep = raw.partition(b',"deep":')
    assert deep == b"[" * 100_000 + b"]" * 100_000 + b"}"
    normal = json.loads(head + b"}")  # the rest is the ordinary answer
    assert normal["choices"][0]["message"]["content"] == "echo(gpt-x): [[deep_json]]"
    assert llm_server.stats()["faults"]["deep_json"] == 1


def test_new_knobs_validate_and_survive_the_command_line(llm_server: TestServer) -> None:
    with pytest.raises(ValueError, match="rate_limit_headers must be true or false"):
        llm_server.configure(rate_limit_headers=1)
    with pytest.raises(ValueError, match="tokens_per_minute must be at least 1"):
        llm_server.configure(tokens_per_minute=0)
    with pytest.raises(ValueError, match="fault_429_retry_after must be at least 0"):
        llm_server.configure(fault_429_retry_after=-1)

    config = ServerConfig(
        retry_after_http_date=True,
        rate_limit_headers=True,
        tokens_per_minute=500,
        fault_429_retry_after=3600,
    )
    parsed = build_parser().parse_args(config_to_argv(config))
    assert config_from_namespace(parsed) == config
    assert config_from_namespace(build_parser().parse_args(["--rate-limit-headers", "false"])) == (
        ServerConfig()
    )


def test_first_arrival_per_route_is_measured_from_the_reset(llm_server: TestServer) -> None:
    client = openai_client(llm_server)
    before_reset = time.monotonic()
    llm_server.reset_stats()
    after_reset = time.monotonic()
    time.sleep(0.05)
    sent = time.monotonic()
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "one"}])
    client.embeddings.create(model="m", input=["a"])
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "two"}])
    answered = time.monotonic()

    arrivals = llm_server.stats()["first_arrival"]
    assert set(arrivals) == {CHAT, "/v1/embeddings"}
    # The server resets between before_reset and after_reset (same clock: thread mode).
    # The second chat, sent after the embedding, does not move the chat route's time.
    rounding = 1e-6
    assert sent - after_reset - rounding <= arrivals[CHAT]
    assert arrivals[CHAT] <= arrivals["/v1/embeddings"]
    assert arrivals["/v1/embeddings"] <= answered - before_reset + rounding


def test_delay_marker_slows_generation_routes_only(llm_server: TestServer) -> None:
    assert delay_of(["plain", "a [[delay:0.1]] b [[delay:0.25]]", "[[delay:2]] last"]) == 2.0
    assert delay_of(["none", "[[delay:soon]]", "[[delay:-1]]"]) == 0.0

    # Delays are shown by client timeouts shorter than them, not by a clock.
    impatient = openai.OpenAI(
        base_url=llm_server.openai_base_url, api_key="k", max_retries=0, timeout=0.2
    )
    with impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(
                model="gpt-x", messages=[{"role": "user", "content": "slow [[delay:0.6]]"}]
            )
        with pytest.raises(openai.APITimeoutError):  # the slowest prompt of a request counts
            impatient.completions.create(model="c", prompt=["quick", "slow [[delay:0.6]]"])
    cohere_chat = {"model": "c", "messages": [{"role": "user", "content": "[[delay:0.6]]"}]}
    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(_post(llm_server.url + "/v2/chat", cohere_chat), 0.2))

    # Embeddings ignore the marker that a chat answer echoes: 30 s would time out.
    patient = openai_client(llm_server).with_options(timeout=10)
    answer = patient.chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "ready [[delay:0.05]]"}]
    )
    echoed = answer.choices[0].message.content
    assert echoed == "echo(gpt-x): ready [[delay:0.05]]"
    vectors = patient.embeddings.create(
        model="e", input=[f"{echoed} [[delay:30]]"], encoding_format="float"
    )
    assert vectors.data[0].embedding == embedding("e", f"{echoed} [[delay:30]]")
    status, _, body = post(
        llm_server.url + "/v2/embed",
        {"model": "e", "texts": ["[[delay:30]]"], "input_type": "search_query"},
    )
    assert status == 200 and body["embeddings"]["float"] == [embedding("e", "[[delay:30]]")]
    assert llm_server.stats()["faults"] == dict.fromkeys(
        ("429", "500", "hang", "drop", "malformed", "limit_429", "401", "400"), 0
    )


# --- structured answers: n, JSON modes, tools, log probabilities ----------------

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}},
        "kind": {"enum": ["cat", "dog"]},
        "address": {"$ref": "#/$defs/Address"},
        "nickname": {"anyOf": [{"type": "null"}, {"type": "string"}]},
    },
    "required": ["name", "age"],
    "$defs": {
        "Address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "number", "maximum": 2}},
        }
    },
}


def test_schema_instance_follows_the_schema_from_the_source_text() -> None:
    source = source_text("  Alice [[status:500]] ")
    assert source == "Alice"
    assert schema_instance(PERSON_SCHEMA, source) == {
        "name": "Alice",
        "age": 2,  # count_tokens("Alice")
        "tags": ["Ali", "Ali"],  # two items, cut to maxLength
        "kind": "cat",
        "address": {"city": "Alice", "zip": 2.0},  # 2.5 clamped to the maximum
        "nickname": "Alice",
    }
    assert schema_instance({"type": "boolean"}, "ab") is True
    assert schema_instance({"type": ["null", "integer"], "exclusiveMinimum": 5}, "a") == 6
    assert schema_instance({"type": "array", "minItems": 3, "items": {}}, "x") == ["x"] * 3
    with pytest.raises(ValueError, match="points nowhere"):
        schema_instance({"$ref": "#/$defs/Missing"}, "x")
    assert token_chunks("abcdefghij") == ["abcd", "efgh", "ij"]
    assert all(-2 < token_logprob("abcd", position) <= 0 for position in range(10))


def test_openai_n_choices_and_logprobs(llm_server: TestServer) -> None:
    client = openai_client(llm_server)
    reply = client.chat.completions.create(
        model="gpt-x",
        messages=[{"role": "user", "content": "hello"}],
        n=3,
        logprobs=True,
        top_logprobs=2,
    )
    texts = [choice.message.content for choice in reply.choices]
    assert texts == [chat_text("gpt-x", "hello", i) for i in range(3)]
    assert texts == ["echo(gpt-x): hello", "echo(gpt-x)[1]: hello", "echo(gpt-x)[2]: hello"]
    assert reply.usage is not None
    assert reply.usage.completion_tokens == sum(count_tokens(text) for text in texts)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [entry.token for entry in logprobs.content] == token_chunks(texts[0])
    assert [entry.logprob for entry in logprobs.content] == [
        token_logprob(token, position) for position, token in enumerate(token_chunks(texts[0]))
    ]
    assert [len(entry.top_logprobs) for entry in logprobs.content] == [2] * 5
    plain = client.chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "hello"}]
    )
    assert plain.choices[0].logprobs is None


def test_openai_json_schema_answers_conform_and_markers_spoil_them(
    llm_server: TestServer,
) -> None:
    def ask(content: str, response_format: dict[str, Any], max_tokens: int | None = None) -> Any:
        body = {**chat_body(content), "response_format": response_format}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        status, _, answer = post(llm_server.openai_base_url + "/chat/completions", body)
        assert status == 200, answer
        return answer["choices"][0]

    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "Person", "schema": PERSON_SCHEMA, "strict": True},
    }
    choice = ask("Alice", schema_format)
    assert choice["finish_reason"] == "stop"
    assert json.loads(choice["message"]["content"]) == schema_instance(PERSON_SCHEMA, "Alice")
    assert json.loads(ask("Bob", {"type": "json_object"})["message"]["content"]) == {"echo": "Bob"}
    broken = ask("Alice [[invalid_json]]", schema_format)["message"]["content"]
    assert broken == invalid_json_text(json_answer_text(schema_instance(PERSON_SCHEMA, "Alice")))
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken)
    wrong = ask("Alice [[wrong_schema]]", schema_format)["message"]["content"]
    assert json.loads(wrong) == wrong_schema_value("Alice") == {"unexpected": "Alice"}
    # Outside JSON mode the markers are part of the text.
    plain = post(llm_server.openai_base_url + "/chat/completions", chat_body("x [[invalid_json]]"))
    assert plain[2]["choices"][0]["message"]["content"] == "echo(gpt-x): x [[invalid_json]]"
    cut = ask("Alice", schema_format, max_tokens=3)
    assert cut["finish_reason"] == "length"
    assert (
        cut["message"]["content"] == json_answer_text(schema_instance(PERSON_SCHEMA, "Alice"))[:12]
    )

    # A re-asked conversation gets the answer of its first user message.
    body = {
        "model": "gpt-x",
        "messages": [
            {"role": "user", "content": "Alice [[invalid_json]]"},
            {"role": "assistant", "content": broken},
            {"role": "user", "content": "That was not valid JSON; answer again."},
        ],
        "response_format": schema_format,
    }
    repaired = post(llm_server.openai_base_url + "/chat/completions", body)[2]
    assert json.loads(repaired["choices"][0]["message"]["content"]) == schema_instance(
        PERSON_SCHEMA, "Alice"
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
            "response_format.json_schema.name",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_openai_chat_options_are_validated(
    llm_server: TestServer, extra: dict[str, Any], param: str
) -> None:
    status, _, answer = post(
        llm_server.openai_base_url + "/chat/completions", {**chat_body("hi"), **extra}
    )
    assert status == 400
    assert answer["error"]["param"] == param


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {}}}


def test_openai_tool_calls_by_tool_choice(llm_server: TestServer) -> None:
    client = openai_client(llm_server)
    messages: Any = [{"role": "user", "content": "Paris"}]
    required = client.chat.completions.create(
        model="gpt-x", messages=messages, tools=[WEATHER_TOOL, CLOCK_TOOL], tool_choice="required"
    )
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    expected = tool_call("get_weather", WEATHER_TOOL["function"]["parameters"], "Paris")
    assert (call.id, call.function.name, call.function.arguments) == (
        expected["id"],
        "get_weather",
        expected["arguments"],
    )
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    assert required.usage is not None
    assert required.usage.completion_tokens == count_tokens(expected["arguments"])

    named = client.chat.completions.create(
        model="gpt-x",
        messages=messages,
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert [c.function.name for c in named.choices[0].message.tool_calls or []] == ["get_time"]
    # "auto": a call when the message names a tool, text otherwise; "none": never.
    auto = client.chat.completions.create(
        model="gpt-x",
        messages=[{"role": "user", "content": "use get_time please"}],
        tools=[WEATHER_TOOL, CLOCK_TOOL],
    )
    assert auto.choices[0].finish_reason == "tool_calls"
    text = client.chat.completions.create(
        model="gpt-x", messages=messages, tools=[WEATHER_TOOL], tool_choice="auto"
    )
    assert text.choices[0].message.content == "echo(gpt-x): Paris"
    never = client.chat.completions.create(
        model="gpt-x",
        messages=[{"role": "user", "content": "get_weather"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert never.choices[0].finish_reason == "stop"


def test_cohere_json_mode_tools_and_logprobs(llm_server: TestServer) -> None:
    client = cohere_client(llm_server)
    structured = client.chat(
        model="command-x",
        messages=[{"role": "user", "content": "Alice"}],
        response_format={"type": "json_object", "json_schema": PERSON_SCHEMA},
    )
    assert structured.message.content is not None
    text = structured.message.content[0].text  # type: ignore[union-attr]
    assert json.loads(text) == schema_instance(PERSON_SCHEMA, "Alice")

    called = client.chat(
        model="command-x",
        messages=[{"role": "user", "content": "Paris"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="REQUIRED",
    )
    assert called.finish_reason == "TOOL_CALL"
    (call,) = called.message.tool_calls or []
    assert call.function is not None
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments or "") == {"city": "Paris", "days": 2}
    assert called.message.tool_plan == "I will call get_weather."

    scored = client.chat(
        model="command-x", messages=[{"role": "user", "content": "hello"}], logprobs=True
    )
    assert scored.logprobs is not None
    answer = chat_text("command-x", "hello")
    assert [item.text for item in scored.logprobs] == token_chunks(answer)
    assert [item.logprobs for item in scored.logprobs] == [
        [token_logprob(token, position)] for position, token in enumerate(token_chunks(answer))
    ]
    status, _, refused = post(
        llm_server.cohere_base_url + "/v2/chat",
        {
            **chat_body("x"),
            "response_format": {"type": "json_object"},
            "tools": [WEATHER_TOOL],
        },
    )
    assert status == 400 and "cannot be combined with tools" in refused["message"]
