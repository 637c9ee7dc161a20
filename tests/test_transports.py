"""Tests of feste.backend.transports: the status table, sessions per loop, raw JSON."""

from __future__ import annotations

import asyncio
import email.utils
import pickle
import socket
import time

import openai
import pytest
from multidict import CIMultiDict

from feste import context
from feste._calls import run_call
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
from feste.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    MalformedResponseError,
    RateLimitError,
    TransientError,
)
from feste.testing import embedding

KEY = "sk-transport-test-0123456789"
TRANSPORTS = ["http", "sdk"]


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


def test_one_session_per_backend_per_loop(llm_server, loop):
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    other = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url)
    params = {"model": "gpt-4o-mini"}
    loop.run_until_complete(run_call(llm, "chat", "one", params))
    transport = llm._transports[loop]
    session = transport._session
    for text in ("two", "three", "four"):
        loop.run_until_complete(run_call(llm, "chat", text, params))
    loop.run_until_complete(run_call(other, "chat", "five", params))

    assert llm._transports == {loop: transport}
    assert transport._session is session
    assert other._transports[loop]._session is not session
    assert llm_server.stats()["requests"] == 5


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_closing_a_loop_closes_its_transports(llm_server, transport):
    llm = OpenAI(api_key=KEY, base_url=llm_server.openai_base_url, transport=transport)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run_call(llm, "chat", "hi", {"model": "m"}))
        sent = llm._transports[loop]
        pool = sent._session if transport == "http" else sent._client
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
