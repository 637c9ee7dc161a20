"""Fault injection: which fault, if any, a request suffers, and the odd answers faults send.

Design: a marker inside an input (``find_trigger``) decides first, so a test
can poison exactly one item; otherwise one number drawn from
``random.Random(seed)`` per admitted request, in arrival order, picks a
random fault by the ``fault_*`` probabilities, so a seed replays the same
faults for the same sequence of requests. ``FaultInjector`` holds that
generator and the one piece of marker memory: the texts whose
``[[retry_after:S]]`` was already answered, so that a retry of the same text
succeeds. Faults that are not error statuses are returned as names (``"hang"``,
``"drop"``, ``"malformed"``, ``"bad_usage"``, ``"deep_json"``) for the handler
to act out with the helpers below.
"""

from __future__ import annotations

import asyncio
import random
from typing import Final

from aiohttp import web

from ._answers import RequestError, json_bytes
from ._config import ServerConfig
from ._responses import Trigger

__all__ = [
    "DEEP_JSON_DEPTH",
    "MALFORMED_BODY",
    "Fault",
    "FaultInjector",
    "deep_json_body",
    "drop_connection",
]

# What the 200 answer of a [[malformed]] trigger carries: valid UTF-8, invalid JSON.
MALFORMED_BODY: Final = b'{"id": "malformed", "choices": [{"index": 0, "message": '

# How deep the array in a [[deep_json]] answer nests: far past any recursive
# JSON parser's stack (Python's json fails with RecursionError near 1,000).
DEEP_JSON_DEPTH: Final = 100_000

# An error answer, the name of a non-status fault, or None for a normal answer.
Fault = RequestError | str | None


class FaultInjector:
    """The seeded fault sequence and marker memory of one server; use on its event loop."""

    __slots__ = ("_retried_texts", "_rng")

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._retried_texts: set[str] = set()

    def reseed(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def forget_markers(self) -> None:
        """Answer every ``[[retry_after:S]]`` text with its 429 once more."""
        self._retried_texts.clear()

    def draw(self) -> float:
        """The number deciding the random fault of the next admitted request."""
        return self._rng.random()

    def choose(self, trigger: Trigger | None, draw: float, config: ServerConfig) -> Fault:
        """The fault for a request: its marker first, else the random ``draw``."""
        if trigger is not None:
            if trigger.kind == "retry_after":
                if trigger.text not in self._retried_texts:
                    self._retried_texts.add(trigger.text)
                    seconds = trigger.seconds or 0.0
                    return RequestError(
                        429,
                        f"Injected rate limit triggered by {trigger.where}: "
                        f"retry after {seconds:g} s",
                        code="rate_limit_exceeded",
                        retry_after=seconds,
                    )
                # Answered once already: this is the retry, which goes through.
            elif trigger.kind == "status":
                status = trigger.status or 500
                return RequestError(
                    status,
                    f"Injected error {status} triggered by {trigger.where}",
                    code="invalid_api_key" if status == 401 else None,
                    retry_after=_announced_wait(status, config),
                )
            else:
                return trigger.kind
        threshold = config.fault_429
        if draw < threshold:
            return RequestError(
                429,
                "Injected rate limit (fault_429)",
                code="rate_limit_exceeded",
                retry_after=_injected_429_wait(config),
            )
        threshold += config.fault_500
        if draw < threshold:
            return RequestError(500, "Injected server error (fault_500)")
        threshold += config.fault_hang
        if draw < threshold:
            return "hang"
        threshold += config.fault_drop
        if draw < threshold:
            return "drop"
        return None


def _injected_429_wait(config: ServerConfig) -> float:
    if config.fault_429_retry_after is not None:
        return config.fault_429_retry_after
    return config.retry_after


def _announced_wait(status: int, config: ServerConfig) -> float | None:
    """The Retry-After of a ``[[status:NNN]]`` answer: only 429 and 503 carry one."""
    if status == 429:
        return _injected_429_wait(config)
    if status == 503:
        return config.retry_after
    return None


def deep_json_body(payload: dict[str, object]) -> bytes:
    """``payload`` as JSON with one more field, ``"deep"``: arrays nested DEEP_JSON_DEPTH levels.

    Valid JSON that a recursive parser cannot read, for error-mapping tests.
    """
    encoded = json_bytes(payload)
    # A JSON object ends with "}": reopen it to append the field.
    return encoded[:-1] + b',"deep":' + b"[" * DEEP_JSON_DEPTH + b"]" * DEEP_JSON_DEPTH + b"}"


async def drop_connection(request: web.Request) -> web.StreamResponse:
    """Close the connection with no HTTP answer at all, like a crashed upstream."""
    transport = request.transport
    if transport is not None:
        transport.close()
    # Ending the handler as cancelled is how aiohttp itself treats a vanished
    # client: nothing is written and nothing is logged as an error.
    raise asyncio.CancelledError
