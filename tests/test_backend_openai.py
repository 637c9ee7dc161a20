"""Tests of feste.backend.openai against the local feste.testing server.

Every test that sends runs over both transports ("http": aiohttp, "sdk": the official
openai client) and checks exact values and the requests the server saw.
"""

from __future__ import annotations

import pickle

import openai
import pytest

import feste
from feste import context
from feste._calls import RunObserver, current_observer
from feste._nodes import BatchCall, take_item
from feste.backend import ChatParams, CompleteParams, EmbedParams, OpenAI
from feste.backend.types import ItemFailure, Usage
from feste.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    MalformedResponseError,
    RateLimitError,
    TransientError,
)
from feste.testing import chat_text, completion_text, count_tokens, embedding

KEY = "sk-test-openai-0123456789"
TRANSPORTS = ["http", "sdk"]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def backend(server, transport: str, **kwargs) -> OpenAI:
    return OpenAI(api_key=KEY, base_url=server.openai_base_url, transport=transport, **kwargs)


class UsageRecorder(RunObserver):
    def __init__(self) -> None:
        self.usages: list[Usage | None] = []

    def request_finished(self, request, usage, seconds) -> None:
        self.usages.append(usage)


# -- values -------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_lazy_chat_complete_embed_give_exact_values(llm_server, transport, scheduler):
    llm = backend(llm_server, transport)
    answer = llm.chat("hello there")
    completion = llm.complete("once upon")
    vector = llm.embed("some text")
    assert isinstance(answer, feste.FesteDelayed)
    assert llm_server.stats()["requests"] == 0  # nothing sent while building

    results = feste.compute(answer, completion, vector, scheduler=scheduler)

    assert results == (
        chat_text("gpt-4o-mini", "hello there"),
        completion_text("gpt-3.5-turbo-instruct", "once upon"),
        embedding("text-embedding-3-small", "some text"),
    )
    assert llm_server.stats()["by_route"] == {CHAT: 1, COMPLETIONS: 1, EMBEDDINGS: 1}


def test_eager_calls_return_plain_values(llm_server, transport):
    llm = backend(llm_server, transport, model="my-model")
    with context.set(eager=True):
        answer = llm.chat("hi")
        completion = llm.complete("go")
        vector = llm.embed("text", dimensions=4)
    assert answer == "echo(my-model): hi"
    assert completion == "complete(my-model): go"
    assert vector == embedding("my-model", "text", 4)


def test_chained_calls_feed_one_output_into_the_next(llm_server, transport):
    llm = backend(llm_server, transport)
    first = llm.chat("ping")
    second = llm.chat(first, system="be brief")
    vector = llm.embed(second)
    (value,) = feste.compute(vector, scheduler="sync")
    expected_second = chat_text("gpt-4o-mini", chat_text("gpt-4o-mini", "ping"))
    assert value == embedding("text-embedding-3-small", expected_second)
    assert llm_server.stats()["inputs"][CHAT] == [["ping"], [chat_text("gpt-4o-mini", "ping")]]


def test_system_message_and_message_lists_are_sent(llm_server, transport):
    llm = backend(llm_server, transport)
    recorder = UsageRecorder()
    token = current_observer.set(recorder)
    try:
        with context.set(eager=True):
            with_system = llm.chat("question", system="you are terse")
            listed = llm.chat(
                [
                    {"role": "system", "content": "sys"},
                    {"role": "user", "content": "first"},
                    {"role": "assistant", "content": "reply"},
                    {"role": "user", "content": "second"},
                ]
            )
    finally:
        current_observer.reset(token)
    assert with_system == "echo(gpt-4o-mini): question"
    assert listed == "echo(gpt-4o-mini): second"
    # The server counts the tokens of every message: the system message was sent.
    prompt_tokens = [usage.prompt_tokens for usage in recorder.usages if usage]
    assert prompt_tokens == [
        count_tokens("you are terse") + count_tokens("question"),
        sum(count_tokens(text) for text in ("sys", "first", "reply", "second")),
    ]


