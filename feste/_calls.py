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
2. :func:`send` is the only function that calls a transport. First it reserves what
   the request may cost in the computation's budget (``max_cost``; settled to the
   reported usage after the answer, released on failure). Around each attempt it
   takes admission from the computation's, the backend's and the account's limiters
   (:mod:`feste.limits`), applies the timeouts, and retries: rate limits (429) by
   time, after the server's ``Retry-After`` (``rate_limit_timeout``), other transient
   errors (5xx, dropped connection, timeout) with exponential backoff and full jitter
   up to ``max_retries``. Authentication and bad-request errors are never retried; an
   authentication failure trips the computation's breaker for its account. The
   client libraries' own retries are switched off by the transports, so this is the
   only retry policy. Admissions free at once are taken without awaiting (the common
   case), and the waits between attempts are told to the context's :class:`RetryWaits`
   (the async engine starts other calls meanwhile).
3. Each request, retry and usage report is told to the current :class:`RunObserver`
   (progress bars, usage records, run history, traces): at its end a request's
   timings come as one :class:`RequestReport`, and calls the cache answered as
   :class:`CachedCalls`. An answer cut at its token limit then warns once per run,
   raises or passes, as the ``on_truncation`` option says.
4. A call routed to a provider Batch API (``batch_api``, :mod:`feste._batch_jobs`)
   is built and looked up like any other; :func:`send` then hands its request to the
   computation's batch jobs instead of the transport (no limiter admission: a job is
   not a connection), and its report says ``batch=True`` (batch prices).
5. With a result cache on (:mod:`feste.cache`), :func:`run_call` and :func:`run_batch`
   look every call up before sending (the items of a batch one by one, in one bulk
   query): hits never reach :func:`send`, so they take no limiter admission and
   reserve nothing from the budget; the misses are sent and their values stored
   (committed) before they are handed on.
6. A call whose backend *finishes* its value after the cache (``Backend.finishes``:
   structured outputs, whole answers) carries the parsed answer through the cache and
   is finished in :func:`run_call`; an answer that does not validate is re-asked up
   to ``Backend.repair_retries`` times (each re-ask is a call of its own, cached too).
7. :func:`prepare_call` builds a call's request before its turn (the async engine
   builds its queued calls while it waits for answers); :func:`run_call` then sends
   that request instead of building it. Without a cache only: with one, a call is
   looked up first and a hit needs no request.
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
from feste._batch_jobs import BatchJobStatus, SendOnline, batch_jobs, batch_route
from feste._reports import CachedCalls, RequestReport, RequestTiming, apply_truncation_policy
from feste._timeouts import deadlines
from feste.backend.base import Backend
from feste.backend.spec import chunk_items
from feste.backend.transports import BaseTransport, make_transport
from feste.backend.types import ItemFailure, Parsed, Request, Usage
from feste.cache._session import calls_cache
from feste.errors import (
    BackendError,
    BadRequestError,
    RateLimitError,
    RetryableError,
    StructuredOutputError,
    TransientError,
)
from feste.limits import NOT_RESERVED, admit, admit_free, release_all, run_limits

__all__ = [
    "CachedCalls",
    "PreparedCall",
    "RequestReport",
    "RetryWaits",
    "RunObserver",
    "call_priority",
    "current_observer",
    "prepare_call",
    "prepares_calls",
    "retry_waits",
    "run_batch",
    "run_call",
    "send",
    "tell_cached",
]

_MAX_BACKOFF = 20.0


class RunObserver:
    """Receives what happens to requests; the base class ignores everything.

    An observer that wraps another (``previous``) passes every event on to it.
    """

    def request_started(self, request: Request) -> None:
        pass

    def request_retried(self, request: Request, error: BaseException, attempt: int) -> None:
        pass

    def request_finished(self, request: Request, usage: Usage | None, seconds: float) -> None:
        pass

    def request_failed(self, request: Request, error: BaseException, attempt: int) -> None:
        """The last attempt failed (not retried); ``error`` is what the caller gets."""

    def request_ended(self, request: Request, report: RequestReport) -> None:
        """The request is over (after ``request_finished`` or ``request_failed``)."""

    def calls_cached(self, cached: CachedCalls) -> None:
        """Calls were answered by the result cache instead of a request."""

    def batch_job_changed(self, job: BatchJobStatus) -> None:
        """A provider Batch API job was created or polled (its state and counts)."""


