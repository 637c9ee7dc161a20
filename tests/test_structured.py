"""Rich chat results against the local server, on the ``http`` and ``sdk`` transports:
structured outputs (Pydantic models and JSON mode), repairs, ``n`` choices, whole
answers (``full=True``), tool calls, log probabilities and the truncation policy.

The server answers a JSON-mode request with ``schema_instance(schema, source)`` (the
source being the first user message without markers), so every expected value is
computed here from the inputs; ``[[invalid_json]]`` and ``[[wrong_schema]]`` in the last
user message spoil an answer. Models live at module level: worker processes import them.
"""

from __future__ import annotations

import pickle
import warnings

import pydantic
import pytest
from dask.base import tokenize

import feste
from feste import context
from feste.backend import ChatParams, Cohere, OpenAI
from feste.backend.structured import ResponseFormat, strict_schema
from feste.backend.types import ChatResult, Choice, TokenLogprob, ToolCall, Usage
from feste.cache.keys import call_key
from feste.errors import (
    ConfigurationError,
    Failure,
    StructuredOutputError,
    TruncatedOutputError,
    TruncatedOutputWarning,
)
from feste.testing import (
    chat_text,
    count_tokens,
    invalid_json_text,
    json_answer_text,
    schema_instance,
    token_chunks,
    token_logprob,
    tool_call,
)

KEY = "sk-test-rich-0123456789"
TRANSPORTS = ["http", "sdk"]
SCHEDULERS = ["async", "sync", "threads", "processes"]
CHAT = "/v1/chat/completions"
COHERE_CHAT = "/v2/chat"


class Address(pydantic.BaseModel):
    city: str
    zip_code: int


class Person(pydantic.BaseModel):
    name: str
    age: int
    tags: list[str]
    address: Address
    nickname: str | None = None


class Picky(pydantic.BaseModel):
    """Valid JSON for its schema never passes: tests that give up after repairs."""

    name: str

    @pydantic.field_validator("name")
    @classmethod
    def never(cls, value: str) -> str:
        raise ValueError("names are never accepted")


def person(source: str) -> Person:
    """The Person the server answers for ``source``: an instance of the strict schema."""
    return Person.model_validate(schema_instance(strict_schema(Person.model_json_schema()), source))


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def openai_llm(server, transport: str, **kwargs) -> OpenAI:
    return OpenAI(api_key=KEY, base_url=server.openai_base_url, transport=transport, **kwargs)


def cohere_llm(server, transport: str, **kwargs) -> Cohere:
    return Cohere(api_key=KEY, base_url=server.cohere_base_url, transport=transport, **kwargs)


# -- structured outputs -----------------------------------------------------------------


def test_expected_person_is_what_the_schema_makes_of_the_source():
    assert person("Alice") == Person(
        name="Alice",
        age=2,
        tags=["Alice", "Alice"],
        address=Address(city="Alice", zip_code=2),
        nickname="Alice",
    )


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_pydantic_round_trip_lazily_on_every_scheduler(llm_server, transport, scheduler):
    llm = openai_llm(llm_server, transport)
    co = cohere_llm(llm_server, transport)
    names = ["Alice", "Bob", "Carol"]
    people = [llm.chat(f"Describe {name}", response_format=Person) for name in names]
    people.append(co.chat("Describe Dan", response_format=Person))
    results = feste.compute(people, scheduler=scheduler)[0]
    assert results == [person(f"Describe {name}") for name in [*names, "Dan"]]
    assert all(type(result) is Person for result in results)
    assert llm_server.stats()["by_route"] == {CHAT: 3, COHERE_CHAT: 1}


def test_what_each_provider_is_sent(llm_server, transport):
    llm = openai_llm(llm_server, transport)
    co = cohere_llm(llm_server, transport)
    openai_request = llm.build_request(
        "chat", ["hi"], llm.call_params("chat", None, {"response_format": Person})
    )
    # call_params alone keeps the class; build_request resolves it like chat() does.
    assert openai_request.payload["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "Person",
            "schema": strict_schema(Person.model_json_schema()),
            "strict": True,
        },
    }
    assert openai_request.full_answer is True
    strict = openai_request.payload["response_format"]["json_schema"]["schema"]
    assert strict["additionalProperties"] is False
    assert strict["required"] == ["name", "age", "tags", "address", "nickname"]
    assert strict["$defs"]["Address"]["additionalProperties"] is False
    cohere_request = co.build_request("chat", ["hi"], {"response_format": Person})
    assert cohere_request.payload["response_format"] == {
        "type": "json_object",
        "json_schema": Person.model_json_schema(),
    }
    plain = llm.build_request("chat", ["hi"], {"response_format": {"type": "json_object"}})
    assert plain.payload["response_format"] == {"type": "json_object"}
    assert plain.full_answer is False
    # Local parameters never reach the provider.
    local = llm.build_request("chat", ["hi"], {"full": True, "repair_retries": 2})
    assert "full" not in local.payload and "repair_retries" not in local.payload


