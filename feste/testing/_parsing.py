"""Request parsing: one pure function per endpoint.

Design: a parser takes the decoded JSON body and the current ``ServerConfig``
and either raises a 400 ``RequestError`` naming the faulty field, or returns a
``Parsed``: the input items (what ``stats()["inputs"]`` records), the input
tokens (what ``tokens_per_minute`` counts), the first fault marker among the
inputs, and a closure computing the deterministic answer. Parsers touch no
server state and never wait, so all of them can be tested, and reasoned
about, as plain functions. ``ENDPOINTS`` lists every route with its provider
and how to spoil its ``usage`` for the ``[[bad_usage]]`` marker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ._answers import Provider, bad_request
from ._chat import (
    ChatChoice,
    chat_choices,
    cohere_logprobs,
    cohere_options,
    openai_logprobs,
    openai_options,
)
from ._config import ServerConfig
from ._responses import (
    Trigger,
    completion_text,
    count_tokens,
    embedding,
    embedding_base64,
    find_trigger,
    quantize_embedding,
    rerank_order,
    truncate_to_tokens,
)

__all__ = ["ENDPOINTS", "MODEL_IDS", "Endpoint", "Parsed"]

OPENAI_CHAT_ROLES: Final = frozenset({"system", "user", "assistant", "tool", "developer"})
COHERE_CHAT_ROLES: Final = frozenset({"system", "user", "assistant", "tool"})
COHERE_INPUT_TYPES: Final = frozenset(
    {"search_document", "search_query", "classification", "clustering", "image"}
)
COHERE_EMBEDDING_TYPES: Final = ("float", "int8", "uint8", "binary", "ubinary", "base64")
MODEL_IDS: Final = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "text-embedding-3-large")

# What a [[bad_usage]] answer puts where a token count belongs.
BAD_COUNT: Final = "many"


@dataclass(slots=True)
class Parsed:
    """A validated request: its items and tokens, the fault marker they hold, how to answer."""

    texts: tuple[str, ...]  # the input items, as recorded in stats["inputs"]
    tokens: int  # input tokens, as counted by tokens_per_minute
    trigger: Trigger | None
    answer: Callable[[str], dict[str, Any]]  # request id -> JSON payload
    model: str = ""  # the model asked for ("" for routes without one)


def _body_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter (a non-empty string)", "model")
    return model


def _optional_positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"{name} must be a positive integer, got {value!r}", name)
    return value


def _reject_streaming(body: dict[str, Any]) -> None:
    if body.get("stream"):
        raise bad_request("streaming is not supported by the feste.testing server", "stream")


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
                raise bad_request(
                    f"{param}[{index}] must be an object with a 'type'", f"{param}[{index}]"
                )
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise bad_request(
                        f"{param}[{index}].text must be a string", f"{param}[{index}].text"
                    )
                pieces.append(text)
        return "".join(pieces)
    raise bad_request(f"{param} must be a string or a list of content parts", param)


@dataclass(frozen=True, slots=True)
class _Conversation:
    """What the chat answers read from the messages."""

    first_user: str  # the first user message ("" without one): the source of JSON answers
    last_user: str  # the last user message ("" without one): what the echo repeats
    prompt_tokens: int  # tokens of every message


def _chat_messages(body: dict[str, Any], roles: frozenset[str]) -> _Conversation:
    """The user messages that answers read, and the prompt tokens of all messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    user_texts: list[str] = []
    prompt_tokens = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{index}] must be an object", f"messages[{index}]")
        role = message.get("role")
        if role not in roles:
            raise bad_request(
                f"messages[{index}].role must be one of {', '.join(sorted(roles))}, got {role!r}",
                f"messages[{index}].role",
            )
        content = message.get("content")
        if content is None:
            # An assistant turn that only calls tools legitimately has no content.
            if role == "assistant" and message.get("tool_calls"):
                continue
            raise bad_request(f"messages[{index}] has no content", f"messages[{index}].content")
        text = _message_text(content, f"messages[{index}].content")
        prompt_tokens += count_tokens(text)
        if role == "user":
            user_texts.append(text)
    first = user_texts[0] if user_texts else ""
    last = user_texts[-1] if user_texts else ""
    return _Conversation(first, last, prompt_tokens)