#: The priority of the calls made in this context (higher is admitted first).
call_priority: contextvars.ContextVar[float] = contextvars.ContextVar(
    "feste_call_priority", default=0.0
)

current_observer: contextvars.ContextVar[RunObserver] = contextvars.ContextVar(
    "feste_observer",
    default=RunObserver(),  # noqa: B039 (the base observer is stateless)
)


class RetryWaits:
    """Told when a call of this context starts (+1) and stops (-1) waiting to retry.

    A waiting call holds no admission: the async engine counts these waits per backend
    to start other calls in the meantime (``schedulers._engine``)."""

    __slots__ = ()

    def retry_waiting(self, change: int) -> None:
        pass


#: Who counts the retry waits of the calls made in this context (None: nobody).
retry_waits: contextvars.ContextVar[RetryWaits | None] = contextvars.ContextVar(
    "feste_retry_waits", default=None
)


async def transport_for(backend: Backend) -> BaseTransport:
    """The backend's transport for the running event loop (one connection pool each),
    prepared: its pool is open and its client built before a request's deadline starts."""
    loop = asyncio.get_running_loop()
    transport = backend._transports.get(loop)
    if transport is None:
        transport = make_transport(backend)
        backend._transports[loop] = transport
    await transport.prepare()
    return transport


class _RetryPolicy:
    """The retry settings of the current context, read once per request."""

    __slots__ = (
        "attempt_timeout",
        "backoff",
        "call_timeout",
        "max_retries",
        "max_retry_after",
        "rate_limit_timeout",
    )

    def __init__(self, backend: Backend) -> None:
        self.max_retries: int = context.get("max_retries")
        self.backoff: float = context.get("retry_backoff")
        self.attempt_timeout: float = context.get("task_timeout") or backend.timeout
        self.max_retry_after: float = context.get("max_retry_after")
        self.rate_limit_timeout: float = context.get("rate_limit_timeout")
        self.call_timeout: float | None = context.get("call_timeout")


# The last policy made, with the options mapping and backend timeout it was made from:
# every request of a run reads the same options, so most requests reuse it.
_last_policy: tuple[Mapping[str, Any], float, _RetryPolicy] | None = None


def _retry_policy(backend: Backend) -> _RetryPolicy:
    global _last_policy
    options = context.current()
    last = _last_policy
    if last is not None and last[0] is options and last[1] == backend.timeout:
        return last[2]
    policy = _RetryPolicy(backend)
    _last_policy = (options, backend.timeout, policy)
    return policy


def _deadline_error(request: Request, policy: _RetryPolicy, waiting: str) -> TransientError:
    return TransientError(
        f"call_timeout of {policy.call_timeout:g} s passed while {waiting} "
        "(raise call_timeout, or leave it unset for no overall bound)",
        backend=request.provider,
        method=request.method,
        model=request.model,
    )