def test_eagerly_and_as_dict(llm_server, transport):
    llm = openai_llm(llm_server, transport)
    co = cohere_llm(llm_server, transport)
    with context.set(eager=True):
        assert llm.chat("Eve", response_format=Person) == person("Eve")
        assert llm.chat("Eve", response_format=dict) == {"echo": "Eve"}
        assert co.chat("Eve", response_format=dict) == {"echo": "Eve"}
        # The provider's own format is sent as it is: the answer stays text.
        raw = llm.chat("Eve", response_format={"type": "json_object"})
    assert raw == json_answer_text({"echo": "Eve"})


def test_the_model_class_is_part_of_the_call_identity(llm_server):
    llm = openai_llm(llm_server, "http")

    class Other(pydantic.BaseModel):
        name: str

    keys = {
        llm.chat("x").key,
        llm.chat("x", response_format=Person).key,
        llm.chat("x", response_format=Other).key,
        llm.chat("x", response_format=dict).key,
    }
    assert len(keys) == 4
    assert llm.chat("x", response_format=Person).key == llm.chat("x", response_format=Person).key
    # Same module and name, another schema: another call (and another cache key).
    renamed = pydantic.create_model("Person", __module__=Person.__module__, name=(str, ...))
    assert renamed.__qualname__ == Person.__qualname__
    assert tokenize(ResponseFormat(renamed)) != tokenize(ResponseFormat(Person))
    assert llm.chat("x", response_format=renamed).key != llm.chat("x", response_format=Person).key
    assert call_key(llm, "chat", "x", {"response_format": ResponseFormat(renamed)}) != call_key(
        llm, "chat", "x", {"response_format": ResponseFormat(Person)}
    )
    fmt = ResponseFormat(Person)
    assert pickle.loads(pickle.dumps(fmt)) == fmt
    assert ResponseFormat.of(Person) == fmt and ResponseFormat.of({"type": "x"}) is None


def test_invalid_json_and_schema_violation_fail_with_the_raw_answer(llm_server, transport):
    llm = openai_llm(llm_server, transport)
    broken, wrong = feste.compute(
        llm.chat("Alice [[invalid_json]]", response_format=Person),
        llm.chat("Alice [[wrong_schema]]", response_format=Person),
        errors="return",
    )
    assert isinstance(broken, Failure) and isinstance(wrong, Failure)
    error = broken.exception
    assert isinstance(error, StructuredOutputError)
    expected_raw = invalid_json_text(json_answer_text(person("Alice").model_dump()))
    assert error.raw == expected_raw
    assert error.detail.startswith("not valid JSON (Expecting value")
    assert error.repairs == 0
    assert str(error).startswith(
        "[openai.chat model=gpt-4o-mini task='openai-chat-"
    ) and "the answer is not a valid Person: not valid JSON" in str(error)
    violation = wrong.exception
    assert isinstance(violation, StructuredOutputError)
    assert violation.raw == '{"unexpected": "Alice"}'
    assert "validation errors for Person" in violation.detail
    assert "name\n  Field required" in violation.detail
    assert "errors.pydantic.dev" not in violation.detail
    assert llm_server.stats()["requests"] == 2  # never retried


def test_repair_re_asks_with_the_validation_error(llm_server, transport):
    llm = openai_llm(llm_server, transport)
    co = cohere_llm(llm_server, transport)
    fixed = feste.compute(
        llm.chat("Alice [[wrong_schema]]", response_format=Person, repair_retries=1),
        co.chat("Bob [[invalid_json]]", response_format=Person, repair_retries=2),
    )
    assert fixed == (person("Alice"), person("Bob"))
    stats = llm_server.stats()
    assert stats["by_route"] == {CHAT: 2, COHERE_CHAT: 2}
    # The re-asking request ends with the correction; the server echoes the last user
    # message as the request's input.
    openai_inputs = [texts[0] for texts in stats["inputs"][CHAT]]
    assert openai_inputs[0] == "Alice [[wrong_schema]]"
    assert openai_inputs[1].startswith(
        "Your previous answer could not be used: 4 validation errors for Person\nname\n"
        "  Field required [type=missing"
    )
    assert openai_inputs[1].endswith(
        "Reply again with only the JSON value, matching the requested schema exactly."
    )
    cohere_inputs = [texts[0] for texts in stats["inputs"][COHERE_CHAT]]
    assert cohere_inputs[1].startswith("Your previous answer could not be used: not valid JSON")


