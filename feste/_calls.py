"""Sending backend calls: the one place a request leaves feste and its result lands.

Every scheduler reaches a provider through this module: the async engine awaits
:func:`run_call` / :func:`run_batch` directly, the other schedulers through
``BackendCall.__call__`` on a per-thread loop. So the policy is the same everywhere:

1. :func:`run_batch` chunks items to the method's batch size and token budget, and when
   the provider rejects a batch as a bad request (400) it splits the batch in halves
   until the bad items stand alone: they become :class:`ItemFailure` entries, every
   other item gets its value.
2. :func:`send` is the only function that calls a transport. Around each attempt it
   takes admission from the backend's limiter (concurrency, requests and tokens per
   minute), applies the timeout, and on a retryable error (429, 5xx, dropped
   connection, timeout) waits with exponential backoff and full jitter, or the
   server's ``Retry-After``, up to ``max_retries``. Authentication and bad-request
   errors are never retried. The client libraries' own retries are switched off by the
   transports, so this is the only retry policy.
3. Each request, retry and usage report is told to the current :class:`RunObserver`
   (progress bars, and later cost accounting and traces); a persistent cache will sit
   in :func:`run_call` / :func:`run_batch`, before :func:`send`.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import time
from collections.abc import Mapping
from typing import Any

from feste import context
from feste.backend.base import Backend
from feste.backend.types import ItemFailure, Parsed, Request, Usage
from feste.errors import (
    BackendError,
    BadRequestError,
    RateLimitError,
    RetryableError,
    TransientError,
)

__all__ = ["RunObserver", "current_observer", "run_batch", "run_call", "send"]

_MAX_BACKOFF = 20.0


class RunObserver:
    """Receives what happens to requests; the base class ignores everything."""

    def request_started(self, request: Request) -> None:
        pass

    def request_retried(self, request: Request, error: BaseException, attempt: int) -> None:
        pass

    def request_finished(self, request: Request, usage: Usage | None, seconds: float) -> None:
        pass


current_observer: contextvars.ContextVar[RunObserver] = contextvars.ContextVar(
    "feste_observer", default=RunObserver()
)


def transport_for(backend: Backend) -> Any:
    """The backend's transport for the running event loop (one connection pool each)."""
    loop = asyncio.get_running_loop()
    transport = backend._transports.get(loop)
    if transport is None:
        transport = backend.make_transport()
        backend._transports[loop] = transport
    return transport


async def send(backend: Backend, request: Request) -> Parsed:
    """Send ``request`` with limits, timeout and retries; return the parsed result."""
    from feste.limits import limiter_for

    limiter = limiter_for(backend)
    max_retries = context.get("max_retries")
    backoff = context.get("retry_backoff")
    timeout = context.get("task_timeout") or backend.timeout
    observer = current_observer.get()
    attempt = 0
    while True:
        attempt += 1
        try:
            async with limiter.admit(request.estimated_tokens):
                observer.request_started(request)
                started = time.monotonic()
                try:
                    async with asyncio.timeout(timeout):
                        response = await transport_for(backend).send(request)
                except TimeoutError:
                    raise TransientError(
                        f"no answer within {timeout:g} s (raise task_timeout or the backend's timeout)",
                        backend=request.provider,
                        method=request.method,
                        model=request.model,
                    ) from None
                parsed = backend.parse_response(request, response)
            limiter.succeeded(request.estimated_tokens, parsed.usage)
            observer.request_finished(request, parsed.usage, time.monotonic() - started)
            return parsed
        except RetryableError as error:
            error.attempts = attempt
            if isinstance(error, RateLimitError):
                limiter.rate_limited(error.retry_after)
            if attempt > max_retries:
                raise
            observer.request_retried(request, error, attempt)
            delay = random.uniform(0, min(_MAX_BACKOFF, backoff * 2 ** (attempt - 1)))
            if isinstance(error, RateLimitError) and error.retry_after is not None:
                delay = max(delay, error.retry_after)
            await asyncio.sleep(delay)
        except BackendError as error:
            error.attempts = attempt
            raise


async def run_call(backend: Backend, method: str, item: Any, params: Mapping[str, Any]) -> Any:
    """One call: build its request, send it, return its value."""
    request = backend.build_request(method, [item], params)
    parsed = await send(backend, request)
    return parsed.values[0]


def _chunks(backend: Backend, method: str, items: list[Any]) -> list[list[Any]]:
    """Split ``items`` by the method's batch size and token budget, keeping order."""
    from feste.backend.base import estimate_tokens

    spec = backend.spec(method)
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


async def _send_isolating_bad_items(
    backend: Backend, method: str, items: list[Any], params: Mapping[str, Any]
) -> list[Any]:
    request = backend.build_request(method, items, params)
    try:
        parsed = await send(backend, request)
    except BadRequestError as error:
        if len(items) == 1:
            error.item_index = None
            return [ItemFailure(error)]
        # One bad item fails the whole request: split to let the others through.
        middle = len(items) // 2
        left, right = await asyncio.gather(
            _send_isolating_bad_items(backend, method, items[:middle], params),
            _send_isolating_bad_items(backend, method, items[middle:], params),
        )
        return left + right
    return parsed.values


async def run_batch(
    backend: Backend, method: str, items: list[Any], params: Mapping[str, Any]
) -> list[Any]:
    """Many calls of one batch group: one entry per item, a value or an ItemFailure."""
    results: list[Any] = []
    chunk_results = await asyncio.gather(
        *(
            _send_isolating_bad_items(backend, method, chunk, params)
            for chunk in _chunks(backend, method, items)
        )
    )
    for chunk_result in chunk_results:
        results.extend(chunk_result)
    return results