def _string_list(value: Any, name: str, *, allow_empty_strings: bool) -> list[str]:
    """A str or list[str] field as a list (a bare string is one item)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise bad_request(f"{name} must be a string or a list of strings", name)
    if not items:
        raise bad_request(f"{name} must not be empty", name)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise bad_request(
                f"{name}[{index}] must be a string (token arrays are not supported)", name
            )
        if not item and not allow_empty_strings:
            raise bad_request(f"{name}[{index}] is an empty string", name)
    return items


def _check_batch(count: int, limit: int, name: str) -> None:
    if count > limit:
        raise bad_request(f"{name} has {count} items, over the limit of {limit} per request", name)


def _check_token_limit(texts: list[str], model: str, limit: int, name: str) -> int:
    """Total tokens of ``texts``; 400 naming the first item over ``limit``."""
    total = 0
    for index, text in enumerate(texts):
        tokens = count_tokens(text)
        if tokens > limit:
            raise bad_request(
                f"{name}[{index}] has {tokens} tokens, over the {limit}-token limit "
                f"of model {model}",
                name,
                "context_length_exceeded",
            )
        total += tokens
    return total


def _openai_chat(body: Any, config: ServerConfig) -> Parsed:
    body = _body_object(body)
    model = _model(body)
    _reject_streaming(body)
    conversation = _chat_messages(body, OPENAI_CHAT_ROLES)
    options = openai_options(body)

    def answer(request_id: str) -> dict[str, Any]:
        choices = chat_choices(model, conversation.first_user, conversation.last_user, options)
        completion_tokens = sum(choice.completion_tokens for choice in choices)
        prompt_tokens = conversation.prompt_tokens
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": index,
                    "message": _openai_message(choice),
                    "logprobs": (
                        openai_logprobs(choice, options.top_logprobs) if options.logprobs else None
                    ),
                    "finish_reason": choice.finish_reason,
                }
                for index, choice in enumerate(choices)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": None,
        }

    last_user = conversation.last_user
    return Parsed(
        (last_user,), conversation.prompt_tokens, find_trigger((last_user,)), answer, model
    )


def _openai_message(choice: ChatChoice) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
    if choice.tool_calls:
        message["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]},
            }
            for call in choice.tool_calls
        ]
    return message


def _openai_completions(body: Any, config: ServerConfig) -> Parsed:
    body = _body_object(body)
    model = _model(body)
    _reject_streaming(body)
    if "prompt" not in body:
        raise bad_request("you must provide a prompt", "prompt")
    prompts = _string_list(body["prompt"], "prompt", allow_empty_strings=True)
    limit = _optional_positive_int(body, "max_tokens")
    prompt_tokens = sum(count_tokens(prompt) for prompt in prompts)

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

    return Parsed(tuple(prompts), prompt_tokens, find_trigger(prompts), answer, model)


def _openai_embeddings(body: Any, config: ServerConfig) -> Parsed:
    body = _body_object(body)
    model = _model(body)
    if "input" not in body:
        raise bad_request("you must provide an input", "input")
    inputs = _string_list(body["input"], "input", allow_empty_strings=False)
    _check_batch(len(inputs), config.max_batch_openai_embed, "input")
    prompt_tokens = _check_token_limit(inputs, model, config.max_input_tokens, "input")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise bad_request(
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

    return Parsed(tuple(inputs), prompt_tokens, find_trigger(inputs), answer, model)


def _openai_models(body: Any, config: ServerConfig) -> Parsed:
    def answer(request_id: str) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "created": 0, "owned_by": "feste-testing"}
                for model in MODEL_IDS
            ],
        }

    return Parsed((), 0, None, answer)


_COHERE_FINISH_REASONS: Final = {
    "stop": "COMPLETE",
    "length": "MAX_TOKENS",
    "tool_calls": "TOOL_CALL",
}


def _cohere_chat(body: Any, config: ServerConfig) -> Parsed:
    body = _body_object(body)
    model = _model(body)
    _reject_streaming(body)
    conversation = _chat_messages(body, COHERE_CHAT_ROLES)
    options = cohere_options(body)

    def answer(request_id: str) -> dict[str, Any]:
        (choice,) = chat_choices(model, conversation.first_user, conversation.last_user, options)
        tokens = {
            "input_tokens": conversation.prompt_tokens,
            "output_tokens": choice.completion_tokens,
        }
        message: dict[str, Any] = {"role": "assistant"}
        if choice.tool_calls:
            names = ", ".join(call["name"] for call in choice.tool_calls)
            message["tool_plan"] = f"I will call {names}."
            message["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
                for call in choice.tool_calls
            ]
        else:
            message["content"] = [{"type": "text", "text": choice.text}]
        payload: dict[str, Any] = {
            "id": f"chat-{request_id}",
            "finish_reason": _COHERE_FINISH_REASONS[choice.finish_reason],
            "message": message,
            "usage": {"billed_units": dict(tokens), "tokens": tokens},
        }
        if options.logprobs:
            payload["logprobs"] = cohere_logprobs(choice)
        return payload

    last_user = conversation.last_user
    return Parsed(
        (last_user,), conversation.prompt_tokens, find_trigger((last_user,)), answer, model
    )


def _cohere_embed(body: Any, config: ServerConfig) -> Parsed:
    body = _body_object(body)
    model = _model(body)
    if body.get("texts") is None:
        raise bad_request("texts is required (images and inputs are not supported)", "texts")
    texts = body["texts"]
    if isinstance(texts, str):
        raise bad_request("texts must be a list of strings", "texts")
    texts = _string_list(texts, "texts", allow_empty_strings=False)
    _check_batch(len(texts), config.max_batch_cohere_embed, "texts")
    input_type = body.get("input_type")
    if input_type not in COHERE_INPUT_TYPES:
        raise bad_request(
            f"input_type is required and must be one of {', '.join(sorted(COHERE_INPUT_TYPES))}",
            "input_type",
        )
    embedding_types = body.get("embedding_types") or ["float"]
    if not isinstance(embedding_types, list) or any(
        kind not in COHERE_EMBEDDING_TYPES for kind in embedding_types
    ):
        raise bad_request(
            f"embedding_types must be a list of {', '.join(COHERE_EMBEDDING_TYPES)}",
            "embedding_types",
        )
    truncate = body.get("truncate") or "END"
    if truncate not in ("NONE", "START", "END"):
        raise bad_request("truncate must be one of NONE, START, END", "truncate")
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

    return Parsed(tuple(texts), input_tokens, find_trigger(texts), answer, model)


def _cohere_rerank(body: Any, config: ServerConfig) -> Parsed:
    body = _body_object(body)
    model = _model(body)  # required by the real API, though the scores ignore it
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise bad_request("query must be a non-empty string", "query")
    documents = body.get("documents")
    if isinstance(documents, str) or documents is None:
        raise bad_request("documents must be a list of strings", "documents")
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

    return Parsed(tuple(documents), 0, trigger, answer, model)


def _spoil_openai_usage(payload: dict[str, Any]) -> None:
    payload["usage"] = {"prompt_tokens": BAD_COUNT}


def _spoil_cohere_chat_usage(payload: dict[str, Any]) -> None:
    payload["usage"] = {"billed_units": {"input_tokens": BAD_COUNT}}


def _spoil_cohere_embed_usage(payload: dict[str, Any]) -> None:
    payload["meta"]["billed_units"] = {"input_tokens": BAD_COUNT}


def _spoil_cohere_rerank_usage(payload: dict[str, Any]) -> None:
    payload["meta"]["billed_units"] = {"search_units": BAD_COUNT}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _openai_billed(payload: dict[str, Any]) -> tuple[int, int, int]:
    usage = payload.get("usage") or {}
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")), 0


def _cohere_chat_billed(payload: dict[str, Any]) -> tuple[int, int, int]:
    billed = (payload.get("usage") or {}).get("billed_units") or {}
    return _count(billed.get("input_tokens")), _count(billed.get("output_tokens")), 0


def _cohere_meta_billed(payload: dict[str, Any]) -> tuple[int, int, int]:
    billed = (payload.get("meta") or {}).get("billed_units") or {}
    return _count(billed.get("input_tokens")), 0, _count(billed.get("search_units"))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One API route: how to parse its requests, and where its answers report usage."""

    route: str
    method: str
    provider: Provider
    parse: Callable[[Any, ServerConfig], Parsed]
    # Replaces the usage of an answer by a malformed one ([[bad_usage]]).
    spoil_usage: Callable[[dict[str, Any]], None]
    # (prompt tokens, completion tokens, searches) an answer bills, for stats["billed"].
    billed: Callable[[dict[str, Any]], tuple[int, int, int]]


ENDPOINTS: Final = (
    Endpoint(
        "/v1/chat/completions", "POST", "openai", _openai_chat, _spoil_openai_usage, _openai_billed
    ),
    Endpoint(
        "/v1/completions",
        "POST",
        "openai",
        _openai_completions,
        _spoil_openai_usage,
        _openai_billed,
    ),
    Endpoint(
        "/v1/embeddings", "POST", "openai", _openai_embeddings, _spoil_openai_usage, _openai_billed
    ),
    Endpoint("/v1/models", "GET", "openai", _openai_models, _spoil_openai_usage, _openai_billed),
    Endpoint(
        "/v2/chat", "POST", "cohere", _cohere_chat, _spoil_cohere_chat_usage, _cohere_chat_billed
    ),
    Endpoint(
        "/v2/embed", "POST", "cohere", _cohere_embed, _spoil_cohere_embed_usage, _cohere_meta_billed
    ),
    Endpoint(
        "/v2/rerank",
        "POST",
        "cohere",
        _cohere_rerank,
        _spoil_cohere_rerank_usage,
        _cohere_meta_billed,
    ),
)