def test_repairs_give_up_after_repair_retries(llm_server, transport):
    llm = openai_llm(llm_server, transport)
    with pytest.raises(StructuredOutputError) as raised:
        feste.compute(llm.chat("Zed", response_format=Picky, repair_retries=2))
    assert raised.value.repairs == 2
    assert "names are never accepted" in raised.value.detail
    assert raised.value.raw == '{"name": "Zed"}'
    assert llm_server.stats()["requests"] == 3  # the call and two repairs


def test_structured_answers_are_cached_as_answers_and_validated_again(llm_server, tmp_path):
    llm = openai_llm(llm_server, "http")
    values = [llm.chat(f"Who is {n}", response_format=Person) for n in ("Ann", "Ben")]
    repaired = llm.chat("Cy [[invalid_json]]", response_format=Person, repair_retries=1)
    store = str(tmp_path / "cache.sqlite")
    first = feste.compute(values, repaired, cache=store)
    assert llm_server.stats()["requests"] == 4
    llm_server.reset_stats()
    second = feste.compute(values, repaired, cache=store)
    assert second == first == ([person("Who is Ann"), person("Who is Ben")], person("Cy"))
    assert llm_server.stats()["requests"] == 0  # the bad answer and its repair: cached


def test_bad_structured_parameters_are_refused_where_the_call_is_written(llm_server):
    llm = openai_llm(llm_server, "http")
    with pytest.raises(ConfigurationError, match="response_format must be a Pydantic model"):
        llm.chat("x", response_format=str)
    with pytest.raises(ConfigurationError, match="repair_retries re-asks answers"):
        llm.chat("x", repair_retries=2)
    with pytest.raises(ConfigurationError, match="repair_retries must be an integer >= 0"):
        llm.chat("x", response_format=Person, repair_retries=-1)
    with pytest.raises(ConfigurationError, match="full must be True or False"):
        llm.chat("x", full="yes")
    with pytest.raises(ConfigurationError, match="tools must be a list of tool definitions"):
        llm.chat("x", tools="get_weather")
    for backend in (llm, cohere_llm(llm_server, "http")):
        with pytest.raises(ConfigurationError, match=r"does not take stream=: .*as_completed"):
            backend.chat("x", stream=True)
    assert llm_server.stats()["requests"] == 0


# -- n choices and whole answers -------------------------------------------------------


def test_n_choices_as_texts_values_and_results(llm_server, transport):
    llm = openai_llm(llm_server, transport)
    texts, people, result = feste.compute(
        llm.chat("hi", n=3),
        llm.chat("Ann", n=2, response_format=Person),
        llm.chat("hi", params=ChatParams(n=3, full=True)),
    )
    assert texts == [chat_text("gpt-4o-mini", "hi", i) for i in range(3)]
    assert people == [person("Ann"), person("Ann")]
    assert isinstance(result, ChatResult)
    assert [choice.text for choice in result.choices] == texts
    assert [choice.value for choice in result.choices] == texts
    assert result.text == texts[0]
    expected_tokens = sum(count_tokens(text) for text in texts)
    assert result.usage == Usage("gpt-4o-mini", count_tokens("hi"), expected_tokens)