def test_usage_is_recorded(llm_server, transport):
    llm = backend(llm_server, transport)
    recorder = UsageRecorder()
    token = current_observer.set(recorder)
    try:
        with context.set(eager=True):
            answer = llm.chat("count me")
            llm.embed("embed me")
    finally:
        current_observer.reset(token)
    assert recorder.usages == [
        Usage("gpt-4o-mini", count_tokens("count me"), count_tokens(answer)),
        Usage("text-embedding-3-small", count_tokens("embed me"), 0),
    ]


def test_batch_call_sends_one_request_for_many_items(llm_server, transport):
    llm = backend(llm_server, transport)
    vectors = BatchCall(llm, "embed")(["a", "b", "c"], model="text-embedding-3-small")
    completions = BatchCall(llm, "complete")(["x", "y", "z"], model="gpt-3.5-turbo-instruct")

    assert vectors == [embedding("text-embedding-3-small", text) for text in "abc"]
    assert completions == [completion_text("gpt-3.5-turbo-instruct", text) for text in "xyz"]
    stats = llm_server.stats()
    assert stats["items_per_request"] == {EMBEDDINGS: [3], COMPLETIONS: [3]}
    assert stats["inputs"][EMBEDDINGS] == [["a", "b", "c"]]


def test_batch_call_fills_in_the_default_model(llm_server, transport):
    llm = backend(llm_server, transport)
    assert BatchCall(llm, "embed")(["a", "b"]) == [
        embedding("text-embedding-3-small", "a"),
        embedding("text-embedding-3-small", "b"),
    ]


# -- parameters ---------------------------------------------------------------------


def test_typed_params_keywords_and_defaults_build_the_same_node():
    plain = OpenAI(api_key=KEY)
    typed = plain.chat("hi", ChatParams(temperature=0.5, max_tokens=7))
    by_name = plain.chat("hi", params=ChatParams(temperature=0.5, max_tokens=7))
    keywords = plain.chat("hi", temperature=0.5, max_tokens=7)
    mapping = plain.chat("hi", {"temperature": 0.5, "max_tokens": 7})
    from_defaults = OpenAI(api_key=KEY, temperature=0.5, max_tokens=7).chat("hi")
    assert typed.key == by_name.key == keywords.key == mapping.key == from_defaults.key

    node = dict(keywords.dask)[keywords.key]
    assert node.kwargs == {"model": "gpt-4o-mini", "temperature": 0.5, "max_tokens": 7}
    assert node.args == ([{"role": "user", "content": "hi"}],)


def test_calls_of_one_line_share_their_node_function_and_backends_pickle_the_same():
    llm = OpenAI(api_key=KEY)
    llm.identity()  # remembered by the first call, and pickled with it
    before = pickle.dumps(llm)
    values = []
    for index in range(3):
        values.append(llm.embed(f"text {index}"))
    other_line = llm.embed("text 0", dimensions=3)
    functions = [dict(value.dask)[value.key].func for value in values]
    assert functions[0] is functions[1] is functions[2]
    assert functions[0].call_site.endswith(
        "in test_calls_of_one_line_share_their_node_function_and_backends_pickle_the_same"
    )
    other = dict(other_line.dask)[other_line.key].func
    assert other is not functions[0]
    assert other.call_site != functions[0].call_site
    # Calls without parameters get the backend's defaults, merged once but each a dict
    # of its own node.
    kwargs = [dict(value.dask)[value.key].kwargs for value in values]
    assert kwargs[0] == kwargs[1] == {"model": "text-embedding-3-small"}
    assert kwargs[0] is not kwargs[1]
    # The shared node functions and merged defaults stay out of the backend's pickle.
    assert pickle.dumps(llm) == before
    assert len({value.key for value in values}) == 3
    assert llm.embed("text 0").key == values[0].key  # the call site is not identity


def test_a_chain_of_chat_calls_is_one_graph_of_dependent_calls():
    llm = OpenAI(api_key=KEY)
    value = llm.chat("start")
    for _ in range(200):
        value = llm.chat(value, temperature=0)
    graph = dict(value.dask)
    assert len(graph) == 201
    top = graph[value.key]
    assert len(top.dependencies) == 1
    assert top.kwargs == {"model": "gpt-4o-mini", "temperature": 0}


