"""Tests of feste.backend.transports: the status table, sessions per loop, raw JSON, and
the boundary: every exception leaving a transport is a feste error without the key."""

from __future__ import annotations

import asyncio
import email.utils
import json
import pickle
import socket
import time

import cohere
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict

from feste import context
from feste._calls import RunObserver, current_observer, run_call, transport_for
from feste._loop import close_loop_resources
from feste.backend import Backend, Cohere, OpenAI
from feste.backend.transports import (
    HTTPTransport,
    SDKTransport,
    make_transport,
    provider_message,
    retry_after_seconds,
    status_error,
)
from feste.backend.types import Usage
from feste.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    MalformedResponseError,
    RateLimitError,
    TransientError,
)
from feste.testing import chat_text, embedding

KEY = "sk-transport-test-0123456789"
TRANSPORTS = ["http", "sdk"]

# cohere's own response models use a pydantic API that pydantic deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:The `__fields__` attribute is deprecated")


@pytest.fixture
def loop():
    """A private event loop, closed the way feste closes its own."""
    new_loop = asyncio.new_event_loop()
    yield new_loop
    new_loop.run_until_complete(close_loop_resources(new_loop))
    new_loop.close()


def test_make_transport_follows_the_backend_setting():
    assert isinstance(make_transport(OpenAI(api_key=KEY)), HTTPTransport)
    assert isinstance(make_transport(OpenAI(api_key=KEY, transport="sdk")), SDKTransport)
    assert isinstance(make_transport(Cohere(api_key=KEY, transport="sdk")), SDKTransport)


def test_sdk_transport_needs_an_official_client():
    class Custom(Backend):
        provider = "custom"

        def build_request(self, method, items, params):
            raise NotImplementedError

        def parse_response(self, request, response):
            raise NotImplementedError

    with pytest.raises(ConfigurationError, match=r"no official client.*transport='http'"):
        SDKTransport(Custom(transport="sdk"))


# -- the status table ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, BadRequestError),
        (404, BadRequestError),
        (409, BadRequestError),
        (413, BadRequestError),
        (422, BadRequestError),
        (401, AuthenticationError),
        (403, AuthenticationError),
        (429, RateLimitError),
        (408, TransientError),
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
        (504, TransientError),
        (302, MalformedResponseError),
    ],
)
def test_status_table(status, error_type):
    llm = OpenAI(api_key=KEY)
    request = llm.build_request("chat", ["hi"], {"model": "m"})
    error = status_error(llm, request, status, {}, b'{"error": {"message": "nope"}}')
    assert type(error) is error_type
    assert error.status == status
    assert str(error).startswith(f"[openai.chat model=m status={status}] ")
    assert "nope" in str(error)


def test_item_index_comes_from_the_providers_message():
    llm = OpenAI(api_key=KEY)
    request = llm.build_request("embed", ["a", "b", "c"], {"model": "m"})
    blamed = status_error(llm, request, 400, {}, {"error": {"message": "input[2] is too long"}})
    assert blamed.item_index == 2
    unblamed = status_error(llm, request, 400, {}, {"error": {"message": "bad model"}})
    assert unblamed.item_index is None
    cohere = Cohere(api_key=KEY)
    cohere_request = cohere.build_request("embed", ["a", "b"], {"model": "m"})
    assert (
        status_error(cohere, cohere_request, 400, {}, {"message": "texts[1] bad"}).item_index == 1
    )


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    assert retry_after_seconds({"Retry-After": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "0.5"}) == 0.5
    assert retry_after_seconds(CIMultiDict({"RETRY-AFTER": "3"})) == 3.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_seconds({"Retry-After": later}) <= 31
    earlier = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert retry_after_seconds({"Retry-After": earlier}) == 0.0
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    assert retry_after_seconds({}) is None
    assert retry_after_seconds(None) is None


