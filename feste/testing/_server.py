"""A local aiohttp server that imitates the OpenAI and Cohere HTTP APIs.

Design: ``ApiSimulator`` owns all mutable state of one server (the current
``ServerConfig``, the statistics, the seeded fault generator and the
requests-per-minute window) and the aiohttp handlers. Every handler runs on the
server's single event loop, so the state needs no locks; code on other threads
reaches it only by scheduling a call onto that loop, which makes every
statistics snapshot consistent. A request walks one pipeline:

1. counted (``requests``, ``by_route``);
2. authenticated (401) when ``api_key`` is set;
3. admitted or refused by ``max_concurrency`` then ``requests_per_minute``
   (429 with retry headers, not counted in flight);
4. one number drawn from ``random.Random(seed)``, in arrival order, which
   decides the random fault (so a seed replays the same faults for the same
   sequence of requests);
5. body parsed and validated (400);
6. ``latency + latency_per_item * items`` slept;
7. a marker trigger in an input (``[[status:503]]``, ``[[hang]]``...) or else
   the random fault applied; otherwise the deterministic answer computed by
   ``feste.testing._responses``.

``TestServer`` runs a simulator either on a daemon thread with its own event
loop (``mode="thread"``, starts in milliseconds) or in a child process
``python -m feste.testing`` (``mode="process"``, so that a benchmark client
does not share the GIL with the server) and then talks to it over the control
routes ``/_stats``, ``/_stats/reset`` and ``/_config``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import typing
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal

from aiohttp import web

from ._responses import (
    Trigger,
    chat_text,
    completion_text,
    count_tokens,
    embedding,
    embedding_base64,
    find_trigger,
    quantize_embedding,
    rerank_order,
    truncate_to_tokens,
)

__all__ = [
    "LOOPBACK_HOSTS",
    "ApiSimulator",
    "ServerConfig",
    "TestServer",
    "add_knob_arguments",
    "check_loopback_host",
    "config_from_namespace",
    "serve",
]

LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "::1")

# Bounds on what the statistics keep per route, so a long benchmark cannot
# grow the server's memory without limit.
MAX_RECORDED_INPUTS: Final = 10_000
MAX_RECORDED_ITEM_COUNTS: Final = 1_000_000

RATE_WINDOW_SECONDS: Final = 60.0

OPENAI_CHAT_ROLES: Final = frozenset({"system", "user", "assistant", "tool", "developer"})
COHERE_CHAT_ROLES: Final = frozenset({"system", "user", "assistant", "tool"})
COHERE_INPUT_TYPES: Final = frozenset(
    {"search_document", "search_query", "classification", "clustering", "image"}
)
COHERE_EMBEDDING_TYPES: Final = ("float", "int8", "uint8", "binary", "ubinary", "base64")
MODEL_IDS: Final = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "text-embedding-3-large")

# What the 200 answer of a [[malformed]] trigger carries: valid UTF-8, invalid JSON.
MALFORMED_BODY: Final = b'{"id": "malformed", "choices": [{"index": 0, "message": '

Provider = Literal["openai", "cohere"]


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _knob(
    default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None
) -> Any:
    return field(default=default, metadata={"help": help, "minimum": minimum, "maximum": maximum})


@dataclass(frozen=True)
class ServerConfig:
    """Every behaviour knob of the simulated API. Immutable: change it with ``with_changes``.

    Values are validated on construction; a ``ValueError`` names the knob.
    """

    latency: float = _knob(0.0, "seconds added to every request", minimum=0.0)
    latency_per_item: float = _knob(
        0.0, "seconds added per input item (prompt, embedding input, document)", minimum=0.0
    )
    max_concurrency: int | None = _knob(
        None, "requests served at once; more are refused with 429", minimum=1
    )
    requests_per_minute: int | None = _knob(
        None, "accepted requests per sliding 60 s window; more are refused with 429", minimum=1
    )
    retry_after: float = _knob(
        0.05, "seconds announced by concurrency-limit and injected 429s", minimum=0.0
    )
    fault_429: float = _knob(0.0, "probability of an injected 429", minimum=0.0, maximum=1.0)
    fault_500: float = _knob(0.0, "probability of an injected 500", minimum=0.0, maximum=1.0)
    fault_hang: float = _knob(
        0.0, "probability of sleeping hang_seconds before answering", minimum=0.0, maximum=1.0
    )
    fault_drop: float = _knob(
        0.0, "probability of closing the connection without an answer", minimum=0.0, maximum=1.0
    )
    hang_seconds: float = _knob(30.0, "how long a hang fault sleeps", minimum=0.0)
    seed: int = _knob(0, "seed of the random fault sequence")
    api_key: str | None = _knob(None, "when set, require 'Authorization: Bearer <api_key>'")
    embedding_dim: int = _knob(8, "length of embedding vectors", minimum=1, maximum=65_536)
    max_input_tokens: int = _knob(8191, "token limit of one embedding input", minimum=1)
    max_batch_openai_embed: int = _knob(2048, "most inputs in one OpenAI embedding call", minimum=1)
    max_batch_cohere_embed: int = _knob(96, "most texts in one Cohere embed call", minimum=1)

    def __post_init__(self) -> None:
        hints = _knob_types()
        for knob in fields(self):
            value = getattr(self, knob.name)
            base, optional = hints[knob.name]
            object.__setattr__(self, knob.name, _checked_knob(knob, value, base, optional))
        fault_sum = self.fault_429 + self.fault_500 + self.fault_hang + self.fault_drop
        if fault_sum > 1.0 + 1e-9:
            raise ValueError(
                "fault_429 + fault_500 + fault_hang + fault_drop must be at most 1, "
                f"got {fault_sum:g}"
            )

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        return tuple(knob.name for knob in fields(cls))

    def with_changes(self, **changes: Any) -> ServerConfig:
        """A copy with ``changes`` applied; an unknown name raises ``ValueError`` listing all."""
        unknown = sorted(set(changes) - set(self.knob_names()))
        if unknown:
            raise ValueError(
                f"unknown server knob(s) {', '.join(unknown)}; "
                f"valid knobs: {', '.join(self.knob_names())}"
            )
        return dataclasses.replace(self, **changes)

    def as_dict(self, *, hide_api_key: bool = True) -> dict[str, Any]:
        values = {knob.name: getattr(self, knob.name) for knob in fields(self)}
        if hide_api_key and values["api_key"] is not None:
            values["api_key"] = "***"
        return values

    def changed_knobs(self) -> dict[str, Any]:
        """Knobs whose value differs from the default (api_key hidden)."""
        defaults = ServerConfig()
        return {
            name: shown
            for name, shown in self.as_dict().items()
            if getattr(self, name) != getattr(defaults, name)
        }

    def __repr__(self) -> str:
        knobs = ", ".join(f"{name}={value!r}" for name, value in self.as_dict().items())
        return f"ServerConfig({knobs})"


_KNOB_TYPES: dict[str, tuple[type, bool]] = {}


def _knob_types() -> dict[str, tuple[type, bool]]:
    """Knob name -> (base type, whether None is allowed), read from the annotations."""
    if not _KNOB_TYPES:
        for name, hint in typing.get_type_hints(ServerConfig).items():
            args = typing.get_args(hint)
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
                base = next(arg for arg in args if arg is not type(None))
                _KNOB_TYPES[name] = (base, True)
            else:
                _KNOB_TYPES[name] = (hint, False)
    return _KNOB_TYPES


def _checked_knob(knob: dataclasses.Field[Any], value: Any, base: type, optional: bool) -> Any:
    name = knob.name
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must not be None")
    if base is str:
        if not isinstance(value, str) or not value:
            # Never echo the value: the only string knob is the api key.
            raise ValueError(f"{name} must be a non-empty string or None")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if base is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{name} must be an integer, got {value!r}")
            value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    minimum = knob.metadata.get("minimum")
    maximum = knob.metadata.get("maximum")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:g}, got {value!r}")
    return value


def check_loopback_host(host: str) -> str:
    """The address to bind for ``host``; anything but a loopback name raises ``ValueError``.

    The simulator has no real authentication, so it must never be reachable
    from another machine.
    """
    if host not in LOOPBACK_HOSTS:
        raise ValueError(
            f"refusing to bind {host!r}: the test server only listens on loopback "
            f"({', '.join(LOOPBACK_HOSTS)})"
        )
    return "127.0.0.1" if host == "localhost" else host


def add_knob_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--kebab-case`` option per ``ServerConfig`` field, so the CLI never drifts."""
    for knob in fields(ServerConfig):
        base = _knob_types()[knob.name][0]
        default = knob.default
        parser.add_argument(
            "--" + knob.name.replace("_", "-"),
            dest=knob.name,
            type=base,
            default=argparse.SUPPRESS,
            metavar=base.__name__.upper(),
            help=f"{knob.metadata['help']} (default: {default})",
        )


