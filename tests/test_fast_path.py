"""Tests of the optional fast path: the JSON codecs of the ``http`` transport and the
``event_loop`` option. Both must behave like the pure-Python fallbacks they replace, so
every codec test runs against each codec installed here (the standard library's always),
and every loop test runs on asyncio's loop as well as on uvloop where installed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math

import pytest

import feste
from feste import context
from feste._loop import loop_kind, run_sync
from feste.backend import OpenAI
from feste.backend.transports._json import CODEC, JSONCodec, OrjsonCodec, available_codecs
from feste.errors import BadRequestError, ConfigurationError, OptionError
from feste.task import feste_task
from feste.testing import chat_text, embedding

try:
    import orjson
except ImportError:  # pragma: no cover - where the fast extra is not installed
    orjson = None
try:
    import uvloop
except ImportError:  # pragma: no cover - where the fast extra is not installed
    uvloop = None

CODECS = [codec.name for codec in available_codecs()]
LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])
KEY = "sk-fast-path-test-0123456789"
STDLIB = JSONCodec()


@pytest.fixture(params=CODECS)
def codec(request):
    return {codec.name: codec for codec in available_codecs()}[request.param]


@dataclasses.dataclass
class Point:
    x: int


class Tag(str):
    pass


def test_the_transport_uses_orjson_where_installed():
    assert CODEC.name == ("orjson" if orjson is not None else "json")
    assert "json" in CODECS


@pytest.mark.parametrize(
    "payload",
    [
        {"model": "m", "messages": [{"role": "user", "content": "héllo ✓ \U0001f600"}]},
        {"input": ["a", 'b\n\t"quoted"', "\\", "\u2028", "\x00\x1f"], "n": 3},
        {"temperature": 0.1, "top_p": 1e-05, "big": 1e20, "neg": -0.0, "ints": [0, -1, 2**62]},
        {"nested": {"deep": [[[{"k": [True, False]}]]]}, "empty": {}, "list": []},
        {"a": None, "content": "null"},  # null: the fallback writes exactly what json does
        {"logit_bias": {50256: -100, 1: 5}},  # int keys, as json writes them
        {"huge": 2**70},  # beyond 64 bits: the standard library encodes it
        {"tag": Tag("sub")},  # a subclass of str
    ],
)
def test_both_codecs_encode_the_same_json(codec, payload):
    body = codec.encode(payload)
    assert isinstance(body, bytes)
    assert json.loads(body) == json.loads(STDLIB.encode(payload))
    assert codec.decode(body) == json.loads(STDLIB.encode(payload))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_written_as_the_standard_library_writes_them(codec, value):
    body = codec.encode({"temperature": value})
    assert body == STDLIB.encode({"temperature": value})
    assert body in (
        b'{"temperature":NaN}',
        b'{"temperature":Infinity}',
        b'{"temperature":-Infinity}',
    )


@pytest.mark.parametrize(
    "payload", [{"p": Point(1)}, {"s": {1, 2}}, {"o": object()}, {(1, 2): "x"}]
)
def test_what_the_standard_library_cannot_encode_fails_alike(codec, payload):
    with pytest.raises(TypeError) as expected:
        STDLIB.encode(payload)
    with pytest.raises(TypeError) as raised:
        codec.encode(payload)
    assert str(raised.value) == str(expected.value)


def test_a_lone_surrogate_fails_alike(codec):
    with pytest.raises(UnicodeEncodeError):
        codec.encode({"content": "\ud800"})


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"a": [1, 2.5, "x\\u00e9"], "b": null}', {"a": [1, 2.5, "xé"], "b": None}),
        (b'{"v": NaN}', "nan"),  # the standard library accepts NaN
        (b'{"v": 1180591620717411303424}', {"v": 2**70}),
        (b'{"v": "\\ud800"}', {"v": "\ud800"}),
        ('{"v": "utf-16"}'.encode("utf-16"), {"v": "utf-16"}),
        (b'{"k": 1, "k": 2}', {"k": 2}),
    ],
)
def test_both_codecs_decode_what_the_standard_library_decodes(codec, content, expected):
    value = codec.decode(content)
    if expected == "nan":
        assert math.isnan(value["v"])
    else:
        assert value == expected == json.loads(content)


@pytest.mark.parametrize("content", [b"", b"not json", b'{"a": ', b"\xff\xfe\x00"])
def test_both_codecs_reject_what_is_not_json(codec, content):
    with pytest.raises(ValueError):
        codec.decode(content)


def test_deep_nesting_fails_like_the_standard_library(codec):
    content = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecursionError):
        codec.decode(content)


@pytest.mark.skipif(orjson is not None, reason="orjson is installed here")
def test_the_orjson_codec_says_how_to_install_it():  # pragma: no cover - without orjson
    with pytest.raises(ImportError, match=r"pip install 'feste\[fast\]'"):
        OrjsonCodec()


def test_an_unencodable_request_is_a_bad_request_naming_the_reason(llm_server):
    llm = OpenAI(base_url=llm_server.openai_base_url, api_key=KEY, model="gpt-4o-mini")
    expected = r"cannot be encoded as JSON: .*not JSON serializable"
    with pytest.raises(BadRequestError, match=expected):
        feste.compute(llm.chat("hi", logit_bias={"50256": object()}))
    assert llm_server.stats()["requests"] == 0


# -- the event loop ------------------------------------------------------------------


@feste_task
async def running_loop_module():
    return type(asyncio.get_running_loop()).__module__


def test_event_loop_option_is_checked():
    expected = "must be one of 'auto', 'uvloop', 'asyncio'"
    with pytest.raises(OptionError, match=expected), context.set(event_loop="trio"):
        pass  # pragma: no cover - never entered


@pytest.mark.parametrize("kind", LOOPS)
def test_compute_runs_on_the_loop_the_option_names(kind):
    with context.set(event_loop=kind):
        (module,) = feste.compute(running_loop_module())
    assert module.split(".")[0] == kind


def test_auto_uses_uvloop_where_installed():
    (module,) = feste.compute(running_loop_module())
    assert module.split(".")[0] == ("uvloop" if uvloop is not None else "asyncio")
    assert loop_kind("auto") == ("uvloop" if uvloop is not None else "asyncio")
    assert loop_kind("asyncio") == "asyncio"


def test_auto_respects_an_event_loop_policy_the_application_set():
    class ApplicationPolicy(asyncio.DefaultEventLoopPolicy):
        pass

    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(ApplicationPolicy())
    try:
        assert loop_kind("auto") == "asyncio"
        (module,) = feste.compute(running_loop_module())
    finally:
        asyncio.set_event_loop_policy(previous)
    assert module.split(".")[0] == "asyncio"


@pytest.mark.skipif(uvloop is not None, reason="uvloop is installed here")
def test_asking_for_uvloop_without_it_says_how_to_install_it():  # pragma: no cover
    with context.set(event_loop="uvloop"), pytest.raises(ConfigurationError, match="fast"):
        feste.compute(running_loop_module())


@pytest.mark.parametrize("kind", LOOPS)
def test_calls_give_the_same_answers_on_either_loop(llm_server, kind):
    llm = OpenAI(
        base_url=llm_server.openai_base_url, api_key=KEY, model="gpt-4o-mini", max_concurrency=4
    )
    embedder = OpenAI(
        base_url=llm_server.openai_base_url, api_key=KEY, model="text-embedding-3-small"
    )
    prompts = [f"question {index}" for index in range(12)]
    texts = [f"text {index}" for index in range(5)]
    with context.set(event_loop=kind):
        answers, vectors = feste.compute(
            [llm.chat(prompt) for prompt in prompts], [embedder.embed(text) for text in texts]
        )
    assert list(answers) == [chat_text("gpt-4o-mini", prompt) for prompt in prompts]
    assert [list(vector) for vector in vectors] == [
        embedding("text-embedding-3-small", text) for text in texts
    ]
    stats = llm_server.stats()
    assert stats["by_route"]["/v1/chat/completions"] == 12
    assert stats["max_in_flight"] <= 4


@pytest.mark.parametrize("kind", LOOPS)
def test_run_sync_keeps_one_loop_per_kind_per_thread(kind):
    async def current():
        return asyncio.get_running_loop()

    with context.set(event_loop=kind):
        first = run_sync(current())
        second = run_sync(current())
    assert first is second
    assert not first.is_closed()


# -- lanes: a call waiting to retry lets the next one start --------------------------


@feste_task
def follow_up(answer):
    return f"follow up on {len(answer)} characters"


def test_calls_go_out_while_another_waits_to_retry(llm_server):
    # One request at a time. The call on the longest chain goes first and is told to
    # wait 0.4 s (a 429 with Retry-After): it holds no admission while it waits, so the
    # four independent calls are sent in the meantime, and its retry comes after them.
    llm = OpenAI(
        base_url=llm_server.openai_base_url, api_key=KEY, model="gpt-4o-mini", max_concurrency=1
    )
    first = llm.chat("first [[retry_after:0.4]]")
    second = llm.chat(follow_up(first))
    others = [llm.chat(f"other {index}") for index in range(4)]
    (answers,) = feste.compute([first, second, *others])

    assert answers[0] == chat_text("gpt-4o-mini", "first [[retry_after:0.4]]")
    stats = llm_server.stats()
    sent = [texts[0] for texts in stats["inputs"]["/v1/chat/completions"]]
    assert sorted(sent[:4]) == [f"other {index}" for index in range(4)]
    assert sent[4:] == [
        "first [[retry_after:0.4]]",
        f"follow up on {len(answers[0])} characters",
    ]
    assert stats["requests"] == 7  # the 429 included
    assert stats["max_in_flight"] == 1