def test_precedence_of_parameters():
    llm = OpenAI(api_key=KEY, model="from-constructor", temperature=0.1)
    node = dict(llm.chat("hi", ChatParams(temperature=0.2, seed=1), seed=2).dask)
    (task,) = node.values()
    assert task.kwargs == {"model": "from-constructor", "temperature": 0.2, "seed": 2}


def test_unset_fields_are_not_sent_and_none_keywords_are_dropped():
    llm = OpenAI(api_key=KEY)
    assert ChatParams(temperature=0).as_dict() == {"temperature": 0}
    value = llm.complete("p", CompleteParams(max_tokens=None), temperature=None)
    (task,) = dict(value.dask).values()
    assert task.kwargs == {"model": "gpt-3.5-turbo-instruct"}


def test_constructor_defaults_apply_only_to_methods_that_accept_them():
    llm = OpenAI(api_key=KEY, temperature=0)
    (task,) = dict(llm.embed("text", EmbedParams(dimensions=3)).dask).values()
    assert task.kwargs == {"model": "text-embedding-3-small", "dimensions": 3}


def test_unknown_parameters_are_refused_with_the_valid_names():
    llm = OpenAI(api_key=KEY)
    with pytest.raises(ConfigurationError, match="'temprature'") as info:
        llm.chat("hi", temprature=0)
    assert "temperature" in str(info.value) and "max_tokens" in str(info.value)
    with pytest.raises(ConfigurationError, match=r"'temperature'.*OpenAI.embed"):
        llm.embed("x", temperature=0)
    with pytest.raises(ConfigurationError, match=r"'modle'.*OpenAI\(\.\.\.\)"):
        OpenAI(api_key=KEY, modle="gpt-4o")
    with pytest.raises(ConfigurationError, match="'bogus'"):
        llm.chat("hi", {"bogus": 1})


def test_params_object_of_another_method_is_refused():
    with pytest.raises(ConfigurationError, match=r"ChatParams or a mapping.*got EmbedParams"):
        OpenAI(api_key=KEY).chat("hi", EmbedParams(model="x"))


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "the list of messages is empty"),
        (["hello"], "message 0 must be a dict"),
        (
            [{"role": "user", "content": "a"}, {"role": "usr", "content": "b"}],
            "message 1 has role 'usr'",
        ),
        ([{"role": "user"}], "message 0 has no content"),
        ([{"role": "user", "content": 3}], "message 0 has int content"),
        (42, "expected a prompt string or a list of messages"),
    ],
)
def test_bad_messages_are_refused_when_the_call_is_written(prompt, message):
    llm = OpenAI(api_key=KEY)
    with pytest.raises(BadRequestError, match=message) as info:
        llm.chat(prompt)
    assert "{'role': 'user', 'content': 'some text'}" in str(info.value)
    assert info.value.backend == "openai" and info.value.method == "chat"


def test_bad_messages_from_a_lazy_value_are_refused_when_the_call_runs(llm_server, transport):
    llm = backend(llm_server, transport)
    lazy_messages = feste.feste_task(lambda: [{"role": "robot", "content": "x"}], pure=True)()
    with pytest.raises(BadRequestError, match="message 0 has role 'robot'"):
        feste.compute(llm.chat(lazy_messages), scheduler="sync")
    assert llm_server.stats()["requests"] == 0


def test_bad_texts_are_refused():
    llm = OpenAI(api_key=KEY)
    with pytest.raises(BadRequestError, match="the text is empty"):
        llm.embed("")
    with pytest.raises(BadRequestError, match="got list; call the method once per text"):
        llm.embed(["a", "b"])
    with pytest.raises(BadRequestError, match="expected a string, got int"):
        llm.complete(3)
    with pytest.raises(BadRequestError, match="system must be a string"):
        llm.chat("hi", system=["x"])