def test_provider_message_reads_every_body_shape():
    assert provider_message(b'{"error": {"message": "openai says"}}') == "openai says"
    assert provider_message({"message": "cohere says"}) == "cohere says"
    assert provider_message('{"error": "plain"}') == "plain"
    assert provider_message(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert provider_message(b"") == "(empty body)"
    assert provider_message(None) == "(empty body)"
    assert provider_message({"detail": 1}) == '{"detail": 1}'
    assert provider_message("x" * 5000).endswith("...")


def test_a_key_echoed_by_the_provider_is_scrubbed():
    llm = OpenAI(api_key=KEY)
    request = llm.build_request("chat", ["hi"], {"model": "m"})
    error = status_error(llm, request, 401, {}, {"error": {"message": f"bad key {KEY}"}})
    assert KEY not in str(error)
    assert "bad key ***" in str(error)


# -- sessions and loops -------------------------------------------------------------


def test_one_connection_pool_per_backend_per_loop(llm_server, loop):
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    other = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    params = {"model": "gpt-4o-mini"}
    loop.run_until_complete(run_call(llm, "chat", "one", params))
    transport = llm._transports[loop]
    session = transport._connections
    for text in ("two", "three", "four"):
        loop.run_until_complete(run_call(llm, "chat", text, params))
    loop.run_until_complete(run_call(other, "chat", "five", params))

    assert llm._transports == {loop: transport}
    assert transport._connections is session
    assert other._transports[loop]._connections is not session
    assert llm_server.stats()["requests"] == 5


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_closing_a_loop_closes_its_transports(llm_server, transport):
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url, transport=transport)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run_call(llm, "chat", "hi", {"model": "m"}))
        sent = llm._transports[loop]
        pool = sent._connections if transport == "http" else sent._client
        loop.run_until_complete(close_loop_resources(loop))
    finally:
        loop.close()
    assert llm._transports == {}
    if transport == "http":
        assert pool.closed
    else:
        assert pool.is_closed()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_closed_transport_is_replaced_on_the_next_call(llm_server, loop, transport):
    llm = Cohere(api_key=KEY, base_url=llm_server.cohere_base_url, transport=transport)
    params = {"model": "embed-v4.0", "input_type": "search_document"}
    loop.run_until_complete(run_call(llm, "embed", "a", params))
    first = llm._transports[loop]
    loop.run_until_complete(first.aclose())
    assert llm._transports == {}
    value = loop.run_until_complete(run_call(llm, "embed", "b", params))
    assert value == embedding("embed-v4.0", "b")
    assert llm._transports[loop] is not first


def test_both_transports_hand_over_the_same_json(llm_server, loop):
    bodies = []
    for transport in TRANSPORTS:
        llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url, transport=transport)
        request = llm.build_request("embed", ["x", "y"], {"model": "text-embedding-3-small"})
        response = loop.run_until_complete(make_transport(llm).send(request))
        assert response.status == 200
        bodies.append(response.body)
    assert bodies[0] == bodies[1]
    assert [entry["embedding"] for entry in bodies[0]["data"]] == [
        embedding("text-embedding-3-small", "x"),
        embedding("text-embedding-3-small", "y"),
    ]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_refused_connection_is_transient(transport):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    llm = OpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1", transport=transport)
    with (
        context.set(eager=True, max_retries=0),
        pytest.raises(TransientError, match=f"connection to http://127.0.0.1:{port}/v1 failed"),
    ):
        llm.chat("anyone?")


def test_an_id_from_an_answer_stays_one_path_segment(llm_server, loop):
    # Batch and file ids come from provider answers: escaped, they cannot reach
    # another route (here the files route) nor break the request line.
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    loop.run_until_complete(run_call(llm, "chat", "hi", {"model": "gpt-4o-mini"}))
    transport = llm._transports[loop]
    with pytest.raises(BadRequestError) as caught:
        loop.run_until_complete(transport.get_batch("../files/file-1 x"))
    assert caught.value.status == 404
    assert "No such Batch object: ../files/file-1 x" in str(caught.value)
    assert llm_server.stats()["by_route"]["/v1/batches/{batch_id}"] == 1


def test_the_http_transport_does_not_go_through_proxies(llm_server, monkeypatch):
    # docs/guide.md says so: a proxy named by the environment is not used (nothing
    # listens at this one; a request sent there would fail).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url, transport="http")
    with context.set(eager=True, max_retries=0):
        assert llm.chat("direct") == chat_text("gpt-4o-mini", "direct")
    assert llm_server.stats()["requests"] == 1


