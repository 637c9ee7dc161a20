"""Sending backend calls: the one place a request leaves feste and its result lands.

Every scheduler reaches a provider through this module: the async engine awaits
:func:`run_call` / :func:`run_batch` directly, the other schedulers through
``BackendCall.__call__`` on a per-thread loop. So the policy is the same everywhere:

1. :func:`run_batch` sends identical string items once, chunks items to the method's
   batch size and token budget, and when the provider rejects a batch as a bad request
   (400) it isolates the bad items: the item the provider names is split out at once,
   otherwise the batch is cut in halves until the bad items stand alone (a rejection
   that hits both halves alike is about the request and fails every item). Failed
   items become :class:`ItemFailure` entries, every other item gets its value; any
   other error fails only the items of its own request.
2. :func:`send` is the only function that calls a transport. Around each attempt it
   takes admission from the backend's limiter (concurrency, requests and tokens per
   minute), applies the timeout, and on a retryable error (429, 5xx, dropped
   connection, timeout) waits with exponential backoff and full jitter, or the
   server's ``Retry-After``, up to ``max_retries``. Authentication and bad-request
   errors are never retried. The client libraries' own retries are switched off by the
   transports, so this is the only retry policy.
3. Each request, retry and usage report is told to the current :class:`RunObserver`
   (progress bars, usage records, run history).
4. With a result cache on (:mod:`feste.cache`), :func:`run_call` and :func:`run_batch`
   look every call up before sending (the items of a batch one by one, in one bulk
   query): hits never reach :func:`send`, so they take no limiter admission; the
   misses are sent and their values stored (committed) before they are handed on.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import random
import time
from collections.abc import Mapping
from typing import Any

from feste import context
from feste.backend.base import Backend
from feste.backend.types import ItemFailure, Parsed, Request, Usage
from feste.cache._session import calls_cache
from feste.errors import (
    BackendError,
    BadRequestError,
    RateLimitError,
    RetryableError,
    TransientError,
)

__all__ = ["RunObserver", "current_observer", "run_batch", "run_call", "send"]

_MAX_BACKOFF = 20.0
# A Retry-After longer than this is taken as this long (a server asking for an hour
# would otherwise park the whole run); the limiter's shared pause still applies.
_MAX_RETRY_AFTER = 120.0


class RunObserver:
    """Receives what happens to requests; the base class ignores everything."""

    def request_started(self, request: Request) -> None:
        pass

    def request_retried(self, request: Request, error: BaseException, attempt: int) -> None:
        pass

    def request_finished(self, request: Request, usage: Usage | None, seconds: float) -> None:
        pass

    def request_failed(self, request: Request, error: BaseException, attempt: int) -> None:
        """The last attempt failed (not retried); ``error`` is what the caller gets."""


current_observer: contextvars.ContextVar[RunObserver] = contextvars.ContextVar(
    "feste_observer",
    default=RunObserver(),  # noqa: B039 (the base observer is stateless)
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
    """Send ``request`` with limits, timeout and retries; return the parsed result.

    Each attempt holds one admission of the backend's limiter only while the request is
    in flight: the admission is given back before a retry waits, so waiting retries
    never occupy concurrency. A 429 is reported to the limiter first (shared pause,
    smaller concurrency), then the call waits the server's ``Retry-After`` (plus up to
    20% jitter), or, without one and for other transient errors, an exponential
    backoff with full jitter; then it tries again, up to ``max_retries`` retries.
    """
    from feste.limits import limiter_for

    limiter = limiter_for(backend)
    max_retries = context.get("max_retries")
    backoff = context.get("retry_backoff")
    timeout = context.get("task_timeout") or backend.timeout
    observer = current_observer.get()
    attempt = 0
    unexplained_failures = 0
    while True:
        attempt += 1
        ticket = await limiter.acquire(request.estimated_tokens)
        try:
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
        except RetryableError as error:
            error.attempts = attempt
            if isinstance(error, RateLimitError):
                # Before the admission is given back, so no waiter slips in unpaused.
                limiter.rate_limited(error.retry_after, ticket)
            limiter.release(ticket)
            if attempt > max_retries:
                observer.request_failed(request, error, attempt)
                raise
            observer.request_retried(request, error, attempt)
            if isinstance(error, RateLimitError) and error.retry_after is not None:
                # The server said when: wait that long, spread a little so the calls it
                # turned away do not all come back in the same instant.
                delay = min(_MAX_RETRY_AFTER, error.retry_after) * random.uniform(1.0, 1.2)
            else:
                # The exponent counts only these failures: 429s answered with a
                # Retry-After say nothing about how long the next outage may last.
                unexplained_failures += 1
                ceiling = backoff * 2 ** (unexplained_failures - 1)
                delay = random.uniform(0.0, min(_MAX_BACKOFF, ceiling))
            await asyncio.sleep(delay)
            continue
        except BackendError as error:
            limiter.release(ticket)
            error.attempts = attempt
            observer.request_failed(request, error, attempt)
            raise
        except BaseException as error:  # cancelled, or a bug in a transport or parser
            limiter.release(ticket)
            observer.request_failed(request, error, attempt)
            raise
        limiter.succeeded(request.estimated_tokens, parsed.usage, ticket)
        limiter.release(ticket)
        observer.request_finished(request, parsed.usage, time.monotonic() - started)
        return parsed


async def run_call(
    backend: Backend, method: str, item: Any, params: Mapping[str, Any], *, pure: bool = True
) -> Any:
    """One call: build its request, send it, return its value.

    With a cache on, the call is looked up first (a hit is returned without reaching
    the limiter) and a sent call's value is stored before it is returned. ``pure=False``
    calls are cached only within a named run.
    """
    cache = calls_cache()
    key = None
    if cache is not None:
        (key,) = cache.keys(backend, method, [item], params, pure=pure)
        found = await cache.lookup([key])
        if key in found:
            return found[key]
    request = backend.build_request(method, [item], params)
    parsed = await send(backend, request)
    value = parsed.values[0]
    if cache is not None:
        cache.sent(1)
        if key is not None:
            await cache.store_values(backend, method, params, [(key, value)], pure=pure)
    return value


def _chunks(backend: Backend, method: str, items: list[Any]) -> list[list[Any]]:
    """Split ``items`` by the method's batch size and token budget, keeping order.

    Strings count their estimated tokens; any other item (a value not known yet when
    the batching pass plans a graph) counts as zero. An item over the budget on its
    own goes alone in its chunk (the provider then says whether it is too long).
    """
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


def _copy_error(error: BaseException) -> BaseException:
    """A separate error object, so each item's failure can be labelled with its own key."""
    try:
        return copy.copy(error)
    except Exception:
        return error