async def send(backend: Backend, request: Request, *, batch: bool = False) -> Parsed:
    """Send ``request`` with limits, timeouts and retries; return the parsed result.

    Every request ends with one :class:`RequestReport` to the observer; an answer cut
    at its token limit is then handled by the ``on_truncation`` option (see
    :func:`_send_attempts` for the policy of attempts). ``batch=True`` (the call was
    routed to a Batch API: :func:`feste._batch_jobs.batch_route`) hands the request to
    the computation's batch jobs instead of the transport.
    """
    observer = current_observer.get()
    timing = RequestTiming()
    # Reports are built only for an observer that reads them (the base one does not).
    reported = type(observer).request_ended is not RunObserver.request_ended
    # First, before any way of sending: a request the budget (max_cost) cannot pay for
    # is never sent (BudgetExceeded); failed attempts are not billed, so cost nothing.
    # A Batch API call is reserved at batch prices unless an expired job may send it
    # online (batch_api_on_expiry="online"): then at the online ones, the upper bound.
    scope = run_limits()
    if scope.budget is None:
        reservation = NOT_RESERVED  # no max_cost: nothing to set aside (most runs)
    else:
        batch_priced = batch and context.get("batch_api_on_expiry") != "online"
        reservation = await scope.reserve(backend, request, batch=batch_priced)
    try:
        if batch:
            parsed = await _send_to_batch_job(backend, request, timing)
        else:
            parsed = await _send_attempts(backend, request, timing)
    except BaseException as error:
        reservation.release()
        if reported:
            observer.request_ended(request, timing.report(request, None, error))
        raise
    reservation.settle(parsed.usage, batch=timing.batch)
    if reported:
        observer.request_ended(request, timing.report(request, parsed.usage, None))
    if parsed.truncated:
        apply_truncation_policy(scope, request, parsed)
    return parsed


async def _send_to_batch_job(backend: Backend, request: Request, timing: RequestTiming) -> Parsed:
    """``request`` through a Batch API job (:mod:`feste._batch_jobs`), which retries and
    resubmits for itself; sent online instead when its job expired and
    ``batch_api_on_expiry="online"``."""
    observer = current_observer.get()
    timing.admitted(1)
    timing.batch = True
    observer.request_started(request)
    started = time.monotonic()
    try:
        transport = await transport_for(backend)
        response = await batch_jobs().send(backend, transport, request, observer.batch_job_changed)
        parsed = backend.parse_response(request, response)
    except SendOnline:
        timing.batch = False
        return await _send_attempts(backend, request, timing)
    except BaseException as error:
        observer.request_failed(request, error, getattr(error, "attempts", 1) or 1)
        raise
    observer.request_finished(request, parsed.usage, time.monotonic() - started)
    return parsed