def test_embedding_over_the_token_limit_names_the_item(llm_server_factory, transport):
    server = llm_server_factory(max_input_tokens=5)
    llm = backend(server, transport)
    long_text = "x" * 40
    with (
        context.set(eager=True),
        pytest.raises(BadRequestError, match=r"input\[0\] has 10 tokens") as info,
    ):
        llm.embed(long_text)
    assert info.value.status == 400 and info.value.item_index == 0

    results = BatchCall(llm, "embed")(["ok", long_text, "fine"], model="text-embedding-3-small")
    assert results[0] == embedding("text-embedding-3-small", "ok")
    assert results[2] == embedding("text-embedding-3-small", "fine")
    assert isinstance(results[1], ItemFailure)
    with pytest.raises(BadRequestError, match=r"input\[1\] has 10 tokens"):
        take_item(results, 1)


def test_a_bad_item_in_a_batch_fails_alone(llm_server, transport):
    llm = backend(llm_server, transport)
    results = BatchCall(llm, "embed")(["a", 3, "b"], model="text-embedding-3-small")
    assert results[0] == embedding("text-embedding-3-small", "a")
    assert results[2] == embedding("text-embedding-3-small", "b")
    with pytest.raises(BadRequestError, match=r"input\[1\]: expected a string, got int"):
        take_item(results, 1)
    assert llm_server.stats()["inputs"][EMBEDDINGS] == [["a", "b"]]


# -- errors -------------------------------------------------------------------------


def test_wrong_key_is_an_authentication_error_and_not_retried(llm_server_factory, transport):
    server = llm_server_factory(api_key="sk-the-right-key-000")
    llm = backend(server, transport)
    with context.set(eager=True, max_retries=3), pytest.raises(AuthenticationError) as info:
        llm.chat("hi")
    assert server.stats()["requests"] == 1
    assert info.value.status == 401
    assert "OPENAI_API_KEY" in str(info.value)
    assert "Incorrect API key provided" in str(info.value)


def test_rate_limit_carries_retry_after(llm_server_factory, transport):
    server = llm_server_factory(retry_after=1.5)
    llm = backend(server, transport)
    with (
        context.set(eager=True, max_retries=0, rate_limit_timeout=0),
        pytest.raises(RateLimitError) as info,
    ):
        llm.chat("please [[status:429]]")
    assert info.value.retry_after == 1.5
    assert info.value.status == 429
    assert server.stats()["requests"] == 1


def test_server_error_is_transient_and_retried(llm_server, transport):
    llm = backend(llm_server, transport)
    with (
        context.set(eager=True, max_retries=2, retry_backoff=0.001),
        pytest.raises(TransientError, match="HTTP 500: Injected error 500") as info,
    ):
        llm.chat("boom [[status:500]]")
    assert llm_server.stats()["requests"] == 3
    assert info.value.attempts == 3


def test_dropped_connection_is_transient(llm_server, transport):
    llm = backend(llm_server, transport)
    with context.set(eager=True, max_retries=0), pytest.raises(TransientError, match="connection"):
        llm.embed("bye [[drop]]")
    assert llm_server.stats()["faults"]["drop"] == 1


def test_hang_past_the_timeout_is_transient(llm_server_factory, transport):
    server = llm_server_factory(hang_seconds=5)
    llm = backend(server, transport, timeout=0.2)
    with context.set(eager=True, max_retries=0), pytest.raises(TransientError, match=r"0.2 s"):
        llm.chat("wait [[hang]]")


def test_malformed_body_is_not_retried(llm_server, transport):
    llm = backend(llm_server, transport)
    with (
        context.set(eager=True, max_retries=3),
        pytest.raises(MalformedResponseError, match="not JSON") as info,
    ):
        llm.complete("[[malformed]]")
    assert llm_server.stats()["requests"] == 1
    assert info.value.method == "complete" and info.value.model == "gpt-3.5-turbo-instruct"


