"""Admission limits of the simulated API and OpenAI's rate-limit headers.

Design: ``max_concurrency`` compares the in-flight count; ``requests_per_minute``
and ``tokens_per_minute`` each keep a ``SlidingWindow`` of what was accepted
in the last 60 s. Checks and the recording of an accepted request happen with
no ``await`` in between, on the server's single event loop, so concurrent
arrivals cannot overshoot a limit. The request limits are decided on arrival,
before the body is read; the token limit needs the body, so it is decided
once the request is parsed (a request refused for its tokens still used its
requests-per-minute slot, as with OpenAI, where refused requests count).
``RateLimits.headers`` reports the windows as OpenAI's ``x-ratelimit-*``
headers: ``limit`` is the knob, ``remaining`` what the window still admits,
``reset`` the time until the window is empty again (OpenAI: "until the rate
limit resets to its initial state"), as a Go-style duration such as ``"20ms"``,
``"1s"``, ``"59.5s"`` or ``"6m0s"``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Final

from ._answers import RequestError
from ._config import ServerConfig

__all__ = ["RATE_WINDOW_SECONDS", "RateLimits", "SlidingWindow", "go_duration"]

RATE_WINDOW_SECONDS: Final = 60.0


def go_duration(seconds: float) -> str:
    """``seconds`` as OpenAI writes durations (Go's format, to the millisecond).

    ``0`` -> ``"0s"``, ``0.02`` -> ``"20ms"``, ``1`` -> ``"1s"``, ``8.64`` ->
    ``"8.64s"``, ``360`` -> ``"6m0s"``, ``3725.5`` -> ``"1h2m5.5s"``. Rounded up
    to the millisecond, so waiting that long is always enough.
    """
    milliseconds = max(0, math.ceil(seconds * 1000 - 1e-6))
    if milliseconds == 0:
        return "0s"
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole_seconds, fraction = divmod(rest, 1000)
    text = str(whole_seconds)
    if fraction:
        text += f".{fraction:03d}".rstrip("0")
    text += "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


class SlidingWindow:
    """Amounts accepted during the last ``RATE_WINDOW_SECONDS``, with their running total."""

    __slots__ = ("_entries", "total")

    def __init__(self) -> None:
        self._entries: deque[tuple[float, int]] = deque()
        self.total = 0

    def prune(self, now: float) -> None:
        entries = self._entries
        while entries and entries[0][0] <= now - RATE_WINDOW_SECONDS:
            _, amount = entries.popleft()
            self.total -= amount

    def add(self, now: float, amount: int) -> None:
        self._entries.append((now, amount))
        self.total += amount

    def wait_for_room(self, now: float, amount: int, limit: int) -> float:
        """Seconds until ``amount`` more fits under ``limit`` (0 if it fits now).

        Call after ``prune(now)``; ``amount`` must be at most ``limit``.
        """
        excess = self.total + amount - limit
        if excess <= 0:
            return 0.0
        freed = 0
        for accepted_at, accepted in self._entries:
            freed += accepted
            if freed >= excess:
                return accepted_at + RATE_WINDOW_SECONDS - now
        return RATE_WINDOW_SECONDS  # unreachable while amount <= limit

    def empty_in(self, now: float) -> float:
        """Seconds until every entry has left the window (0 when empty)."""
        if not self._entries:
            return 0.0
        return self._entries[-1][0] + RATE_WINDOW_SECONDS - now


class RateLimits:
    """The requests and tokens windows of one server. Use only on its event loop."""

    __slots__ = ("requests", "tokens")

    def __init__(self) -> None:
        self.requests = SlidingWindow()
        self.tokens = SlidingWindow()

    def admit_request(self, config: ServerConfig, in_flight: int) -> RequestError | None:
        """The 429 refusing a new request, or None after recording it in the requests window."""
        if config.max_concurrency is not None and in_flight >= config.max_concurrency:
            return RequestError(
                429,
                f"Too many concurrent requests: the limit is {config.max_concurrency}",
                code="rate_limit_exceeded",
                retry_after=config.retry_after,
            )
        limit = config.requests_per_minute
        if limit is not None:
            now = time.monotonic()
            self.requests.prune(now)
            wait = self.requests.wait_for_room(now, 1, limit)
            if wait > 0:
                return RequestError(
                    429,
                    f"Rate limit reached: {limit} requests per minute",
                    code="rate_limit_exceeded",
                    retry_after=wait,
                )
            self.requests.add(now, 1)
        return None

    def admit_tokens(self, config: ServerConfig, tokens: int) -> RequestError | None:
        """The 429 refusing ``tokens`` more input tokens, or None after recording them."""
        limit = config.tokens_per_minute
        if limit is None:
            return None
        if tokens > limit:
            # Waiting cannot help, so no Retry-After (OpenAI: "Request too large").
            return RequestError(
                429,
                f"Request too large: {tokens} tokens, over the limit of {limit} tokens per minute",
                code="rate_limit_exceeded",
                kind="tokens",
            )
        now = time.monotonic()
        self.tokens.prune(now)
        wait = self.tokens.wait_for_room(now, tokens, limit)
        if wait > 0:
            return RequestError(
                429,
                f"Rate limit reached: {limit} tokens per minute, "
                f"{self.tokens.total} used, {tokens} requested",
                code="rate_limit_exceeded",
                retry_after=wait,
                kind="tokens",
            )
        self.tokens.add(now, tokens)
        return None

    def headers(self, config: ServerConfig) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the limits that are set, as of now."""
        now = time.monotonic()
        headers: dict[str, str] = {}
        for name, limit, window in (
            ("requests", config.requests_per_minute, self.requests),
            ("tokens", config.tokens_per_minute, self.tokens),
        ):
            if limit is None:
                continue
            window.prune(now)
            headers[f"x-ratelimit-limit-{name}"] = str(limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, limit - window.total))
            headers[f"x-ratelimit-reset-{name}"] = go_duration(window.empty_in(now))
        return headers
