"""What the simulated API counts, and the labels it counts credentials under.

Design: one ``Stats`` object holds every counter since the last reset. It is
mutated only on the server's event loop, and a request keeps the object it
arrived with, so a reset in the middle of a request leaves the new counters
untouched. Answers finish out of arrival order; per-request records carry the
arrival sequence number and the snapshot sorts them back, so every list in a
snapshot is in arrival order. Credentials are counted under ``key_label``, a
short digest that identifies a key without revealing it.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Final

__all__ = [
    "FAULT_KEYS",
    "MAX_RECORDED_INPUTS",
    "MAX_RECORDED_ITEM_COUNTS",
    "NO_KEY_LABEL",
    "Stats",
    "key_label",
]

# Bounds on what the statistics keep per route, so a long benchmark cannot
# grow the server's memory without limit.
MAX_RECORDED_INPUTS: Final = 10_000
MAX_RECORDED_ITEM_COUNTS: Final = 1_000_000

FAULT_KEYS: Final = ("429", "500", "hang", "drop", "malformed", "limit_429", "401", "400")

# The label of requests that carry no bearer token at all.
NO_KEY_LABEL: Final = "(no key)"

# 12 hex digits (48 bits) tell test keys apart and reveal nothing of a real one.
_LABEL_DIGITS: Final = 12


def key_label(key: str | None) -> str:
    """The label under which ``stats()["by_api_key"]`` counts requests made with ``key``.

    ``"sha256:"`` followed by the first 12 hex digits of the SHA-256 of the key
    (UTF-8), e.g. ``key_label("sk-a") == "sha256:" + sha256(b"sk-a").hexdigest()[:12]``;
    ``key_label(None)`` is ``"(no key)"``, the label of requests without a bearer token.
    """
    if key is None:
        return NO_KEY_LABEL
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:_LABEL_DIGITS]


class Stats:
    """Counters since the last reset. Mutated only on the server's event loop.

    Snapshot keys (``TestServer.stats()``, ``GET /_stats``):

    - ``requests``: API requests received, whatever their fate (the control
      routes ``/_stats``, ``/stats`` and ``/_config`` are not counted);
    - ``by_route``: the same per route, e.g. ``{"/v1/embeddings": 3}``;
    - ``first_arrival``: per route, when its first request arrived, in seconds
      since the statistics were reset (or the server started), e.g.
      ``{"/v1/embeddings": 0.412}``: when a client's first request of a kind left;
    - ``by_api_key``: the same per credential: ``key_label(token)`` of the
      ``Authorization: Bearer <token>`` header (which both the OpenAI and the
      Cohere clients send), ``"(no key)"`` for requests without one; counted
      on arrival, so refused requests (401, 429...) count too and the values
      sum to ``requests``;
    - ``items``: input items of requests answered 200 with a valid body (chat
      counts 1; completions its prompts; embeddings its inputs; rerank its
      documents; ``/v1/models`` 0);
    - ``items_per_request``: per route, the item count of each such request,
      in arrival order (at most 1,000,000 per route);
    - ``max_in_flight`` / ``in_flight``: peak and current number of admitted
      requests being served (requests refused by ``max_concurrency`` or
      ``requests_per_minute`` never count; a ``tokens_per_minute`` refusal
      is decided once the body is read, so it counted while being read);
    - ``faults``: ``"429"`` and ``"500"`` injected (random or marker,
      ``[[retry_after:S]]`` included), ``"hang"``, ``"drop"``, ``"malformed"``,
      ``"limit_429"`` (concurrency, requests-per-minute or tokens-per-minute
      refusals), ``"401"`` (authentication, or marker), ``"400"``
      (validation, or marker), plus, when they occur, other marker statuses
      such as ``"503"`` and ``"bad_usage"`` / ``"deep_json"``;
    - ``status_counts``: every HTTP status sent, e.g. ``{"200": 5, "429": 15}``
      (a dropped connection sends none);
    - ``billed``: per model, what the answers counted in ``items`` reported:
      ``{"requests", "prompt_tokens", "completion_tokens", "search_units"}``
      (Cohere's billed units), so a test or a benchmark can price a run
      whatever client made it;
    - ``inputs``: per route, the item texts of each request counted in
      ``items``, in ARRIVAL order (the order in which the server received the
      requests, not the order it answered them; at most 10,000 per route). A
      request refused and then retried appears once, at its successful
      attempt's arrival.

    The per-route dicts have a key for every route that received a request.
    """

    __slots__ = (
        "billed_by_model",
        "by_api_key",
        "by_route",
        "faults",
        "first_arrival",
        "input_texts",
        "item_counts",
        "items",
        "max_in_flight",
        "requests",
        "started",
        "status_counts",
    )

    def __init__(self, in_flight: int = 0) -> None:
        self.started = time.monotonic()
        self.requests = 0
        self.by_route: dict[str, int] = {}
        self.first_arrival: dict[str, float] = {}
        self.by_api_key: dict[str, int] = {}
        self.items = 0
        # (arrival sequence number, value): answers finish out of arrival
        # order, the snapshot sorts them back.
        self.item_counts: dict[str, list[tuple[int, int]]] = {}
        self.input_texts: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
        self.max_in_flight = in_flight
        self.faults: dict[str, int] = dict.fromkeys(FAULT_KEYS, 0)
        self.status_counts: dict[str, int] = {}
        self.billed_by_model: dict[str, dict[str, int]] = {}

    def arrived(self, route: str, api_key_label: str) -> None:
        self.requests += 1
        self.by_route[route] = self.by_route.get(route, 0) + 1
        self.by_api_key[api_key_label] = self.by_api_key.get(api_key_label, 0) + 1
        if route not in self.first_arrival:
            self.first_arrival[route] = round(time.monotonic() - self.started, 6)
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

    def billed(self, model: str, prompt: int, completion: int, searches: int) -> None:
        entry = self.billed_by_model.setdefault(
            model,
            {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "search_units": 0},
        )
        entry["requests"] += 1
        entry["prompt_tokens"] += prompt
        entry["completion_tokens"] += completion
        entry["search_units"] += searches

    def snapshot(self, in_flight: int) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_route": dict(self.by_route),
            "first_arrival": dict(self.first_arrival),
            "by_api_key": dict(self.by_api_key),
            "items": self.items,
            "items_per_request": {
                route: [count for _, count in sorted(entries)]
                for route, entries in self.item_counts.items()
            },
            "max_in_flight": self.max_in_flight,
            "in_flight": in_flight,
            "faults": dict(self.faults),
            "status_counts": dict(self.status_counts),
            "billed": {model: dict(entry) for model, entry in self.billed_by_model.items()},
            "inputs": {
                route: [list(texts) for _, texts in sorted(entries, key=_sequence_of)]
                for route, entries in self.input_texts.items()
            },
        }


def _sequence_of(entry: tuple[int, Any]) -> int:
    return entry[0]