def test_unexpected_json_shape_is_malformed():
    from feste.backend.types import Response

    llm = OpenAI(api_key=KEY)
    request = llm.build_request("embed", ["a", "b"], {"model": "m"})
    one_result = {"data": [{"index": 0, "embedding": [0.1]}]}
    with pytest.raises(MalformedResponseError, match="expected 2 results, got 1"):
        llm.parse_response(request, Response(200, one_result))
    repeated = {"data": [{"index": 0, "embedding": [0.1]}, {"index": 0, "embedding": [0.2]}]}
    with pytest.raises(MalformedResponseError, match="bad index 0"):
        llm.parse_response(request, Response(200, repeated))
    shuffled = {"data": [{"index": 1, "embedding": [0.2]}, {"index": 0, "embedding": [0.1]}]}
    assert llm.parse_response(request, Response(200, shuffled)).values == [[0.1], [0.2]]


def outcomes_of(llm: OpenAI, intruder: OpenAI) -> list[tuple[str, object]]:
    calls = [
        lambda: llm.chat("fine"),
        lambda: llm.embed("fine"),
        lambda: llm.chat("[[status:429]]"),
        lambda: llm.chat("[[status:503]]"),
        lambda: llm.chat("[[status:404]]"),
        lambda: llm.embed("x" * 40),
        lambda: llm.chat("[[malformed]]"),
        lambda: intruder.chat("x"),
    ]
    seen: list[tuple[str, object]] = []
    for call in calls:
        try:
            with context.set(eager=True, max_retries=0, rate_limit_timeout=0):
                seen.append(("value", call()))
        except Exception as error:
            seen.append((type(error).__name__, str(error)))
    return seen


def test_both_transports_raise_the_same_errors_and_values(llm_server_factory):
    server = llm_server_factory(max_input_tokens=5, api_key=KEY)
    outcomes = {}
    for transport in TRANSPORTS:
        intruder = OpenAI(
            api_key="sk-wrong-key-99999", base_url=server.openai_base_url, transport=transport
        )
        outcomes[transport] = outcomes_of(backend(server, transport), intruder)
    assert outcomes["http"] == outcomes["sdk"]
    assert [kind for kind, _ in outcomes["http"]] == [
        "value",
        "value",
        "RateLimitError",
        "TransientError",
        "BadRequestError",
        "BadRequestError",
        "MalformedResponseError",
        "AuthenticationError",
    ]
    assert server.stats()["requests"] == 16


# -- configuration ------------------------------------------------------------------


def test_sync_client_is_refused():
    with pytest.raises(ConfigurationError, match=r"AsyncOpenAI.*synchronous client"):
        OpenAI(client=openai.OpenAI(api_key=KEY))
    with pytest.raises(ConfigurationError, match=r"an instance of openai.AsyncOpenAI, got str"):
        OpenAI(client="not a client")


def test_configured_client_is_used_with_its_retries_off(llm_server):
    client = openai.AsyncOpenAI(api_key=KEY, base_url=llm_server.openai_base_url, max_retries=4)
    llm = OpenAI(client=client)
    assert llm.transport == "sdk"
    with context.set(eager=True):
        assert llm.chat("via client") == "echo(gpt-4o-mini): via client"
    with context.set(eager=True, max_retries=0), pytest.raises(TransientError):
        llm.chat("[[status:500]]")
    assert llm_server.stats()["requests"] == 2  # the client's own 4 retries are off


def test_settings_are_checked():
    with pytest.raises(ConfigurationError, match="unknown transport 'grpc'"):
        OpenAI(api_key=KEY, transport="grpc")
    with pytest.raises(ConfigurationError, match="timeout must be a positive number"):
        OpenAI(api_key=KEY, timeout=0)
    with pytest.raises(ConfigurationError, match="api_key must be a string"):
        OpenAI(api_key=123)  # type: ignore[arg-type]


def test_identity_names_the_destination_not_the_key_or_defaults():
    base = OpenAI(api_key="sk-one-000000000", base_url="http://a/v1")
    assert base.identity() == OpenAI(api_key="sk-two-000000000", base_url="http://a/v1").identity()
    assert base.identity() == OpenAI(base_url="http://a/v1", temperature=0).identity()
    assert base.identity() != OpenAI(base_url="http://b/v1").identity()
    assert base.identity() != OpenAI(base_url="http://a/v1", organization="org-1").identity()
    assert OpenAI(organization="org-1").request_headers() == {"OpenAI-Organization": "org-1"}