def test_a_new_key_in_the_environment_is_used_by_the_next_request(llm_server, monkeypatch):
    llm = OpenAI(base_url=llm_server.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-first-key-000000")
    llm_server.configure(api_key="sk-first-key-000000")
    with context.set(eager=True):
        assert llm.chat("a") == "echo(gpt-4o-mini): a"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-second-key-00000")
    llm_server.configure(api_key="sk-second-key-00000")
    with context.set(eager=True):
        assert llm.chat("b") == "echo(gpt-4o-mini): b"


def test_a_configured_client_does_not_travel_to_other_processes(llm_server):
    client = openai.AsyncOpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    copy = pickle.loads(pickle.dumps(OpenAI(client=client)))
    with (
        context.set(eager=True),
        pytest.raises(ConfigurationError, match="client= given to OpenAI does not travel"),
    ):
        copy.chat("hi")
    assert llm_server.stats()["requests"] == 0


@pytest.mark.parametrize("backend_type", [OpenAI, Cohere])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_prepare_opens_the_pool_before_any_request(llm_server, loop, backend_type, transport):
    base_url = llm_server.openai_base_url if backend_type is OpenAI else llm_server.cohere_base_url
    llm = backend_type(api_key=KEY, base_url=base_url, transport=transport)

    prepared = loop.run_until_complete(transport_for(llm))
    pool = prepared._connections if transport == "http" else prepared._client

    assert pool is not None
    assert loop.run_until_complete(transport_for(llm)) is prepared
    assert (prepared._connections if transport == "http" else prepared._client) is pool
    assert llm._transports == {loop: prepared}
    assert llm_server.stats()["requests"] == 0


# -- the boundary: keys, URLs, answers feste cannot use ------------------------------

BAD_KEYS = {
    "trailing newline": (
        KEY + "\n",
        "has leading or trailing whitespace (a newline from a file or a paste?)",
    ),
    "leading space": (
        " " + KEY,
        "has leading or trailing whitespace (a newline from a file or a paste?)",
    ),
    "inner space": ("sk-two words-0123456789", "has whitespace or control characters inside"),
    "inner tab": ("sk-a\tb-0123456789", "has whitespace or control characters inside"),
    "non-ASCII": ("sk-clé-0123456789", "has non-ASCII characters"),
}


def assert_keeps_no_key(error: BaseException, key: str) -> None:
    shown = " ".join([str(error), repr(error), repr(error.args), repr(vars(error))])
    for fragment in (key, key.strip(), "0123456789"):
        assert fragment not in shown
    assert error.__context__ is None and error.__cause__ is None


@pytest.mark.parametrize("backend_type", [OpenAI, Cohere])
@pytest.mark.parametrize("case", sorted(BAD_KEYS))
def test_an_unusable_explicit_key_is_refused_at_construction(backend_type, case):
    key, problem = BAD_KEYS[case]
    with pytest.raises(ConfigurationError) as caught:
        backend_type(api_key=key)
    assert str(caught.value) == (
        f"[{backend_type.provider}] the API key in the api_key given to "
        f"{backend_type.__name__} {problem}; fix the key (it is not shown here)"
    )
    assert_keeps_no_key(caught.value, key)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", ["trailing newline", "non-ASCII"])
def test_an_unusable_environment_key_is_refused_before_sending(
    llm_server, monkeypatch, transport, case
):
    key, problem = BAD_KEYS[case]
    monkeypatch.setenv("OPENAI_API_KEY", key)
    llm = OpenAI(base_url=llm_server.openai_base_url, transport=transport)
    with context.set(eager=True, max_retries=3), pytest.raises(ConfigurationError) as caught:
        llm.chat("hi")
    error = caught.value
    assert f"the API key in the OPENAI_API_KEY environment variable {problem}" in str(error)
    assert (error.backend, error.method, error.attempts) == ("openai", "chat", 1)
    assert_keeps_no_key(error, key)
    assert llm_server.stats()["requests"] == 0


def test_a_configured_client_with_an_unusable_key_is_refused(llm_server):
    key = KEY + "\n"
    client = openai.AsyncOpenAI(api_key=key, base_url=llm_server.openai_base_url)
    with pytest.raises(ConfigurationError, match="the API key in the client given to OpenAI"):
        OpenAI(client=client)


def test_a_header_the_client_refuses_is_a_configuration_error(llm_server):
    # cohere's client keeps its key out of reach, so it is only refused when sending.
    key = KEY + "\n"
    client = cohere.AsyncClientV2(api_key=key, base_url=llm_server.cohere_base_url)
    co = Cohere(client=client)
    with context.set(eager=True, max_retries=3), pytest.raises(ConfigurationError) as caught:
        co.chat("hi")
    error = caught.value
    assert error.message == (
        "the request could not be sent (LocalProtocolError: the client refused a header "
        "value); check the API key and the headers this backend sends"
    )
    assert (error.backend, error.method, error.attempts) == ("cohere", "chat", 1)
    assert_keeps_no_key(error, key)
    assert llm_server.stats()["requests"] == 0


def test_a_key_the_client_cannot_encode_is_a_configuration_error(llm_server):
    key = "sk-clé-0123456789"
    client = openai.AsyncOpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    llm = OpenAI(client=client)
    client.api_key = key  # changed after the backend checked it
    with context.set(eager=True, max_retries=3), pytest.raises(ConfigurationError) as caught:
        llm.chat("hi")
    error = caught.value
    assert "could not encode the request (UnicodeEncodeError)" in str(error)
    assert (error.backend, error.method) == ("openai", "chat")
    assert_keeps_no_key(error, key)
    assert llm_server.stats()["requests"] == 0


@pytest.mark.parametrize("backend_type", [OpenAI, Cohere])
@pytest.mark.parametrize("base_url", ["localhost:8000/v1", "ftp://example.com", "//host/v1"])
def test_a_base_url_without_http_scheme_is_refused_at_construction(backend_type, base_url):
    with pytest.raises(ConfigurationError) as caught:
        backend_type(api_key=KEY, base_url=base_url)
    assert str(caught.value) == (
        f"[{backend_type.provider}] base_url must start with http:// or https://, got {base_url!r}"
    )


class StaticServer:
    """A tiny aiohttp app answering every POST with one fixed 200 body: for answers the
    feste.testing server does not make (usage of the wrong type, absurd nesting)."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.requests = 0
        self.url = ""

    async def answer(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        return web.Response(body=self.body, content_type="application/json")


@pytest.fixture
def static_server(serve_app):
    server = StaticServer()
    app = web.Application()
    app.router.add_post("/{path:.*}", server.answer)
    server.url = f"http://127.0.0.1:{serve_app(app)}"
    return server


class UsageRecorder(RunObserver):
    def __init__(self) -> None:
        self.usages: list[Usage | None] = []

    def request_finished(self, request, usage, seconds) -> None:
        self.usages.append(usage)


def openai_chat_answer(usage: object) -> dict:
    return {
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}}],
        "usage": usage,
    }


def cohere_chat_answer(usage: object) -> dict:
    return {
        "id": "answer-1",
        "finish_reason": "COMPLETE",
        "message": {"role": "assistant", "content": [{"type": "text", "text": "fine"}]},
        "usage": {"tokens": usage},
    }


BAD_USAGES = [
    {"prompt_tokens": "many", "completion_tokens": 3},
    {"prompt_tokens": 2, "completion_tokens": [3]},
    {"prompt_tokens": -2, "completion_tokens": 3},
    {"prompt_tokens": float("inf"), "completion_tokens": 3},
    {"prompt_tokens": True, "completion_tokens": 3},
]


@pytest.mark.parametrize("backend_type", [OpenAI, Cohere])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("usage", BAD_USAGES, ids=range(len(BAD_USAGES)))
def test_an_unreadable_usage_keeps_the_answer(static_server, backend_type, transport, usage):
    if backend_type is OpenAI:
        body = openai_chat_answer(usage)
        llm = OpenAI(api_key=KEY, base_url=static_server.url + "/v1", transport=transport)
    else:
        cohere_usage = {"input_tokens": usage["prompt_tokens"]}
        cohere_usage["output_tokens"] = usage["completion_tokens"]
        body = cohere_chat_answer(cohere_usage)
        llm = Cohere(api_key=KEY, base_url=static_server.url, transport=transport)
    static_server.body = json.dumps(body).encode()  # inf is written as Infinity
    recorder = UsageRecorder()
    token = current_observer.set(recorder)
    try:
        with context.set(eager=True, max_retries=3):
            answer = llm.chat("hi")
    finally:
        current_observer.reset(token)
    assert answer == "fine"
    assert recorder.usages == [None]
    assert static_server.requests == 1


@pytest.mark.parametrize("backend_type", [OpenAI, Cohere])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_deeply_nested_json_is_malformed_and_not_retried(static_server, backend_type, transport):
    depth = 100_000
    static_server.body = b"[" * depth + b"]" * depth
    base_url = static_server.url + ("/v1" if backend_type is OpenAI else "")
    llm = backend_type(api_key=KEY, base_url=base_url, transport=transport)
    with context.set(eager=True, max_retries=3), pytest.raises(MalformedResponseError) as caught:
        llm.chat("hi")
    error = caught.value
    assert error.message == "unexpected response body: the JSON body is nested too deeply to decode"
    assert (error.backend, error.method, error.attempts) == (backend_type.provider, "chat", 1)
    assert error.__context__ is None
    assert static_server.requests == 1