def _fail_all(items: list[Any], error: BackendError) -> list[Any]:
    error.item_index = None
    return [ItemFailure(_copy_error(error)) for _ in items]


async def _send_items(
    backend: Backend, method: str, items: list[Any], params: Mapping[str, Any]
) -> list[Any]:
    """One request for ``items``: one value per item, or a BackendError."""
    request = backend.build_request(method, items, params)
    parsed = await send(backend, request)
    if len(parsed.values) != len(items):
        raise backend.malformed(
            request, f"{len(parsed.values)} results for a request of {len(items)} items"
        )
    return parsed.values


async def _attempt(
    backend: Backend, method: str, items: list[Any], params: Mapping[str, Any]
) -> list[Any] | BackendError:
    try:
        return await _send_items(backend, method, items, params)
    except BackendError as error:
        return error


def _same_rejection(first: BackendError, second: BackendError) -> bool:
    return (
        isinstance(second, BadRequestError)
        and second.item_index is None
        and second.status == first.status
        and second.message == first.message
    )


async def _send_isolating_bad_items(
    backend: Backend, method: str, items: list[Any], params: Mapping[str, Any]
) -> list[Any]:
    """Send ``items`` in one request; one entry per item, a value or an ItemFailure.

    A bad request (400) caused by some items is split until those items stand alone;
    every other error fails all the items of the request, each with its own copy.
    """
    outcome = await _attempt(backend, method, items, params)
    if isinstance(outcome, BadRequestError):
        return await _isolate(backend, method, items, params, outcome, first_split=True)
    if isinstance(outcome, BackendError):
        return _fail_all(items, outcome)
    return outcome


