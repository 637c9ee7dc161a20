"""Structured outputs and whole answers of chat calls: what the backends share.

Design
------
Three keyword parameters of ``chat`` change what a call *returns*, not only what it
sends; they are declared here and read by both backends:

* ``response_format=`` a Pydantic model class (any class with ``model_json_schema``
  and ``model_validate_json``) or ``dict``. It becomes a :class:`ResponseFormat` in
  the call's parameters, whose token is the class's module, name and JSON schema, so
  the graph key and the cache key change when the schema does. The request asks for
  the provider's JSON-schema mode (OpenAI ``json_schema`` with ``strict``, the schema
  made strict by :func:`strict_schema`; Cohere ``json_object`` with ``json_schema``),
  or plain JSON mode for ``dict``. The value is the validated model instance, or the
  decoded JSON object for ``dict``. A mapping (``{"type": "json_object"}``) is the
  provider's own format: it is sent as it is and the answer stays text.
* ``full=True``: the value is a :class:`~feste.backend.types.ChatResult`.
* ``repair_retries=N`` (with a ``response_format``): an answer that does not validate
  is re-asked up to N times, the conversation continued with the bad answer and the
  validation error (:func:`repair_messages`).

A call with any of them *finishes after the cache* (``Backend.finishes``): its
request asks for the whole answer (``Request.full_answer``), which ``parse_response``
writes as an *answer record*, plain JSON that the result cache can store
(:func:`answer_record`); :func:`finish_chat` turns a record into the call's value,
raising :class:`~feste.errors.StructuredOutputError` (with the raw text) for an answer
that is not the JSON asked for. The record, not the value, is what travels through
the sender and the cache, so a cached invalid answer is validated (and repaired)
again on a re-run, and a model class never has to be stored. The repair loop itself
belongs to the sender (:func:`feste._calls.run_call`), which owns sending.

Pydantic is not imported here: a model is recognized by its methods, and a
validation error is any ``ValueError`` its ``model_validate_json`` raises.
"""

from __future__ import annotations

import copy
import json
import re
import weakref
from collections.abc import Mapping
from typing import Any

from feste.backend.types import ChatResult, Choice, TokenLogprob, ToolCall, Usage
from feste.errors import ConfigurationError, StructuredOutputError

__all__ = [
    "LOCAL_CHAT_PARAMS",
    "ResponseFormat",
    "answer_record",
    "check_chat_params",
    "choice_record",
    "finish_chat",
    "finishes_chat",
    "repair_messages",
    "split_chat_params",
    "strict_schema",
    "usage_from_record",
]

#: Chat parameters that shape the value and are never sent to the provider.
LOCAL_CHAT_PARAMS = frozenset({"full", "repair_retries"})

_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]")
_MAX_DETAIL = 2000

REPAIR_PROMPT = (
    "Your previous answer could not be used: {detail}\n"
    "Reply again with only the JSON value, matching the requested schema exactly."
)


def _is_model(value: Any) -> bool:
    return (
        isinstance(value, type)
        and callable(getattr(value, "model_json_schema", None))
        and callable(getattr(value, "model_validate_json", None))
    )


class ResponseFormat:
    """The structured value a chat call asks for: a Pydantic model, or any JSON object.

    ``model`` is the model class, or None for ``dict`` (JSON mode, any object).
    Equal, hashable and tokenized by the model's module, name and JSON schema.
    """

    __slots__ = ("model",)

    def __init__(self, model: type | None) -> None:
        if model is not None and not _is_model(model):
            raise TypeError(f"{model!r} is not a Pydantic model class")
        self.model = model

    @classmethod
    def of(cls, value: Any) -> ResponseFormat | None:
        """``value`` as a ResponseFormat, or None when it is the provider's own mapping."""
        if isinstance(value, ResponseFormat):
            return value
        if value is dict:
            return cls(None)
        if _is_model(value):
            return cls(value)
        return None

    @property
    def name(self) -> str:
        """The schema's name as OpenAI accepts it (64 letters, digits, ``_`` or ``-``)."""
        if self.model is None:
            return "object"
        return _NAME_CHARACTERS.sub("_", self.model.__name__)[:64] or "schema"

    def schema(self) -> dict[str, Any] | None:
        """The model's JSON schema (None for ``dict``)."""
        if self.model is None:
            return None
        return dict(self.model.model_json_schema())  # type: ignore[attr-defined]

    def parse(self, text: str) -> Any:
        """The value of ``text``; ``ValueError`` says what is wrong with it."""
        try:
            decoded = json.loads(text)
        except ValueError as error:
            raise ValueError(f"not valid JSON ({error})") from None
        if self.model is None:
            if not isinstance(decoded, dict):
                raise ValueError(f"expected a JSON object, got {type(decoded).__name__}")
            return decoded
        try:
            return self.model.model_validate_json(text)  # type: ignore[attr-defined]
        except ValueError as error:
            raise ValueError(_validation_detail(error)) from None

    def _identity(self) -> tuple[Any, ...]:
        if self.model is None:
            return ("dict",)
        identity = _identities.get(self.model)
        if identity is None:
            # Building a schema takes a while, and every call of a pipeline asks.
            schema = json.dumps(self.schema(), sort_keys=True, default=str)
            identity = (self.model.__module__, self.model.__qualname__, schema)
            _identities[self.model] = identity
        return identity

    def __dask_tokenize__(self) -> Any:
        return ("feste.ResponseFormat", *self._identity())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResponseFormat) and other.model is self.model

    def __hash__(self) -> int:
        return hash(("feste.ResponseFormat", self.model))

    def __repr__(self) -> str:
        return f"ResponseFormat({'dict' if self.model is None else self.model.__qualname__})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ResponseFormat, (self.model,))