def config_from_namespace(namespace: argparse.Namespace) -> ServerConfig:
    names = set(ServerConfig.knob_names())
    return ServerConfig(**{key: value for key, value in vars(namespace).items() if key in names})


def _config_to_argv(config: ServerConfig) -> list[str]:
    """Command-line options reproducing ``config``, except api_key (kept out of ``ps``)."""
    defaults = ServerConfig()
    argv: list[str] = []
    for knob in fields(config):
        value = getattr(config, knob.name)
        if knob.name == "api_key" or value == getattr(defaults, knob.name) or value is None:
            continue
        argv += ["--" + knob.name.replace("_", "-"), repr(value)]
    return argv


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

_FAULT_KEYS: Final = ("429", "500", "hang", "drop", "malformed", "limit_429", "401", "400")


class _Stats:
    """Counters since the last reset. Mutated only on the server's event loop.

    Snapshot keys (``TestServer.stats()``, ``GET /_stats``):

    - ``requests``: API requests received, whatever their fate (the control
      routes ``/_stats``, ``/stats`` and ``/_config`` are not counted);
    - ``by_route``: the same per route, e.g. ``{"/v1/embeddings": 3}``;
    - ``items``: input items of requests answered 200 with a valid body (chat
      counts 1; completions its prompts; embeddings its inputs; rerank its
      documents; ``/v1/models`` 0);
    - ``items_per_request``: per route, the item count of each such request,
      in arrival order (at most 1,000,000 per route);
    - ``max_in_flight`` / ``in_flight``: peak and current number of admitted
      requests being served (refused ones never count);
    - ``faults``: ``"429"`` and ``"500"`` injected (random or marker),
      ``"hang"``, ``"drop"``, ``"malformed"``, ``"limit_429"`` (concurrency or
      requests-per-minute refusals), ``"401"`` (authentication, or marker),
      ``"400"`` (validation, or marker), plus other marker statuses such as
      ``"503"`` when they occur;
    - ``status_counts``: every HTTP status sent, e.g. ``{"200": 5, "429": 15}``
      (a dropped connection sends none);
    - ``inputs``: per route, the item texts of each request counted in
      ``items``, in arrival order (at most 10,000 per route).

    The per-route dicts have a key for every route that received a request.
    """

    __slots__ = (
        "by_route",
        "faults",
        "input_texts",
        "item_counts",
        "items",
        "max_in_flight",
        "requests",
        "status_counts",
    )

    def __init__(self, in_flight: int = 0) -> None:
        self.requests = 0
        self.by_route: dict[str, int] = {}
        self.items = 0
        # (arrival sequence number, value): answers finish out of arrival
        # order, the snapshot sorts them back.
        self.item_counts: dict[str, list[tuple[int, int]]] = {}
        self.input_texts: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
        self.max_in_flight = in_flight
        self.faults: dict[str, int] = dict.fromkeys(_FAULT_KEYS, 0)
        self.status_counts: dict[str, int] = {}

    def arrived(self, route: str) -> None:
        self.requests += 1
        self.by_route[route] = self.by_route.get(route, 0) + 1
        if route not in self.item_counts:
            self.item_counts[route] = []
            self.input_texts[route] = []

    def answered(self, status: int) -> None:
        key = str(status)
        self.status_counts[key] = self.status_counts.get(key, 0) + 1

    def fault(self, key: str) -> None:
        self.faults[key] = self.faults.get(key, 0) + 1

    def succeeded(self, route: str, sequence: int, texts: tuple[str, ...]) -> None:
        self.items += len(texts)
        counts = self.item_counts[route]
        if len(counts) < MAX_RECORDED_ITEM_COUNTS:
            counts.append((sequence, len(texts)))
        inputs = self.input_texts[route]
        if len(inputs) < MAX_RECORDED_INPUTS:
            inputs.append((sequence, texts))

    def snapshot(self, in_flight: int) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_route": dict(self.by_route),
            "items": self.items,
            "items_per_request": {
                route: [count for _, count in sorted(entries)]
                for route, entries in self.item_counts.items()
            },
            "max_in_flight": self.max_in_flight,
            "in_flight": in_flight,
            "faults": dict(self.faults),
            "status_counts": dict(self.status_counts),
            "inputs": {
                route: [list(texts) for _, texts in sorted(entries, key=_first)]
                for route, entries in self.input_texts.items()
            },
        }