async def _send_attempts(backend: Backend, request: Request, timing: RequestTiming) -> Parsed:
    """The attempts of one request, with limits, timeouts and retries.

    Each attempt is admitted by the computation's, the backend's and the account's
    limiters (:mod:`feste.limits`) and holds them only while in flight, so waiting
    retries never occupy concurrency. Rate limits (429) and other transient errors are
    retried differently:

    * a 429 is the server asking to wait, not a failure: the call waits the server's
      ``Retry-After`` (jittered by up to 20%; one longer than ``max_retry_after`` is
      ignored for an exponential backoff) and tries again, for as long as
      ``rate_limit_timeout`` allows since its first 429, whatever the attempt count;
    * other transient errors (5xx, timeouts, dropped connections) are retried up to
      ``max_retries`` times with exponential backoff and full jitter;
    * authentication errors trip the computation's breaker for the account (its other
      calls then fail without being sent); bad requests are never retried.

    ``call_timeout`` bounds the whole call: admission waits, attempts and the waits
    between them. When admissions are scarce, calls with a higher :data:`call_priority`
    go first (the async engine sets it to the length of the longest chain of calls
    through the call: the critical path goes first).
    """
    scope = run_limits()
    priority = call_priority.get()
    gates = scope.gates(backend)
    policy = _retry_policy(backend)
    observer = current_observer.get()
    loop = asyncio.get_running_loop()
    deadline = None if policy.call_timeout is None else loop.time() + policy.call_timeout
    timeouts = deadlines(loop)
    limiters = gates.limiters
    tokens = request.estimated_tokens
    attempt = 0
    unexplained_failures = 0
    first_rate_limit: float | None = None
    while True:
        attempt += 1
        # Admissions free now are taken without awaiting; the rest are waited for.
        held = admit_free(limiters, tokens)
        if len(held) < len(limiters):
            try:
                if deadline is None:
                    held = await admit(limiters, tokens, priority, held)
                else:
                    async with asyncio.timeout_at(deadline):
                        held = await admit(limiters, tokens, priority, held)
            except TimeoutError:
                error = _deadline_error(request, policy, "waiting for admission")
                observer.request_failed(request, error, attempt)
                raise error from None
        timing.admitted(attempt)
        # Checked once admitted: the breaker may have tripped while this call waited.
        tripped = scope.tripped(gates.account)
        if tripped is not None:
            release_all(held)
            observer.request_failed(request, tripped, attempt)
            raise tripped
        account_ticket = held[-1][1]
        try:
            observer.request_started(request)
            transport = backend._transports.get(loop)
            if transport is None or not transport.ready:
                transport = await transport_for(backend)
            started = time.monotonic()
            timeout = policy.attempt_timeout
            cut_by_deadline = deadline is not None and deadline - loop.time() < timeout
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - loop.time()))
            try:
                guard = timeouts.start(loop, timeout)
                try:
                    response = await transport.send(request)
                except asyncio.CancelledError:
                    guard.timed_out()
                    raise
                finally:
                    guard.stop()
            except TimeoutError:
                if cut_by_deadline:
                    raise _deadline_error(request, policy, "waiting for an answer") from None
                raise TransientError(
                    f"no answer within {timeout:g} s (raise task_timeout or the backend's timeout)",
                    backend=request.provider,
                    method=request.method,
                    model=request.model,
                ) from None
            parsed = backend.parse_response(request, response)
        except RetryableError as error:
            error.attempts = attempt
            rate_limited = isinstance(error, RateLimitError)
            hint = error.retry_after if isinstance(error, RateLimitError) else None
            if rate_limited:
                # Before the admission is given back, so no waiter slips in unpaused.
                gates.account.rate_limited(hint, account_ticket, max_pause=policy.max_retry_after)
            release_all(held)
            now = loop.time()
            if not rate_limited:
                unexplained_failures += 1
            if hint is not None and hint <= policy.max_retry_after:
                # The server said when: wait that long, spread a little so the calls it
                # turned away do not all come back in the same instant.
                delay = hint * random.uniform(1.0, 1.2)
            else:
                if rate_limited:
                    unexplained_failures += 1
                ceiling = policy.backoff * 2 ** max(0, unexplained_failures - 1)
                delay = random.uniform(0.0, min(_MAX_BACKOFF, ceiling))
            if rate_limited:
                # Retry while the next attempt starts within rate_limit_timeout of the
                # call's first 429.
                first_rate_limit = now if first_rate_limit is None else first_rate_limit
                give_up = now + delay - first_rate_limit > policy.rate_limit_timeout
            else:
                give_up = unexplained_failures > policy.max_retries
            if deadline is not None and now + delay >= deadline:
                give_up = True
            if give_up:
                observer.request_failed(request, error, attempt)
                raise
            observer.request_retried(request, error, attempt)
            timing.retrying()
            waits = retry_waits.get()
            if waits is None:
                await asyncio.sleep(delay)
                continue
            waits.retry_waiting(1)
            try:
                await asyncio.sleep(delay)
            finally:
                waits.retry_waiting(-1)
            continue
        except BackendError as error:
            release_all(held)
            error.attempts = attempt
            scope.trip(gates.account, error)
            observer.request_failed(request, error, attempt)
            raise
        except BaseException as error:  # cancelled, or a bug in a transport or parser
            release_all(held)
            observer.request_failed(request, error, attempt)
            raise
        for limiter, ticket in held:
            limiter.succeeded(tokens, parsed.usage, ticket, response.headers)
        release_all(held)
        observer.request_finished(request, parsed.usage, time.monotonic() - started)
        return parsed


class PreparedCall:
    """The request of one call, built before its turn to be sent (see :func:`prepare_call`)."""

    __slots__ = ("batch", "request")

    def __init__(self, batch: bool, request: Request) -> None:
        self.batch = batch
        self.request = request


def prepares_calls() -> bool:
    """Whether :func:`prepare_call` builds requests in this context: not with a result
    cache on, where calls are looked up before anything is built."""
    return calls_cache() is None


