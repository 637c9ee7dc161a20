"""Chat answers beyond plain text: ``n`` choices, JSON modes, tool calls, log probabilities.

Design: the chat parsers of ``_parsing`` read the conversation; this module reads the
provider's *options* (:func:`openai_options`, :func:`cohere_options`: a 400
``RequestError`` naming the bad field, like every parser) into one provider-neutral
:class:`ChatOptions`, and :func:`chat_choices` computes the answer's choices from the
conversation and the options, as pure functions. The parsers then write the choices
in their provider's shape.

Which answer a choice gets, in order:

1. a tool call, when tools are given and the tool choice asks for one: OpenAI
   ``"required"`` or a named function, Cohere ``"REQUIRED"`` (the first tool, or the
   named one); with ``"auto"`` or no tool choice, the first tool whose name occurs in
   the last user message (``"none"``/``"NONE"``: never);
2. a JSON answer in JSON mode (OpenAI ``json_object`` / ``json_schema``, Cohere
   ``json_object`` with or without ``json_schema``): an instance of the schema built
   from the source text (``_structured``), ``{"echo": source}`` without a schema;
   the answer markers ``[[invalid_json]]`` and ``[[wrong_schema]]`` apply here;
3. the echo text, ``chat_text(model, last user message, choice index)``.

Each text is cut to ``max_tokens`` (finish reason ``length``), every choice of an
``n`` > 1 request alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ._answers import bad_request
from ._responses import chat_text, count_tokens, truncate_to_tokens
from ._structured import (
    answer_marker,
    invalid_json_text,
    json_answer_text,
    schema_instance,
    source_text,
    token_chunks,
    token_logprob,
    tool_call,
    wrong_schema_value,
)

__all__ = [
    "ChatChoice",
    "ChatOptions",
    "Tool",
    "chat_choices",
    "cohere_logprobs",
    "cohere_options",
    "openai_logprobs",
    "openai_options",
]

MAX_CHOICES: Final = 128
MAX_TOP_LOGPROBS: Final = 20
_SCHEMA_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call: its name and the JSON schema of its arguments."""

    name: str
    parameters: Any


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """What a chat request asks for besides its messages, whatever the provider."""

    n: int = 1
    max_tokens: int | None = None
    json_mode: bool = False
    json_schema: Mapping[str, Any] | None = None
    tools: tuple[Tool, ...] = ()
    # "none", "auto", "required", or the name of the tool that must be called
    tool_choice: str = "auto"
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True, slots=True)
class ChatChoice:
    """One answer: its text (None for a tool call), tool calls, finish reason and tokens."""

    text: str | None
    finish_reason: str  # "stop", "length" or "tool_calls"
    tool_calls: tuple[dict[str, str], ...] = ()
    completion_tokens: int = 0
    tokens: tuple[str, ...] = field(default=())  # the text's tokens, for log probabilities


def _positive_int(body: Mapping[str, Any], name: str, limit: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"{name} must be a positive integer, got {value!r}", name)
    if limit is not None and value > limit:
        raise bad_request(f"{name} must be at most {limit}, got {value}", name)
    return value


def _checked_schema(schema: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(schema, Mapping):
        raise bad_request(f"{name} must be a JSON schema object", name)
    try:
        schema_instance(schema, "")
    except ValueError as error:
        raise bad_request(f"{name} is not a usable JSON schema: {error}", name) from None
    return schema


def _tools(body: Mapping[str, Any], *, parameters_required: bool) -> tuple[Tool, ...]:
    tools = body.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list) or not tools:
        raise bad_request("tools must be a non-empty list of tools", "tools")
    found = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise bad_request(f"{where}.type must be 'function'", f"{where}.type")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise bad_request(f"{where}.function.name must be a string", f"{where}.function.name")
        parameters = function.get("parameters")
        if parameters is None and parameters_required:
            raise bad_request(f"{where}.function.parameters is required", f"{where}.function")
        if parameters is not None:
            _checked_schema(parameters, f"{where}.function.parameters")
        found.append(Tool(function["name"], parameters))
    return tuple(found)