def _first(entry: tuple[int, Any]) -> int:
    return entry[0]


# ---------------------------------------------------------------------------
# Request parsing: one function per endpoint, each pure and loop-free
# ---------------------------------------------------------------------------


class _RequestError(Exception):
    """An error answer, formatted later in the provider's style."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


@dataclass(slots=True)
class _Parsed:
    """A validated request: its items, the fault marker they hold, and how to answer."""

    texts: tuple[str, ...]  # the input items, as recorded in stats["inputs"]
    trigger: Trigger | None
    answer: Callable[[str], dict[str, Any]]  # request id -> JSON payload


def _bad(message: str, param: str | None = None, code: str | None = None) -> _RequestError:
    return _RequestError(400, message, param=param, code=code)


def _body_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("you must provide a model parameter (a non-empty string)", "model")
    return model


def _optional_positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"{name} must be a positive integer, got {value!r}", name)
    return value


def _reject_streaming(body: dict[str, Any]) -> None:
    if body.get("stream"):
        raise _bad("streaming is not supported by the feste.testing server", "stream")


def _message_text(content: Any, param: str) -> str:
    """The text of a chat message content: a string or a list of parts.

    Text parts are concatenated without separator, so splitting a string into
    parts does not change the answer; non-text parts (images...) are skipped.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces: list[str] = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(f"{param}[{index}] must be an object with a 'type'", f"{param}[{index}]")
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise _bad(f"{param}[{index}].text must be a string", f"{param}[{index}].text")
                pieces.append(text)
        return "".join(pieces)
    raise _bad(f"{param} must be a string or a list of content parts", param)


def _chat_messages(body: dict[str, Any], roles: frozenset[str]) -> tuple[str, int]:
    """(content of the last user message or "", prompt tokens of all messages)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    last_user = ""
    prompt_tokens = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{index}] must be an object", f"messages[{index}]")
        role = message.get("role")
        if role not in roles:
            raise _bad(
                f"messages[{index}].role must be one of {', '.join(sorted(roles))}, got {role!r}",
                f"messages[{index}].role",
            )
        content = message.get("content")
        if content is None:
            # An assistant turn that only calls tools legitimately has no content.
            if role == "assistant" and message.get("tool_calls"):
                continue
            raise _bad(f"messages[{index}] has no content", f"messages[{index}].content")
        text = _message_text(content, f"messages[{index}].content")
        prompt_tokens += count_tokens(text)
        if role == "user":
            last_user = text
    return last_user, prompt_tokens


def _string_list(value: Any, name: str, *, allow_empty_strings: bool) -> list[str]:
    """A str or list[str] field as a list (a bare string is one item)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _bad(f"{name} must be a string or a list of strings", name)
    if not items:
        raise _bad(f"{name} must not be empty", name)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise _bad(f"{name}[{index}] must be a string (token arrays are not supported)", name)
        if not item and not allow_empty_strings:
            raise _bad(f"{name}[{index}] is an empty string", name)
    return items


