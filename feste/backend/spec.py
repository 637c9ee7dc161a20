"""What a backend method accepts and how its calls may be grouped into requests.

Design
------
A backend declares each public method once, as a :class:`MethodSpec`: the keyword
parameters it accepts, and for batchable methods how many items (first positional
arguments) one request may carry and how many estimated tokens. Everything that
groups calls into requests (the batching pass, runtime coalescing, ``explain()``, the
sender) reads these declarations through :func:`chunk_items`, so a plan made before a
run and the requests sent during it are cut by the same rule.

Typed parameter objects (``ChatParams``...) derive from :class:`CallParams`.
Nothing here does I/O or knows about graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["CallParams", "MethodSpec", "chunk_items", "estimate_item_tokens", "estimate_tokens"]


@dataclass(frozen=True)
class MethodSpec:
    """How one backend method may be sent.

    ``batch_size`` > 1 makes the method batchable: up to that many calls (their first
    positional arguments) go in one request. ``batch_tokens`` additionally caps the
    estimated tokens of one batched request. ``params`` lists the keyword parameters the
    method accepts (unknown names are refused before anything is sent). ``generates``
    says the method answers with generated text (billed as output tokens), which cost
    estimates made before a run must guess.
    """

    name: str
    params: frozenset[str] = field(default_factory=frozenset)
    batch_size: int = 1
    batch_tokens: int | None = None
    generates: bool = False

    @property
    def batchable(self) -> bool:
        return self.batch_size > 1


@dataclass(frozen=True)
class CallParams:
    """Base class of typed parameter objects (``ChatParams``...).

    Subclasses are frozen dataclasses whose fields all default to None; a field left at
    None is not sent. :meth:`as_dict` gives the fields that are set.
    """

    def as_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for param in fields(self):
            value = getattr(self, param.name)
            if value is not None:
                values[param.name] = value
        return values


def estimate_tokens(text: str) -> int:
    """A cheap token estimate (about four characters a token) for limits and batching."""
    return (len(text) + 3) // 4 if text else 0


def estimate_item_tokens(item: Any) -> int:
    """Estimated tokens of a call's item: a text, or a list of chat messages (a few
    tokens of framing each); 0 for anything else (a value not known yet)."""
    if isinstance(item, str):
        return estimate_tokens(item)
    if isinstance(item, (list, tuple)):
        total = 0
        for message in item:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                total += estimate_tokens(content) + 4
        return total
    return 0


def chunk_items(spec: MethodSpec, items: Sequence[Any]) -> list[list[Any]]:
    """Split ``items`` by the method's batch size and token budget, keeping order.

    Strings count their estimated tokens; any other item (a value not known yet when
    the batching pass plans a graph) counts as zero. An item over the budget on its
    own goes alone in its chunk (the provider then says whether it is too long).
    """
    chunks: list[list[Any]] = []
    current: list[Any] = []
    current_tokens = 0
    for item in items:
        tokens = estimate_tokens(item) if isinstance(item, str) else 0
        too_many = len(current) >= spec.batch_size
        too_big = spec.batch_tokens is not None and current_tokens + tokens > spec.batch_tokens
        if current and (too_many or too_big):
            chunks.append(current)
            current, current_tokens = [], 0
        current.append(item)
        current_tokens += tokens
    if current:
        chunks.append(current)
    return chunks