async def _isolate(
    backend: Backend,
    method: str,
    items: list[Any],
    params: Mapping[str, Any],
    error: BadRequestError,
    *,
    first_split: bool,
) -> list[Any]:
    """Results for ``items``, whose request was just rejected with ``error``.

    * One item: it fails alone, with the provider's message.
    * The provider named the item (``item_index``): that item fails, the others go
      again in one request.
    * Otherwise bisect, sending both halves at once. At the first split of a request,
      when both halves are rejected with exactly the message of the whole, the
      rejection is about the request (an unknown model, a bad parameter), not an
      item: every item fails with it, after three requests instead of one per item.
      Item errors name their item in the message (its index or its size), so two bad
      items in different halves are almost never mistaken for that.
    """
    if len(items) == 1:
        error.item_index = None
        return [ItemFailure(error)]
    blamed = error.item_index
    if blamed is not None and 0 <= blamed < len(items):
        error.item_index = None
        rest = items[:blamed] + items[blamed + 1 :]
        rest_results = await _send_isolating_bad_items(backend, method, rest, params)
        return [*rest_results[:blamed], ItemFailure(error), *rest_results[blamed:]]

    middle = len(items) // 2
    halves = (items[:middle], items[middle:])
    outcomes = await asyncio.gather(*(_attempt(backend, method, half, params) for half in halves))
    if first_split and all(
        isinstance(outcome, BackendError) and _same_rejection(error, outcome)
        for outcome in outcomes
    ):
        return _fail_all(items, error)

    async def settle(half: list[Any], outcome: list[Any] | BackendError) -> list[Any]:
        if isinstance(outcome, BadRequestError):
            return await _isolate(backend, method, half, params, outcome, first_split=False)
        if isinstance(outcome, BackendError):
            return _fail_all(half, outcome)
        return outcome

    left, right = await asyncio.gather(
        *(settle(half, outcome) for half, outcome in zip(halves, outcomes))
    )
    return [*left, *right]


async def run_batch(
    backend: Backend,
    method: str,
    items: list[Any],
    params: Mapping[str, Any],
    *,
    dedupe: bool = True,
) -> list[Any]:
    """Many calls of one batch group: one entry per item, a value or an ItemFailure.

    Identical string items are sent once. Chunks go out concurrently (the limiter
    admits them); an error fails only the items of the chunk it came from.
    ``dedupe=False`` (some items come from ``pure=False`` calls) sends every item and,
    with a cache on, caches every item as a ``pure=False`` call (within the run only).
    """
    unique_items: list[Any] = []
    position_of: dict[str, int] = {}
    positions: list[int] = []
    for item in items:
        if dedupe and isinstance(item, str):
            index = position_of.get(item)
            if index is None:
                index = position_of[item] = len(unique_items)
                unique_items.append(item)
        else:
            index = len(unique_items)
            unique_items.append(item)
        positions.append(index)

    # The cache answers item by item (keys and lookup in bulk); only misses are sent.
    cache = calls_cache()
    keys: list[str | None] = [None] * len(unique_items)
    found: dict[str, Any] = {}
    if cache is not None:
        keys = cache.keys(backend, method, unique_items, params, pure=dedupe)
        found = await cache.lookup(keys)
    missing = [index for index, key in enumerate(keys) if key is None or key not in found]
    chunk_results = await asyncio.gather(
        *(
            _send_isolating_bad_items(backend, method, chunk, params)
            for chunk in _chunks(backend, method, [unique_items[index] for index in missing])
        )
    )
    sent_results: list[Any] = []
    for chunk_result in chunk_results:
        sent_results.extend(chunk_result)
    unique_results: list[Any] = [found.get(key) if key is not None else None for key in keys]
    for index, value in zip(missing, sent_results):
        unique_results[index] = value
    if cache is not None:
        cache.sent(len(missing))
        answered = [
            (key, value)
            for key, value in ((keys[index], unique_results[index]) for index in missing)
            if key is not None and not isinstance(value, ItemFailure)
        ]
        await cache.store_values(backend, method, params, answered, pure=dedupe)

    results: list[Any] = []
    handed_out: set[int] = set()
    for index in positions:
        value = unique_results[index]
        if isinstance(value, ItemFailure) and index in handed_out:
            value = ItemFailure(_copy_error(value.error))
        handed_out.add(index)
        results.append(value)
    return results