def _check_batch(count: int, limit: int, name: str) -> None:
    if count > limit:
        raise _bad(f"{name} has {count} items, over the limit of {limit} per request", name)


def _check_token_limit(texts: list[str], model: str, limit: int, name: str) -> int:
    """Total tokens of ``texts``; 400 naming the first item over ``limit``."""
    total = 0
    for index, text in enumerate(texts):
        tokens = count_tokens(text)
        if tokens > limit:
            raise _bad(
                f"{name}[{index}] has {tokens} tokens, over the {limit}-token limit "
                f"of model {model}",
                name,
                "context_length_exceeded",
            )
        total += tokens
    return total


def _openai_chat(body: Any, config: ServerConfig) -> _Parsed:
    body = _body_object(body)
    model = _model(body)
    _reject_streaming(body)
    last_user, prompt_tokens = _chat_messages(body, OPENAI_CHAT_ROLES)
    limit = _optional_positive_int(body, "max_completion_tokens")
    if limit is None:
        limit = _optional_positive_int(body, "max_tokens")

    def answer(request_id: str) -> dict[str, Any]:
        text = chat_text(model, last_user)
        finish_reason = "stop"
        if limit is not None and count_tokens(text) > limit:
            text, finish_reason = truncate_to_tokens(text, limit), "length"
        completion_tokens = count_tokens(text)
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": None,
        }

    return _Parsed((last_user,), find_trigger((last_user,)), answer)


def _openai_completions(body: Any, config: ServerConfig) -> _Parsed:
    body = _body_object(body)
    model = _model(body)
    _reject_streaming(body)
    if "prompt" not in body:
        raise _bad("you must provide a prompt", "prompt")
    prompts = _string_list(body["prompt"], "prompt", allow_empty_strings=True)
    limit = _optional_positive_int(body, "max_tokens")

    def answer(request_id: str) -> dict[str, Any]:
        choices = []
        completion_tokens = 0
        for index, prompt in enumerate(prompts):
            text = completion_text(model, prompt)
            finish_reason = "stop"
            if limit is not None and count_tokens(text) > limit:
                text, finish_reason = truncate_to_tokens(text, limit), "length"
            completion_tokens += count_tokens(text)
            choices.append(
                {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
            )
        prompt_tokens = sum(count_tokens(prompt) for prompt in prompts)
        return {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    return _Parsed(tuple(prompts), find_trigger(prompts), answer)


def _openai_embeddings(body: Any, config: ServerConfig) -> _Parsed:
    body = _body_object(body)
    model = _model(body)
    if "input" not in body:
        raise _bad("you must provide an input", "input")
    inputs = _string_list(body["input"], "input", allow_empty_strings=False)
    _check_batch(len(inputs), config.max_batch_openai_embed, "input")
    prompt_tokens = _check_token_limit(inputs, model, config.max_input_tokens, "input")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise _bad(
            f"encoding_format must be 'float' or 'base64', got {encoding_format!r}",
            "encoding_format",
        )
    dim = _optional_positive_int(body, "dimensions") or config.embedding_dim

    def answer(request_id: str) -> dict[str, Any]:
        data = []
        for index, text in enumerate(inputs):
            vector = embedding(model, text, dim)
            encoded: Any = embedding_base64(vector) if encoding_format == "base64" else vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }

    return _Parsed(tuple(inputs), find_trigger(inputs), answer)


def _openai_models(body: Any, config: ServerConfig) -> _Parsed:
    def answer(request_id: str) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "created": 0, "owned_by": "feste-testing"}
                for model in MODEL_IDS
            ],
        }

    return _Parsed((), None, answer)


def _cohere_chat(body: Any, config: ServerConfig) -> _Parsed:
    body = _body_object(body)
    model = _model(body)
    _reject_streaming(body)
    last_user, input_tokens = _chat_messages(body, COHERE_CHAT_ROLES)
    limit = _optional_positive_int(body, "max_tokens")

    def answer(request_id: str) -> dict[str, Any]:
        text = chat_text(model, last_user)
        finish_reason = "COMPLETE"
        if limit is not None and count_tokens(text) > limit:
            text, finish_reason = truncate_to_tokens(text, limit), "MAX_TOKENS"
        output_tokens = count_tokens(text)
        tokens = {"input_tokens": input_tokens, "output_tokens": output_tokens}
        return {
            "id": f"chat-{request_id}",
            "finish_reason": finish_reason,
            "message": {"role": "assistant", "content": [{"type": "text", "text": text}]},
            "usage": {"billed_units": dict(tokens), "tokens": tokens},
        }

    return _Parsed((last_user,), find_trigger((last_user,)), answer)


