"""Provider-neutral request, response and usage types.

A backend turns a user call into a :class:`Request` (no I/O), a transport sends it and
returns a :class:`Response` (or raises a mapped :mod:`feste.errors` error), and the
backend parses that into a :class:`Parsed` result: one value per item of the request
plus the token :class:`Usage` the provider reported. Nothing here holds an API key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ItemFailure", "Parsed", "Request", "Response", "Usage"]


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
    """Tokens a provider reports for one request."""

    model: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        model = self.model if self.model == other.model else None
        return Usage(
            model,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


@dataclass(frozen=True)
class Parsed:
    """A parsed response: one value per request item, in item order, and the usage."""

    values: list[Any]
    usage: Usage | None = None


@dataclass(frozen=True)
class ItemFailure:
    """Stands in a batch result for an item the provider rejected on its own."""

    error: BaseException

    def raise_error(self) -> None:
        raise self.error