# model class -> its identity (module, name, schema); weak, so classes can go away.
_identities: weakref.WeakKeyDictionary[type, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def _validation_detail(error: ValueError) -> str:
    """A Pydantic validation error without its links to the documentation."""
    lines = [
        line
        for line in str(error).splitlines()
        if not line.strip().startswith("For further information visit")
    ]
    return "\n".join(lines)


def strict_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` as OpenAI's strict mode wants it (a copy; the input is not changed).

    Every object lists all its properties as required and allows no others, ``$ref``
    siblings are folded into the referenced schema, a single ``allOf`` is inlined, and
    ``"default": null`` is dropped. Optional fields of a model therefore have to be
    answered (with null when their type allows it).
    """
    root = copy.deepcopy(dict(schema))
    return _strict(root, root)


def _resolve(ref: str, root: Mapping[str, Any]) -> dict[str, Any]:
    target: Any = root
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return dict(target)


def _strict(node: Any, root: dict[str, Any]) -> Any:
    if not isinstance(node, dict):
        return node
    for defs_name in ("$defs", "definitions"):
        defs = node.get(defs_name)
        if isinstance(defs, dict):
            node[defs_name] = {name: _strict(sub, root) for name, sub in defs.items()}
    if node.get("type") == "object" and "additionalProperties" not in node:
        node["additionalProperties"] = False
    properties = node.get("properties")
    if isinstance(properties, dict):
        node["required"] = list(properties)
        node["properties"] = {name: _strict(sub, root) for name, sub in properties.items()}
    if isinstance(node.get("items"), dict):
        node["items"] = _strict(node["items"], root)
    for combinator in ("anyOf", "oneOf"):
        if isinstance(node.get(combinator), list):
            node[combinator] = [_strict(sub, root) for sub in node[combinator]]
    all_of = node.get("allOf")
    if isinstance(all_of, list):
        if len(all_of) == 1:
            node.pop("allOf")
            node.update(_strict(all_of[0], root))
        else:
            node["allOf"] = [_strict(sub, root) for sub in all_of]
    if "default" in node and node["default"] is None:
        node.pop("default")
    ref = node.get("$ref")
    if isinstance(ref, str) and len(node) > 1:
        merged = {**_resolve(ref, root), **node}
        merged.pop("$ref")
        return _strict(merged, root)
    return node


# -- parameters -------------------------------------------------------------------------


def check_chat_params(provider: str, params: dict[str, Any]) -> dict[str, Any]:
    """The chat parameters with ``response_format`` resolved, or a ConfigurationError
    naming the parameter and what it accepts. Called where the call is written."""

    def refuse(message: str) -> ConfigurationError:
        return ConfigurationError(message, backend=provider, method="chat")

    checked = dict(params)
    given = checked.get("response_format")
    if given is not None:
        resolved = ResponseFormat.of(given)
        if resolved is None and not isinstance(given, Mapping):
            raise refuse(
                "response_format must be a Pydantic model class (the answer is validated "
                "into it), dict (any JSON object) or the provider's own mapping such as "
                f"{{'type': 'json_object'}}, got {given!r}"
            )
        if resolved is not None:
            checked["response_format"] = resolved
    full = checked.get("full")
    if full is not None and not isinstance(full, bool):
        raise refuse(f"full must be True or False, got {full!r}")
    retries = checked.get("repair_retries")
    if retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise refuse(f"repair_retries must be an integer >= 0, got {retries!r}")
        if not isinstance(checked.get("response_format"), ResponseFormat):
            raise refuse(
                "repair_retries re-asks answers that do not validate: give "
                "response_format=<a Pydantic model class> or response_format=dict as well"
            )
    n = checked.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise refuse(f"n must be a positive integer, got {n!r}")
    tools = checked.get("tools")
    if tools is not None and (
        not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools)
    ):
        raise refuse(
            "tools must be a list of tool definitions like {'type': 'function', "
            "'function': {'name': ..., 'parameters': {...}}}"
        )
    if isinstance(tools, tuple):
        checked["tools"] = list(tools)
    return checked


def finishes_chat(params: Mapping[str, Any]) -> bool:
    """Whether a chat call with ``params`` is finished after the cache (module docstring)."""
    return ResponseFormat.of(params.get("response_format")) is not None or bool(params.get("full"))


def split_chat_params(
    params: Mapping[str, Any],
) -> tuple[dict[str, Any], ResponseFormat | None]:
    """``(parameters to send, the structured format asked for)``: the local parameters
    are left out and ``response_format`` is taken out when it is a ResponseFormat (the
    backend writes it in its provider's form)."""
    sent = {name: value for name, value in params.items() if name not in LOCAL_CHAT_PARAMS}
    resolved = ResponseFormat.of(sent.get("response_format"))
    if resolved is not None:
        del sent["response_format"]
    return sent, resolved


# -- answer records ---------------------------------------------------------------------


def choice_record(
    text: str | None,
    finish_reason: str | None,
    tool_calls: list[dict[str, str]] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One choice of an answer record (``tool_calls``: ``{"id", "name", "arguments"}``;
    ``logprobs``: ``{"token", "logprob", "top": [[token, logprob], ...]}``)."""
    return {
        "text": text,
        "finish_reason": finish_reason,
        "tool_calls": tool_calls or [],
        "logprobs": logprobs,
    }


def answer_record(
    provider: str,
    answer_id: str | None,
    model: str | None,
    usage: Usage | None,
    choices: list[dict[str, Any]],
) -> dict[str, Any]:
    """A whole chat answer as plain JSON (what the sender and the cache carry)."""
    return {
        "provider": provider,
        "id": answer_id,
        "model": model,
        "usage": None
        if usage is None
        else {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
        },
        "choices": choices,
    }


def usage_from_record(record: Mapping[str, Any]) -> Usage | None:
    usage = record.get("usage")
    if not isinstance(usage, Mapping):
        return None
    return Usage(
        record.get("model"),
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        int(usage.get("cached_tokens") or 0),
    )


def _choice(entry: Mapping[str, Any], value: Any) -> Choice:
    calls = tuple(
        ToolCall(call["id"], call["name"], call["arguments"])
        for call in entry.get("tool_calls") or ()
    )
    logprobs = entry.get("logprobs")
    tokens = None
    if logprobs is not None:
        tokens = tuple(
            TokenLogprob(
                item["token"],
                float(item["logprob"]),
                tuple((str(token), float(logprob)) for token, logprob in item.get("top") or ()),
            )
            for item in logprobs
        )
    return Choice(entry.get("text"), value, entry.get("finish_reason"), calls, tokens)


def finish_chat(provider: str, record: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
    """The value of a chat call from its answer record.

    With a ``response_format``, each choice's text is validated into its value (a
    :class:`~feste.errors.StructuredOutputError` holding the raw text otherwise). The
    value is a ChatResult with ``full=True``; else the choice's value, or a list of
    them when ``n`` > 1.
    """
    fmt = ResponseFormat.of(params.get("response_format"))
    entries = list(record.get("choices") or ())
    model = record.get("model") or params.get("model")
    choices = []
    for index, entry in enumerate(entries):
        text = entry.get("text")
        value = text
        if fmt is not None:
            value = _validated(provider, model, fmt, entry, index, len(entries))
        choices.append(_choice(entry, value))
    if params.get("full"):
        return ChatResult(
            tuple(choices), usage_from_record(record), model, record.get("id"), provider
        )
    values = [choice.value for choice in choices]
    wanted = params.get("n") or 1
    return values if wanted > 1 else (values[0] if values else None)


def _validated(
    provider: str,
    model: str | None,
    fmt: ResponseFormat,
    entry: Mapping[str, Any],
    index: int,
    count: int,
) -> Any:
    text = entry.get("text")
    if text is None:
        detail = "no text (the model called a tool instead)"
    else:
        try:
            return fmt.parse(text)
        except ValueError as error:
            detail = str(error)
    if entry.get("finish_reason") == "length":
        detail += "; the answer was cut at the token limit (raise max_tokens)"
    detail = detail[:_MAX_DETAIL]
    which = f"choice {index} of {count}: " if count > 1 else ""
    target = "JSON object" if fmt.model is None else fmt.model.__qualname__
    raise StructuredOutputError(
        f"{which}the answer is not a valid {target}: {detail} (the raw answer is in .raw; "
        "repair_retries=N re-asks with this error)",
        raw=text,
        detail=detail,
        backend=provider,
        method="chat",
        model=model,
    )


def repair_messages(messages: list[Any], error: StructuredOutputError) -> list[Any]:
    """The conversation that re-asks: the original messages, the bad answer, and a user
    message quoting what was wrong with it."""
    return [
        *messages,
        {"role": "assistant", "content": error.raw or "(no text)"},
        {"role": "user", "content": REPAIR_PROMPT.format(detail=error.detail)},
    ]