def _cohere_embed(body: Any, config: ServerConfig) -> _Parsed:
    body = _body_object(body)
    model = _model(body)
    if body.get("texts") is None:
        raise _bad("texts is required (images and inputs are not supported)", "texts")
    texts = body["texts"]
    if isinstance(texts, str):
        raise _bad("texts must be a list of strings", "texts")
    texts = _string_list(texts, "texts", allow_empty_strings=False)
    _check_batch(len(texts), config.max_batch_cohere_embed, "texts")
    input_type = body.get("input_type")
    if input_type not in COHERE_INPUT_TYPES:
        raise _bad(
            f"input_type is required and must be one of {', '.join(sorted(COHERE_INPUT_TYPES))}",
            "input_type",
        )
    embedding_types = body.get("embedding_types") or ["float"]
    if not isinstance(embedding_types, list) or any(
        kind not in COHERE_EMBEDDING_TYPES for kind in embedding_types
    ):
        raise _bad(
            f"embedding_types must be a list of {', '.join(COHERE_EMBEDDING_TYPES)}",
            "embedding_types",
        )
    truncate = body.get("truncate") or "END"
    if truncate not in ("NONE", "START", "END"):
        raise _bad("truncate must be one of NONE, START, END", "truncate")
    if truncate == "NONE":
        input_tokens = _check_token_limit(texts, model, config.max_input_tokens, "texts")
    else:
        # Like the real API, over-long texts are truncated rather than refused.
        input_tokens = sum(min(count_tokens(text), config.max_input_tokens) for text in texts)
    dim = _optional_positive_int(body, "output_dimension") or config.embedding_dim

    def answer(request_id: str) -> dict[str, Any]:
        vectors = [embedding(model, text, dim) for text in texts]
        return {
            "id": f"embed-{request_id}",
            "response_type": "embeddings_by_type",
            "embeddings": {
                kind: [quantize_embedding(vector, kind) for vector in vectors]
                for kind in dict.fromkeys(embedding_types)
            },
            "texts": list(texts),
            "meta": {
                "api_version": {"version": "2"},
                "billed_units": {"input_tokens": input_tokens},
            },
        }

    return _Parsed(tuple(texts), find_trigger(texts), answer)


def _cohere_rerank(body: Any, config: ServerConfig) -> _Parsed:
    body = _body_object(body)
    _model(body)  # required by the real API, though the scores ignore it
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise _bad("query must be a non-empty string", "query")
    documents = body.get("documents")
    if isinstance(documents, str) or documents is None:
        raise _bad("documents must be a list of strings", "documents")
    documents = _string_list(documents, "documents", allow_empty_strings=True)
    top_n = _optional_positive_int(body, "top_n")
    trigger = find_trigger((query,), "query", indexed=False) or find_trigger(documents)

    def answer(request_id: str) -> dict[str, Any]:
        return {
            "id": f"rerank-{request_id}",
            "results": [
                {"index": index, "relevance_score": score}
                for index, score in rerank_order(query, documents, top_n)
            ],
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
        }

    return _Parsed(tuple(documents), trigger, answer)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    route: str
    method: str
    provider: Provider
    parse: Callable[[Any, ServerConfig], _Parsed]


ENDPOINTS: Final = (
    _Endpoint("/v1/chat/completions", "POST", "openai", _openai_chat),
    _Endpoint("/v1/completions", "POST", "openai", _openai_completions),
    _Endpoint("/v1/embeddings", "POST", "openai", _openai_embeddings),
    _Endpoint("/v1/models", "GET", "openai", _openai_models),
    _Endpoint("/v2/chat", "POST", "cohere", _cohere_chat),
    _Endpoint("/v2/embed", "POST", "cohere", _cohere_embed),
    _Endpoint("/v2/rerank", "POST", "cohere", _cohere_rerank),
)