def prepare_call(
    backend: Backend, method: str, item: Any, params: Mapping[str, Any]
) -> PreparedCall | None:
    """Build the request of one call ahead of sending it: the async engine builds its
    lanes' next calls while it would otherwise wait for answers, so an answer's next
    request leaves without being built first.

    None where the request is built when the call is sent, as always: with a result
    cache on (the call is looked up first, and a hit needs no request), or when building
    fails (the call then fails where it runs, with its own error).
    """
    if not prepares_calls():
        return None
    batch, sent_params = batch_route(backend, method, params)
    try:
        request = backend.build_request(method, [item], sent_params)
    except Exception:
        return None
    return PreparedCall(batch, request)


async def run_call(
    backend: Backend,
    method: str,
    item: Any,
    params: Mapping[str, Any],
    *,
    pure: bool = True,
    prepared: PreparedCall | None = None,
) -> Any:
    """One call: build its request, send it, return its value.

    With a cache on, the call is looked up first (a hit is returned without reaching
    the limiter) and a sent call's value is stored before it is returned. ``pure=False``
    calls are cached only within a named run. A call the backend ``finishes`` (point 5
    of the module docstring) is finished here, after the cache, re-asked when its
    answer does not validate and ``repair_retries`` allows. ``prepared`` is the call's
    request from :func:`prepare_call`, sent instead of building it again.
    """
    if prepared is not None:
        parsed = await send(backend, prepared.request, batch=prepared.batch)
        answer = parsed.values[0]
    else:
        answer = await _answer(backend, method, item, params, pure)
    if not backend.finishes(method, params):
        return answer
    repairs = 0
    while True:
        try:
            return backend.finish(method, params, answer)
        except StructuredOutputError as error:
            error.repairs = repairs
            if repairs >= backend.repair_retries(method, params):
                raise
            repairs += 1
            item = backend.repair_item(method, item, error)
            answer = await _answer(backend, method, item, params, pure)


async def _answer(
    backend: Backend, method: str, item: Any, params: Mapping[str, Any], pure: bool
) -> Any:
    """The parsed answer of one call: from the cache, or sent (and then stored)."""
    cache = calls_cache()
    key = None
    if cache is not None:
        (key,) = cache.keys(backend, method, [item], params, pure=pure)
        found = await cache.lookup([key])
        if key in found:
            tell_cached(backend, method, [item], [found[key]], params)
            return found[key]
    batch, sent_params = batch_route(backend, method, params)
    request = backend.build_request(method, [item], sent_params)
    parsed = await send(backend, request, batch=batch)
    value = parsed.values[0]
    if cache is not None:
        cache.sent(1)
        if key is not None:
            await cache.store_values(backend, method, params, [(key, value)], pure=pure)
    return value


def tell_cached(
    backend: Backend, method: str, items: list[Any], answers: list[Any], params: Mapping[str, Any]
) -> None:
    """Tell the observer about calls the cache answered (here, or before the run by
    :mod:`feste._replay`), with what they would have cost."""
    observer = current_observer.get()
    if not items or type(observer).calls_cached is RunObserver.calls_cached:
        return  # nobody listens: skip estimating what the calls would have cost
    usage: Usage | None = None
    for item, answer in zip(items, answers):
        estimate = backend.estimated_usage(method, item, params, answer)
        usage = estimate if usage is None else usage + estimate
    assert usage is not None
    model = params.get("model")
    observer.calls_cached(
        CachedCalls(
            backend.provider,
            method,
            model if isinstance(model, str) else usage.model,
            len(items),
            usage,
        )
    )


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
    batch, sent_params = batch_route(backend, method, params)
    request = backend.build_request(method, items, sent_params)
    parsed = await send(backend, request, batch=batch)
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
        hits = [index for index, key in enumerate(keys) if key is not None and key in found]
        tell_cached(
            backend,
            method,
            [unique_items[index] for index in hits],
            [found[keys[index]] for index in hits],  # type: ignore[index]
            params,
        )
    missing = [index for index, key in enumerate(keys) if key is None or key not in found]
    chunk_results = await asyncio.gather(
        *(
            _send_isolating_bad_items(backend, method, chunk, params)
            for chunk in chunk_items(
                backend.spec(method), [unique_items[index] for index in missing]
            )
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