def test_full_answers_from_both_providers(llm_server, transport):
    llm = openai_llm(llm_server, transport)
    co = cohere_llm(llm_server, transport)
    openai_result, cohere_result, structured = feste.compute(
        llm.chat("hello", full=True, logprobs=True, top_logprobs=2),
        co.chat("hello", full=True, logprobs=True),
        co.chat("Ann", full=True, response_format=Person),
    )
    answer = chat_text("gpt-4o-mini", "hello")
    assert openai_result.provider == "openai"
    assert openai_result.model == "gpt-4o-mini"
    assert openai_result.id.startswith("chatcmpl-")
    assert openai_result.finish_reason == "stop" and not openai_result.truncated
    assert openai_result.tool_calls == ()
    assert openai_result.usage == Usage("gpt-4o-mini", count_tokens("hello"), count_tokens(answer))
    tokens = token_chunks(answer)
    assert openai_result.logprobs == tuple(
        TokenLogprob(
            token,
            token_logprob(token, position),
            (
                (token, token_logprob(token, position)),
                (f"{token}#1", round(token_logprob(token, position) - 1, 4)),
            ),
        )
        for position, token in enumerate(tokens)
    )
    cohere_answer = chat_text("command-a-03-2025", "hello")
    assert cohere_result.provider == "cohere"
    assert cohere_result.id.startswith("chat-")
    assert cohere_result.choices == (
        Choice(
            cohere_answer,
            cohere_answer,
            "stop",
            (),
            tuple(
                TokenLogprob(token, token_logprob(token, position))
                for position, token in enumerate(token_chunks(cohere_answer))
            ),
        ),
    )
    assert structured.value == person("Ann")
    assert structured.text == json_answer_text(schema_instance(Person.model_json_schema(), "Ann"))
    # Whole answers travel between processes.
    assert pickle.loads(pickle.dumps(structured)) == structured


# -- tools ----------------------------------------------------------------------------

WEATHER = {
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


def test_tool_calls_come_back_typed(llm_server, transport):
    llm = openai_llm(llm_server, transport)
    co = cohere_llm(llm_server, transport)
    called, cohere_called, plain = feste.compute(
        llm.chat("Paris", tools=[WEATHER], tool_choice="required", full=True),
        co.chat("Paris", tools=[WEATHER], tool_choice="REQUIRED", full=True),
        llm.chat("Paris", tools=[WEATHER], tool_choice="none", full=True),
    )
    expected = tool_call("get_weather", WEATHER["function"]["parameters"], "Paris")
    for result in (called, cohere_called):
        assert result.finish_reason == "tool_calls"
        assert result.text is None
        assert result.tool_calls == (
            ToolCall(expected["id"], "get_weather", expected["arguments"]),
        )
        assert result.tool_calls[0].parsed_arguments() == {"city": "Paris", "days": 2}
    assert called.usage == Usage(
        "gpt-4o-mini", count_tokens("Paris"), count_tokens(expected["arguments"])
    )
    assert plain.tool_calls == () and plain.text == chat_text("gpt-4o-mini", "Paris")
    # The conversation goes on with the tool's result.
    follow_up = [
        {"role": "user", "content": "Paris"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": expected["id"],
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": expected["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": expected["id"], "content": "sunny"},
    ]
    (answer,) = feste.compute(llm.chat(follow_up, tools=[WEATHER]))
    assert answer == chat_text("gpt-4o-mini", "Paris")


# -- truncated answers ------------------------------------------------------------------


def test_a_truncated_answer_warns_once_per_run(llm_server, transport):
    llm = openai_llm(llm_server, transport)
    co = cohere_llm(llm_server, transport)
    cut = [llm.chat(f"question {i}", max_tokens=2) for i in range(3)]
    cut.append(co.chat("question", max_tokens=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answers = feste.compute(cut)[0]
        feste.compute(llm.chat("another", max_tokens=1))
        feste.compute(llm.chat("whole"))  # not cut: no warning
    assert answers == ["echo(gpt"] * 3 + ["echo(com"]
    shown = [w for w in caught if issubclass(w.category, TruncatedOutputWarning)]
    assert len(shown) == 2  # one per run that had cut answers
    assert "was cut at its token limit (finish_reason 'length')" in str(shown[0].message)
    assert "on_truncation='raise'" in str(shown[0].message)


def test_on_truncation_raise_and_ignore(llm_server, transport):
    llm = openai_llm(llm_server, transport)
    with context.set(on_truncation="raise"):
        with pytest.raises(TruncatedOutputError) as raised:
            feste.compute(llm.chat("hello", max_tokens=2))
        (result,) = feste.compute(llm.chat("whole", full=True))
    assert raised.value.text == "echo(gpt"
    assert "raise max_tokens" in str(raised.value)
    assert result.finish_reason == "stop"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with context.set(on_truncation="ignore"):
            result, cohere_result = feste.compute(
                llm.chat("hello", max_tokens=2, full=True),
                cohere_llm(llm_server, transport).chat("hello", max_tokens=2, full=True),
            )
    assert not [w for w in caught if issubclass(w.category, TruncatedOutputWarning)]
    assert result.truncated and result.finish_reason == "length"
    assert cohere_result.truncated and cohere_result.finish_reason == "length"  # MAX_TOKENS