# ---------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _retry_headers(seconds: float) -> dict[str, str]:
    """Both retry headers: the openai and cohere clients prefer ``retry-after-ms``.

    ``Retry-After`` is whole seconds when exact, else a decimal: the openai
    client parses floats, cohere's only integers or dates (it then falls back
    to ``retry-after-ms``).
    """
    milliseconds = max(0, math.ceil(seconds * 1000 - 1e-6))
    if milliseconds % 1000 == 0:
        in_seconds = str(milliseconds // 1000)
    else:
        in_seconds = f"{milliseconds / 1000:.3f}".rstrip("0")
    return {"retry-after-ms": str(milliseconds), "Retry-After": in_seconds}


def _error_payload(provider: Provider, error: _RequestError) -> dict[str, Any]:
    if provider == "cohere":
        return {"message": error.message}
    if error.status == 429:
        kind = "requests"
    elif error.status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return {
        "error": {
            "message": error.message,
            "type": kind,
            "param": error.param,
            "code": error.code,
        }
    }


def _bearer_token(request: web.BaseRequest) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


# ---------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------


class ApiSimulator:
    """State and handlers of one simulated API; use it only on its event loop.

    ``build_app()`` gives the aiohttp application. ``configure``, ``stats`` and
    ``reset_stats`` must be called on the loop thread (``TestServer`` arranges
    that) or while no loop is serving.
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        self._config = config or ServerConfig()
        self._rng = random.Random(self._config.seed)
        self._stats = _Stats()
        self._in_flight = 0
        # Never reset, so request ids stay unique across stats resets.
        self._sequence = 0
        self._rate_window: deque[float] = deque()
        self._handler_tasks: set[asyncio.Task[Any]] = set()

    @property
    def config(self) -> ServerConfig:
        return self._config

    def configure(self, **changes: Any) -> ServerConfig:
        new = self._config.with_changes(**changes)
        if "seed" in changes:
            self._rng = random.Random(new.seed)
        self._config = new
        return new

    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot(self._in_flight)

    def reset_stats(self) -> None:
        # Requests still being served keep counting in flight.
        self._stats = _Stats(in_flight=self._in_flight)

    def cancel_requests(self) -> None:
        """Cancel every request being served (hangs included): used on shutdown."""
        for task in list(self._handler_tasks):
            task.cancel()

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        for endpoint in ENDPOINTS:
            app.router.add_route(endpoint.method, endpoint.route, self._api_handler(endpoint))
        app.router.add_get("/_stats", self._get_stats)
        app.router.add_get("/stats", self._get_stats)
        app.router.add_post("/_stats/reset", self._post_reset)
        app.router.add_get("/_config", self._get_config)
        app.router.add_post("/_config", self._post_config)
        return app

    # -- control routes ----------------------------------------------------

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=_json_bytes(self.stats()), content_type="application/json")

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.Response(body=_json_bytes(self.stats()), content_type="application/json")

    async def _get_config(self, request: web.Request) -> web.Response:
        return web.Response(
            body=_json_bytes(self._config.as_dict()), content_type="application/json"
        )

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            changes = json.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of knob values")
            config = self.configure(**changes)
        except ValueError as exc:
            return web.Response(
                status=400, body=_json_bytes({"error": str(exc)}), content_type="application/json"
            )
        return web.Response(body=_json_bytes(config.as_dict()), content_type="application/json")

    # -- API routes --------------------------------------------------------

    def _api_handler(
        self, endpoint: _Endpoint
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(endpoint, request)

        return handle

    def _error(self, stats: _Stats, provider: Provider, error: _RequestError) -> web.Response:
        stats.answered(error.status)
        headers = None if error.retry_after is None else _retry_headers(error.retry_after)
        return web.Response(
            status=error.status,
            body=_json_bytes(_error_payload(provider, error)),
            content_type="application/json",
            headers=headers,
        )

    async def _handle(self, endpoint: _Endpoint, request: web.Request) -> web.StreamResponse:
        self._sequence += 1
        sequence = self._sequence
        # Captured once: a reset during this request must not receive its counts.
        stats = self._stats
        config = self._config
        stats.arrived(endpoint.route)

        if config.api_key is not None:
            token = _bearer_token(request)
            if token is None or not secrets.compare_digest(token.encode(), config.api_key.encode()):
                stats.fault("401")
                missing = token is None
                return self._error(
                    stats,
                    endpoint.provider,
                    _RequestError(
                        401,
                        "Missing bearer authentication in header"
                        if missing
                        else "Incorrect API key provided.",
                        code="invalid_api_key",
                    ),
                )

        # Admission: no await between the checks and the in-flight increment,
        # so concurrent arrivals cannot overshoot the limits.
        refusal = self._admit(config)
        if refusal is not None:
            stats.fault("limit_429")
            return self._error(stats, endpoint.provider, refusal)
        draw = self._rng.random()
        self._in_flight += 1
        if self._in_flight > stats.max_in_flight:
            stats.max_in_flight = self._in_flight
        task = asyncio.current_task()
        if task is not None:
            self._handler_tasks.add(task)
        try:
            return await self._serve(endpoint, request, stats, config, sequence, draw)
        finally:
            self._in_flight -= 1
            if task is not None:
                self._handler_tasks.discard(task)

    def _admit(self, config: ServerConfig) -> _RequestError | None:
        """The 429 refusing this request, or None after recording it in the rate window."""
        if config.max_concurrency is not None and self._in_flight >= config.max_concurrency:
            return _RequestError(
                429,
                f"Too many concurrent requests: the limit is {config.max_concurrency}",
                code="rate_limit_exceeded",
                retry_after=config.retry_after,
            )
        if config.requests_per_minute is not None:
            now = time.monotonic()
            window = self._rate_window
            while window and window[0] <= now - RATE_WINDOW_SECONDS:
                window.popleft()
            if len(window) >= config.requests_per_minute:
                return _RequestError(
                    429,
                    f"Rate limit reached: {config.requests_per_minute} requests per minute",
                    code="rate_limit_exceeded",
                    retry_after=window[0] + RATE_WINDOW_SECONDS - now,
                )
            window.append(now)
        return None

    async def _serve(
        self,
        endpoint: _Endpoint,
        request: web.Request,
        stats: _Stats,
        config: ServerConfig,
        sequence: int,
        draw: float,
    ) -> web.StreamResponse:
        provider = endpoint.provider
        try:
            body = json.loads(await request.read()) if endpoint.method == "POST" else None
        except ValueError:
            stats.fault("400")
            return self._error(stats, provider, _bad("the request body is not valid JSON"))
        try:
            parsed = endpoint.parse(body, config)
        except _RequestError as error:
            stats.fault("400")
            return self._error(stats, provider, error)

        delay = config.latency + config.latency_per_item * len(parsed.texts)
        if delay > 0:
            await asyncio.sleep(delay)

        fault = self._fault(parsed.trigger, draw, config)
        if isinstance(fault, _RequestError):
            stats.fault(str(fault.status))
            return self._error(stats, provider, fault)
        if fault == "hang":
            stats.fault("hang")
            # Then answer normally: a client with a shorter timeout gave up
            # already, and its disconnect cancelled this sleep.
            await asyncio.sleep(config.hang_seconds)
        elif fault == "drop":
            stats.fault("drop")
            return await _drop_connection(request)
        elif fault == "malformed":
            stats.fault("malformed")
            stats.answered(200)
            return web.Response(body=MALFORMED_BODY, content_type="application/json")

        payload = parsed.answer(str(sequence))
        stats.answered(200)
        stats.succeeded(endpoint.route, sequence, parsed.texts)
        return web.Response(body=_json_bytes(payload), content_type="application/json")

    @staticmethod
    def _fault(
        trigger: Trigger | None, draw: float, config: ServerConfig
    ) -> str | _RequestError | None:
        """The fault for this request: a marker trigger first, else the random draw."""
        if trigger is not None:
            if trigger.kind != "status":
                return trigger.kind
            status = trigger.status or 500
            return _RequestError(
                status,
                f"Injected error {status} triggered by {trigger.where}",
                code="invalid_api_key" if status == 401 else None,
                retry_after=config.retry_after if status in (429, 503) else None,
            )
        threshold = config.fault_429
        if draw < threshold:
            return _RequestError(
                429,
                "Injected rate limit (fault_429)",
                code="rate_limit_exceeded",
                retry_after=config.retry_after,
            )
        threshold += config.fault_500
        if draw < threshold:
            return _RequestError(500, "Injected server error (fault_500)")
        threshold += config.fault_hang
        if draw < threshold:
            return "hang"
        threshold += config.fault_drop
        if draw < threshold:
            return "drop"
        return None


async def _drop_connection(request: web.Request) -> web.StreamResponse:
    """Close the connection with no HTTP answer at all, like a crashed upstream."""
    transport = request.transport
    if transport is not None:
        transport.close()
    # Ending the handler as cancelled is how aiohttp itself treats a vanished
    # client: nothing is written and nothing is logged as an error.
    raise asyncio.CancelledError


# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------


def _bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == "posix":
            # A fixed port can be reused at once after a restart (TIME_WAIT).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def _start_site(simulator: ApiSimulator, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(
        simulator.build_app(),
        access_log=None,
        handle_signals=False,
        # A client that disconnects (e.g. on its timeout) cancels its request,
        # so hangs and long latencies do not outlive their client.
        handler_cancellation=True,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    return runner


async def _stop_site(simulator: ApiSimulator, runner: web.AppRunner) -> None:
    # Cancel first: otherwise cleanup waits up to shutdown_timeout for hangs.
    simulator.cancel_requests()
    await runner.cleanup()


async def serve(
    config: ServerConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or the task is cancelled); ``on_ready(url)`` once listening."""
    simulator = ApiSimulator(config)
    sock = _bind_socket(check_loopback_host(host), port)
    url = _url_of(sock)
    runner = await _start_site(simulator, sock)
    try:
        if on_ready is not None:
            on_ready(url)
        await (stop or asyncio.Event()).wait()
    finally:
        await _stop_site(simulator, runner)


class _LoopThread:
    """Runs one simulator on a daemon thread with its own event loop."""

    def __init__(self, simulator: ApiSimulator) -> None:
        self._simulator = simulator
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def start(self, host: str, port: int) -> str:
        sock = _bind_socket(host, port)  # before the loop exists: a busy port raises here
        url = _url_of(sock)
        self._loop = loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, sock, ready), name=f"feste-testing {url}", daemon=True
        )
        self._thread.start()
        ready.result(timeout=30)
        return url

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        ready: concurrent.futures.Future[None],
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            self._runner = loop.run_until_complete(_start_site(self._simulator, sock))
        except BaseException as exc:
            sock.close()
            loop.close()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the server loop and return its result."""
        loop = self._loop
        if loop is None or threading.current_thread() is self._thread:
            return function()
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(function())
            except BaseException as exc:
                result.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return result.result(timeout=30)

    async def _shutdown(self, runner: web.AppRunner) -> None:
        await _stop_site(self._simulator, runner)
        # This loop is ours alone: finish whatever connection tasks are still
        # unwinding, so closing it reports no destroyed pending tasks.
        current = asyncio.current_task()
        leftovers = [task for task in asyncio.all_tasks() if task is not current]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers, timeout=1.0)

    def stop(self) -> None:
        loop = self._loop
        if self._runner is not None and loop is not None:
            shutdown = asyncio.run_coroutine_threadsafe(self._shutdown(self._runner), loop)
            with contextlib.suppress(concurrent.futures.TimeoutError):
                shutdown.result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)


def _package_root() -> str:
    """The directory holding the ``feste`` package, for the child's PYTHONPATH."""
    return str(Path(__file__).resolve().parents[2])