def openai_options(body: Mapping[str, Any]) -> ChatOptions:
    """The options of an OpenAI ``/chat/completions`` body (400 naming a bad field)."""
    n = _positive_int(body, "n", MAX_CHOICES) or 1
    limit = _positive_int(body, "max_completion_tokens")
    if limit is None:
        limit = _positive_int(body, "max_tokens")
    json_mode, schema = False, None
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, Mapping) else None
        if kind == "json_object":
            json_mode = True
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping):
                raise bad_request(
                    "response_format.json_schema must be an object", "response_format.json_schema"
                )
            name = spec.get("name")
            if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
                raise bad_request(
                    "response_format.json_schema.name must be 1 to 64 letters, digits, _ or -",
                    "response_format.json_schema.name",
                )
            json_mode = True
            schema = _checked_schema(spec.get("schema"), "response_format.json_schema.schema")
        elif kind != "text":
            raise bad_request(
                "response_format.type must be one of 'text', 'json_object', 'json_schema'",
                "response_format.type",
            )
    tools = _tools(body, parameters_required=False)
    choice = body.get("tool_choice")
    if choice is not None and not tools:
        raise bad_request("tool_choice is only allowed when tools are specified", "tool_choice")
    if choice is None:
        tool_choice = "auto"
    elif choice in ("none", "auto", "required"):
        tool_choice = choice
    elif isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        tool_choice = choice["function"].get("name")
        if tool_choice not in {tool.name for tool in tools}:
            raise bad_request(
                f"tool_choice names {tool_choice!r}, which is not among the tools",
                "tool_choice",
            )
    else:
        raise bad_request(
            "tool_choice must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad_request("logprobs must be a boolean", "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad_request(
                f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs"
            )
        if not logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    return ChatOptions(n, limit, json_mode, schema, tools, tool_choice, bool(logprobs), top or 0)


def cohere_options(body: Mapping[str, Any]) -> ChatOptions:
    """The options of a Cohere ``/v2/chat`` body (400 naming a bad field)."""
    limit = _positive_int(body, "max_tokens")
    json_mode, schema = False, None
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, Mapping) else None
        if kind == "json_object":
            json_mode = True
            if response_format.get("json_schema") is not None:
                schema = _checked_schema(
                    response_format["json_schema"], "response_format.json_schema"
                )
        elif kind != "text":
            raise bad_request(
                "response_format.type must be one of 'text', 'json_object'",
                "response_format.type",
            )
    tools = _tools(body, parameters_required=True)
    if json_mode and tools:
        raise bad_request("response_format cannot be combined with tools", "response_format")
    choice = body.get("tool_choice")
    if choice is not None and not tools:
        raise bad_request("tool_choice is only allowed when tools are specified", "tool_choice")
    if choice not in (None, "REQUIRED", "NONE"):
        raise bad_request("tool_choice must be 'REQUIRED' or 'NONE'", "tool_choice")
    tool_choice = {"REQUIRED": "required", "NONE": "none"}.get(choice or "", "auto")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad_request("logprobs must be a boolean", "logprobs")
    return ChatOptions(1, limit, json_mode, schema, tools, tool_choice, bool(logprobs), 0)


def _tool_to_call(options: ChatOptions, last_user: str) -> Tool | None:
    if not options.tools or options.tool_choice == "none":
        return None
    if options.tool_choice == "required":
        return options.tools[0]
    if options.tool_choice != "auto":
        return next(tool for tool in options.tools if tool.name == options.tool_choice)
    return next((tool for tool in options.tools if tool.name in last_user), None)


def _json_text(options: ChatOptions, source: str, marker: str | None) -> str:
    if marker == "wrong_schema":
        value: Any = wrong_schema_value(source)
    elif options.json_schema is not None:
        value = schema_instance(options.json_schema, source)
    else:
        value = {"echo": source}
    text = json_answer_text(value)
    return invalid_json_text(text) if marker == "invalid_json" else text


def chat_choices(
    model: str, first_user: str, last_user: str, options: ChatOptions
) -> list[ChatChoice]:
    """The ``options.n`` choices answering a conversation (rules in the module doc)."""
    source = source_text(first_user)
    tool = _tool_to_call(options, last_user)
    marker = answer_marker(last_user) if options.json_mode else None
    choices = []
    for index in range(options.n):
        if tool is not None:
            call = tool_call(tool.name, tool.parameters, source, index)
            tokens = count_tokens(call["arguments"])
            choices.append(ChatChoice(None, "tool_calls", (call,), tokens))
            continue
        if options.json_mode:
            text = _json_text(options, source, marker)
        else:
            text = chat_text(model, last_user, index)
        finish_reason = "stop"
        if options.max_tokens is not None and count_tokens(text) > options.max_tokens:
            text, finish_reason = truncate_to_tokens(text, options.max_tokens), "length"
        choices.append(
            ChatChoice(text, finish_reason, (), count_tokens(text), tuple(token_chunks(text)))
        )
    return choices


def openai_logprobs(choice: ChatChoice, top: int) -> dict[str, Any] | None:
    """The ``logprobs`` object of an OpenAI choice (None for a tool call)."""
    if choice.text is None:
        return None
    content = []
    for position, token in enumerate(choice.tokens):
        logprob = token_logprob(token, position)
        alternatives = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}] + [
            {
                "token": f"{token}#{rank}",
                "logprob": round(logprob - rank, 4),
                "bytes": list(f"{token}#{rank}".encode()),
            }
            for rank in range(1, top)
        ]
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": alternatives[:top],
            }
        )
    return {"content": content, "refusal": None}


def cohere_logprobs(choice: ChatChoice) -> list[dict[str, Any]]:
    """Cohere's ``logprobs`` list: one entry per token of the text."""
    entries = []
    for position, token in enumerate(choice.tokens):
        token_id = sum(token.encode()) % 50_000
        entries.append(
            {"text": token, "token_ids": [token_id], "logprobs": [token_logprob(token, position)]}
        )
    return entries
