"""Provider-neutral request, response, usage and result types.

A backend turns a user call into a :class:`Request` (no I/O), a transport sends it and
returns a :class:`Response` (or raises a mapped :mod:`feste.errors` error), and the
backend parses that into a :class:`Parsed` result: one value per item of the request
plus the token :class:`Usage` the provider reported. Nothing here holds an API key.

A chat call asked for its whole answer (``full=True``) returns a :class:`ChatResult`:
every choice (:class:`Choice`: text, parsed value, finish reason, :class:`ToolCall`
list, :class:`TokenLogprob` list), the usage, the model and the provider's id for the
answer, the same for OpenAI and Cohere. Finish reasons are spelled the OpenAI way
(``"stop"``, ``"length"``, ``"tool_calls"``, ``"content_filter"``; Cohere's
``COMPLETE``/``STOP_SEQUENCE`` are ``"stop"``, ``MAX_TOKENS`` is ``"length"``,
``TOOL_CALL`` is ``"tool_calls"``, anything else is lowercased).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ChatResult",
    "Choice",
    "ItemFailure",
    "Parsed",
    "Request",
    "Response",
    "TokenLogprob",
    "ToolCall",
    "Usage",
]


@dataclass(frozen=True)
class Request:
    """One HTTP request to a provider, described without transport details.

    ``path`` is relative to the backend's base URL (``"/chat/completions"``); ``payload``
    is the JSON body, which is also the keyword arguments of the official client's
    method named by ``sdk_method`` (``"chat.completions.create"``). ``items`` is how many
    user calls the request serves (1, or the size of a batch).
    """

    provider: str
    method: str
    path: str
    payload: Mapping[str, Any]
    model: str | None = None
    items: int = 1
    estimated_tokens: int = 0
    sdk_method: str = ""
    #: Parse the whole answer (an answer record: every choice, usage, ids) rather than
    #: its text; set for calls whose value is finished after the cache (see
    #: ``Backend.finishes``).
    full_answer: bool = False

    def describe(self) -> str:
        model = f" model={self.model}" if self.model else ""
        plural = "s" if self.items != 1 else ""
        return f"{self.provider}.{self.method}{model} ({self.items} item{plural})"


@dataclass(frozen=True)
class Response:
    """A successful (2xx) answer: status, headers and the decoded JSON body."""

    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    """What a provider reports it billed for one request.

    ``cached_tokens`` are the part of ``prompt_tokens`` served from the provider's
    prompt cache (billed at the cached-input price); ``search_units`` are the searches
    a rerank request is billed for.
    """

    model: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    search_units: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        model = self.model if self.model == other.model else None
        return Usage(
            model,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
            self.search_units + other.search_units,
        )


@dataclass(frozen=True)
class Parsed:
    """A parsed response: one value per request item, in item order, and the usage.

    ``truncated`` is true when an answer was cut at its token limit (a chat choice
    whose finish reason is ``"length"``): the sender applies ``on_truncation``.
    """

    values: list[Any]
    usage: Usage | None = None
    truncated: bool = False


@dataclass(frozen=True)
class ToolCall:
    """A function the model asked to call: the call's id, the function's name and its
    arguments as the JSON text the model wrote (:meth:`parsed_arguments` decodes it)."""

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> Any:
        """The arguments decoded from JSON (``json.JSONDecodeError`` if they are not)."""
        return json.loads(self.arguments)


@dataclass(frozen=True)
class TokenLogprob:
    """One token of an answer and its log probability; ``top`` holds the most likely
    alternatives as ``(token, logprob)`` pairs when they were asked for (OpenAI's
    ``top_logprobs``). Cohere reports text chunks: each chunk is one entry, with the
    sum of its tokens' log probabilities."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Choice:
    """One answer of a chat call: its text, its value (the parsed structured value when
    ``response_format`` asked for one, else the text), why it ended, the tools it called
    and, when asked for (``logprobs=True``), its tokens' log probabilities."""

    text: str | None
    value: Any
    finish_reason: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class ChatResult:
    """The whole answer of a chat call made with ``full=True``.

    ``choices`` has one entry per answer (``n`` of them); ``text``, ``value``,
    ``finish_reason``, ``tool_calls`` and ``logprobs`` are those of the first.
    ``usage`` is what the provider billed for the request, ``model`` the model that
    answered, ``id`` the provider's id of the answer, ``provider`` ``"openai"`` or
    ``"cohere"``. ``truncated`` says whether any choice was cut at the token limit.
    """

    choices: tuple[Choice, ...]
    usage: Usage | None
    model: str | None
    id: str | None
    provider: str

    @property
    def text(self) -> str | None:
        return self.choices[0].text if self.choices else None

    @property
    def value(self) -> Any:
        return self.choices[0].value if self.choices else None

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self.choices[0].tool_calls if self.choices else ()

    @property
    def logprobs(self) -> tuple[TokenLogprob, ...] | None:
        return self.choices[0].logprobs if self.choices else None

    @property
    def truncated(self) -> bool:
        return any(choice.finish_reason == "length" for choice in self.choices)


@dataclass(frozen=True)
class ItemFailure:
    """Stands in a batch result for an item the provider rejected on its own."""

    error: BaseException

    def raise_error(self) -> None:
        raise self.error