class _ChildProcess:
    """Runs ``python -m feste.testing`` and talks to it over its control routes."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: typing.IO[bytes] | None = None
        self.url = ""
        # Never route control calls through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def start(self, config: ServerConfig, host: str, port: int, timeout: float = 60.0) -> str:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            path for path in (_package_root(), env.get("PYTHONPATH")) if path
        )
        command = [
            sys.executable,
            "-m",
            "feste.testing",
            "--host",
            host,
            "--port",
            str(port),
            "--exit-on-stdin-eof",
            *_config_to_argv(config),
        ]
        # stderr goes to a file: a pipe nobody reads could fill up and block
        # the server in the middle of a long benchmark.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env
        )
        try:
            line = self._first_line(timeout)
            if not line.startswith("http://"):
                raise RuntimeError(f"feste.testing server failed to start: {self._stderr_text()}")
            self.url = line
            if config.api_key is not None:
                # Sent after start, not on the command line, so it never shows in `ps`.
                self.request("POST", "/_config", {"api_key": config.api_key})
        except BaseException:
            self.stop()
            raise
        return line

    def _first_line(self, timeout: float) -> str:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return lines[0].decode().strip() if lines else ""

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()[-4000:]

    def request(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else _json_bytes(payload)
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            # The control routes answer a bad knob with 400 {"error": message}.
            try:
                detail = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError):
                detail = str(exc)
            raise ValueError(detail) from None

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdin, process.stdout, self._stderr):
            if stream is not None:
                stream.close()
        self._process = None
        self._stderr = None


class TestServer:
    """A running local imitation of the OpenAI and Cohere APIs.

    ``TestServer(**knobs)`` takes ``ServerConfig`` fields as keywords, plus
    ``host`` (loopback only), ``port`` (0: ephemeral) and ``mode``
    (``"thread"`` or ``"process"``). Use it as a context manager (sync or
    async) or call ``start()`` / ``stop()``; both are idempotent, and a stopped
    server can be started again (a thread-mode server keeps its statistics, a
    process-mode one starts fresh). After ``stop()``, ``stats()`` returns the
    last statistics.
    """

    __test__ = False  # a library class, not a pytest test class

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: Literal["thread", "process"] = "thread",
        config: ServerConfig | None = None,
        **knobs: Any,
    ) -> None:
        if mode not in ("thread", "process"):
            raise ValueError(f"mode must be 'thread' or 'process', got {mode!r}")
        self._host = check_loopback_host(host)
        self._port = port
        self._mode = mode
        self._config = (config or ServerConfig()).with_changes(**knobs)
        self._lifecycle = threading.Lock()
        self._simulator = ApiSimulator(self._config) if mode == "thread" else None
        self._loop_thread: _LoopThread | None = None
        self._child: _ChildProcess | None = None
        self._url: str | None = None
        self._last_stats: dict[str, Any] | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> TestServer:
        with self._lifecycle:
            if self._url is not None:
                return self
            if self._simulator is not None:
                loop_thread = _LoopThread(self._simulator)
                self._url = loop_thread.start(self._host, self._port)
                self._loop_thread = loop_thread
            else:
                child = _ChildProcess()
                self._url = child.start(self._config, self._host, self._port)
                self._child = child
                self._last_stats = None
        return self

    def stop(self) -> None:
        with self._lifecycle:
            if self._loop_thread is not None:
                self._loop_thread.stop()
                self._loop_thread = None
            if self._child is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._last_stats = self._child.request("GET", "/_stats")
                self._child.stop()
                self._child = None
            self._url = None

    def __enter__(self) -> TestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> TestServer:
        # Starting a process-mode server blocks for a while: keep the loop free.
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    # -- addresses ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._url is not None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the test server is not running; call start() first")
        return self._url

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def cohere_base_url(self) -> str:
        return self.url

    @property
    def mode(self) -> str:
        return self._mode

    # -- knobs and statistics ----------------------------------------------

    @property
    def config(self) -> ServerConfig:
        if self._simulator is not None:
            return self._simulator.config
        return self._config

    def configure(self, **changes: Any) -> ServerConfig:
        """Change knobs at runtime; unknown names or bad values raise ``ValueError``."""
        new = self.config.with_changes(**changes)  # validate before touching the server
        simulator = self._simulator
        if simulator is not None:
            if self._loop_thread is not None:
                new = self._loop_thread.call(lambda: simulator.configure(**changes))
            else:
                new = simulator.configure(**changes)
        elif self._child is not None:
            self._child.request("POST", "/_config", changes)
        self._config = new
        return new

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of the statistics; keys as documented on ``_Stats``."""
        simulator = self._simulator
        if simulator is not None:
            if self._loop_thread is not None:
                return typing.cast(dict[str, Any], self._loop_thread.call(simulator.stats))
            return simulator.stats()
        if self._child is not None:
            return typing.cast(dict[str, Any], self._child.request("GET", "/_stats"))
        return dict(self._last_stats or _Stats().snapshot(0))

    def reset_stats(self) -> None:
        simulator = self._simulator
        if simulator is not None:
            if self._loop_thread is not None:
                self._loop_thread.call(simulator.reset_stats)
            else:
                simulator.reset_stats()
        elif self._child is not None:
            self._child.request("POST", "/_stats/reset", {})
        else:
            self._last_stats = None

    def __repr__(self) -> str:
        knobs = "".join(
            f", {name}={value!r}" for name, value in self.config.changed_knobs().items()
        )
        where = self._url or "not running"
        return f"TestServer(url={where!r}, mode={self._mode!r}{knobs})"
