"""Limits: who may send a request now, and what a provider's answers teach us.

Design
------
Every request feste sends is admitted by up to three :class:`Limiter` s, each guarding
one *scope*, acquired in this order and released together (:func:`admit`):

* **the compute** (``context.set(max_concurrency=...)`` or ``feste.compute(...,
  max_concurrency=...)``): caps the calls of one computation, per account, whatever
  other computations do at the same time. :class:`RunLimits`, made when a computation
  starts (:func:`run_scope`), captures the context's limits then; without one (eager
  mode, a Dask worker) each call resolves the current context alone.
* **the backend** (``OpenAI(max_concurrency=...)``): caps the calls made through
  backends of that configuration (identity, credential and limits), in the whole
  process. Two backends with different caps on one URL each keep their own.
* **the account** (provider, base URL, credential fingerprint, extra headers): the
  state the provider shares among everyone using one key, in the whole process: a
  pause ordered by the provider, the budgets it announces in ``x-ratelimit-*``
  headers, and an *overload window*. Two keys on one URL are two accounts.

A backend's scopes are resolved once per computation (:meth:`RunLimits.gates`), not
per request.

Overload control (the account's window) reacts to overload, not to every 429: it
keeps a moving average of the share of answers that are 429s. Only when that share
is high (above :data:`_OVERLOAD_SHARE`) while the window is in use does a 429 shrink
the window (by a quarter, once per generation of requests) and pause the account for
the announced ``Retry-After``; successes grow it back by about one request per round
while it is in use. A
provider that sheds a fifth of requests at random therefore costs each unlucky
request its own ``Retry-After`` and nobody else anything, while a server at its
capacity drives the window down to about what it can serve. A header saying a budget
is spent (``x-ratelimit-remaining-requests: 0``, or no tokens left) pauses the
account until the announced reset.

Mechanics (each :class:`Limiter`): admission waits until fewer than the window are in
flight, the requests-per-minute bucket holds one request and the tokens-per-minute
bucket the request's estimated tokens (corrected by reported usage; a request larger
than the bucket is admitted when the bucket is full), and no pause is in force.
Buckets refill at ``rate / 60`` per second and hold one second's worth, since
providers enforce per-minute limits over short windows. Waiters are served first
come, first served; state is guarded by a ``threading.Lock``; a waiter is a future on
its own loop, resolved directly on that loop's thread or through
``call_soon_threadsafe``; waiters blocked by time are woken by a timer armed on each
loop that has waiters.

Shared limits: on a worker of a cluster run (:func:`shared_limits`), :class:`RunLimits`
takes each scope's limiter from a :class:`SharedLimits`, and those limiters admit
through a :class:`Quota` as well: the share of a cluster-wide budget the process holds
(:mod:`feste.schedulers._leases`).

The budget (``max_cost``, dollars): :class:`RunLimits` holds one :class:`Budget` per
computation. Before a request is sent (:meth:`RunLimits.reserve`, called by the
sender before anything else) it reserves an upper bound of what the request may cost
(:func:`request_cost_estimate`); the reservation is settled to the dollars of the usage
the provider reports, or released when the request fails (providers do not bill
429s and 5xx answers). A request is admitted only while what was spent plus what is
reserved plus its own bound fits the budget; it waits while requests in flight might
still leave it room, and fails with :class:`~feste.errors.BudgetExceeded` once what was
spent alone leaves none. So the number of requests sent follows from the costs alone,
whatever the concurrency. Reservations are made under a ``threading.Lock``, across
event loops (the ``threads`` scheduler has one per thread). A budget is per process:
the cluster scheduler, whose blocks each run their own computation, refuses it
(``feste.compute`` checks before running).

The circuit breaker: once a request of a computation fails authentication, the
computation's other calls on that account fail at once with a copy of that error
instead of being sent (:meth:`RunLimits.trip`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import copy
import hashlib
import heapq
import itertools
import os
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

from feste import context
from feste.backend.prices import price_table
from feste.backend.types import Request, Usage
from feste.errors import AuthenticationError, BudgetExceeded, ConfigurationError, OptionError

__all__ = [
    "ASSUMED_INPUT_TOKENS",
    "ASSUMED_OUTPUT_TOKENS",
    "Budget",
    "CostEstimate",
    "Gates",
    "Limiter",
    "Limits",
    "NOT_RESERVED",
    "Quota",
    "Reservation",
    "RunLimits",
    "SharedLimits",
    "Ticket",
    "account_limiter",
    "admit",
    "admit_free",
    "all_limiters",
    "backend_limiter",
    "joined_scope",
    "limiter_for",
    "request_cost_estimate",
    "resolve_limits",
    "run_limits",
    "run_scope",
    "shared_limits",
    "unpriced_error",
]

# Each success (while the window is in use) raises the overload window by this much
# divided by the window: one more request per round of requests, so it probes for
# capacity without overshooting a server's cap by a whole round.
_RECOVERY_STEP = 1.0
# An overload 429 multiplies the window by this.
_DECREASE_FACTOR = 0.75
# The moving average of "this answer was a 429" that counts as overload. Random
# shedding by a healthy provider stays well below it; a server asked for several times
# its capacity answers most requests with 429s.
_OVERLOAD_SHARE = 0.4
# Weight of each answer in that moving average (about the last 32 answers count).
_SHARE_WEIGHT = 1.0 / 32


class Limits(NamedTuple):
    """The configured limits of one scope; ``None`` means unlimited."""

    max_concurrency: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def check(self, owner: str = "limit") -> Limits:
        """Reject bad limits by the rules of the context options of the same names."""
        for name, value in zip(self._fields, self):
            try:
                context.validate(name, value)
            except OptionError as error:
                raise ConfigurationError(f"{error} ({owner})") from None
        return self

    @property
    def unlimited(self) -> bool:
        return self == _NO_LIMITS


_NO_LIMITS = Limits()


class _Bucket:
    """A token bucket refilled continuously at ``per_minute / 60`` per second."""

    __slots__ = ("capacity", "level", "per_second", "updated")

    def __init__(self, per_minute: float, level: float | None = None) -> None:
        self.per_second = per_minute / 60.0
        self.capacity = max(1.0, self.per_second)
        self.level = self.capacity if level is None else min(level, self.capacity)
        self.updated = time.monotonic()

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
            self.updated = now

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` (capped at the capacity) is available; 0 if it is now."""
        self.refill(now)
        needed = min(amount, self.capacity)
        if self.level >= needed:
            return 0.0
        return (needed - self.level) / self.per_second


class Ticket:
    """Proof of admission of one request; give it back with :meth:`Limiter.release`."""

    __slots__ = ("generation", "released", "tokens")

    def __init__(self, tokens: int, generation: int) -> None:
        self.tokens = tokens
        self.generation = generation
        self.released = False


class _Waiter:
    __slots__ = ("done", "future", "loop", "order", "ticket", "tokens")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[None],
        tokens: int,
        order: tuple[float, int],
    ) -> None:
        self.loop = loop
        self.future = future
        self.tokens = tokens
        # (-priority, arrival number): the heap serves the highest priority, then FIFO.
        self.order = order
        self.ticket: Ticket | None = None
        # Granted, or given up by its caller: skipped when it reaches the heap's top.
        self.done = False


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Quota:
    """The share this process holds of limits enforced across processes (a cluster).

    A :class:`Limiter` made with a quota admits a request only when the quota says so
    too; the quota wakes the limiter (:meth:`Limiter.wake`) when it gets more. Its
    methods are called with the limiter's lock held: they must not call it back then.
    The base class holds everything (no shared limits).
    """

    def attach(self, limiter: Limiter) -> None:
        """``limiter`` admits through this quota."""

    def wait(self, tokens: int, demand: int, now: float) -> float | None:
        """0.0: admissible now; seconds: wait that long; None: wait to be woken.

        ``demand`` is how many admissions the limiter wants held: in flight plus waiting.
        """
        return 0.0

    def taken(self, tokens: int) -> None:
        """One admission of ``tokens`` tokens was made."""

    def returned(self, demand: int) -> None:
        """One admission ended; ``demand`` is what the limiter still wants held."""

    def paused(self, seconds: float) -> None:
        """The provider asked everyone to wait ``seconds`` (an overload 429)."""


class Limiter:
    """Admission control for one scope (see the module docstring).

    ``adaptive`` limiters (accounts) run overload control, pauses and header budgets;
    the others (a backend's, a computation's) enforce their configured limits only.
    """

    def __init__(
        self,
        name: str = "",
        limits: Limits | None = None,
        adaptive: bool = False,
        quota: Quota | None = None,
    ) -> None:
        self.name = name
        self.adaptive = adaptive
        # Limits shared with other processes: admissions also need the quota's consent.
        self._quota = quota
        self._lock = threading.Lock()
        # A heap of (-priority, arrival number, waiter) and how many of them still wait
        # (the heap may hold some that gave up: they are dropped when they reach its top).
        # Arrival numbers are unique, so the heap compares plain numbers, never waiters.
        self._waiters: list[tuple[float, int, _Waiter]] = []
        self._waiting = 0
        self._arrivals = itertools.count()
        self._waiting_loops: collections.Counter[asyncio.AbstractEventLoop] = collections.Counter()
        self._armed: dict[asyncio.AbstractEventLoop, float] = {}
        self._in_flight = 0
        self._generation = 0
        self._paused_until = 0.0
        self._limits = Limits()
        self._window = float("inf")
        self._requests: _Bucket | None = None
        self._tokens: _Bucket | None = None
        self._shed_share = 0.0
        # Counters for diagnostics and tests.
        self._max_in_flight = 0
        self._admitted = 0
        self._rate_limited = 0
        self._decreases = 0
        self._pauses = 0
        self.configure(limits or Limits())
        if quota is not None:
            quota.attach(self)

    # -- configuration --------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        return self._limits

    def configure(self, limits: Limits) -> None:
        """Apply new limits; waiters are re-examined."""
        limits = Limits(*limits).check(self.name or "limiter")
        with self._lock:
            old = self._limits
            if limits == old:
                return
            cap = limits.max_concurrency
            if cap is None:
                if old.max_concurrency is not None and self._window >= old.max_concurrency:
                    self._window = float("inf")
            elif self._window > cap or (
                old.max_concurrency is not None and self._window >= old.max_concurrency
            ):
                self._window = max(1.0, float(cap))
            self._requests = self._rebuilt(self._requests, limits.requests_per_minute)
            self._tokens = self._rebuilt(self._tokens, limits.tokens_per_minute)
            self._limits = limits
            grants, delay = self._grant_locked(time.monotonic())
        self._deliver(grants, delay)

    @staticmethod
    def _rebuilt(bucket: _Bucket | None, per_minute: float | None) -> _Bucket | None:
        if per_minute is None:
            return None
        if bucket is not None and bucket.per_second * 60.0 == per_minute:
            return bucket
        return _Bucket(per_minute, None if bucket is None else bucket.level)

    # -- admission ------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self, tokens: int = 0) -> AsyncIterator[Ticket]:
        """``async with limiter.admit(tokens) as ticket:`` holds one admission."""
        ticket = await self.acquire(tokens)
        try:
            yield ticket
        finally:
            self.release(ticket)

    def try_acquire(self, tokens: int = 0) -> Ticket | None:
        """Admission now if nobody waits and nothing blocks it, else None (no waiting).

        The first step of :meth:`acquire`, without a coroutine: the sender's fast path.
        """
        with self._lock:
            if not self._waiting and self._blocked_for(tokens, time.monotonic()) == 0.0:
                return self._take(tokens)
        return None

    async def acquire(self, tokens: int = 0, priority: float = 0) -> Ticket:
        """Wait for admission of one request of about ``tokens`` tokens.

        Waiters are served highest ``priority`` first (the engine gives a call the
        length of the longest chain of calls waiting on it), then in arrival order.
        """
        with self._lock:
            if not self._waiting and self._blocked_for(tokens, time.monotonic()) == 0.0:
                return self._take(tokens)
            loop = asyncio.get_running_loop()
            order = (-priority, next(self._arrivals))
            waiter = _Waiter(loop, loop.create_future(), tokens, order)
            heapq.heappush(self._waiters, (order[0], order[1], waiter))
            self._waiting += 1
            self._waiting_loops[loop] += 1
            grants, delay = self._grant_locked(time.monotonic())
        self._deliver(grants, delay)
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                ticket = waiter.ticket
                if ticket is None:
                    self._forget(waiter)
            if ticket is not None:
                self.release(ticket)
            raise
        assert waiter.ticket is not None
        return waiter.ticket

    def release(self, ticket: Ticket) -> None:
        """The request of ``ticket`` is no longer in flight (whatever its outcome)."""
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            self._in_flight -= 1
            if self._quota is not None:
                self._quota.returned(self._in_flight + self._waiting)
            if not self._waiting:
                return
            grants, delay = self._grant_locked(time.monotonic())
        self._deliver(grants, delay)

    def wake(self) -> None:
        """Look at the waiters again (a :class:`Quota` got more to give)."""
        with self._lock:
            if not self._waiting:
                return
            grants, delay = self._grant_locked(time.monotonic())
        self._deliver(grants, delay)

    # -- outcomes (adaptive limiters learn from them) -----------------------------------

    def succeeded(
        self,
        estimated_tokens: int,
        usage: Any,
        ticket: Ticket | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """A request succeeded: grow the window, correct the token estimate, read budgets."""
        now = time.monotonic()
        with self._lock:
            if self.adaptive:
                self._shed_share *= 1.0 - _SHARE_WEIGHT
                cap = self._limits.max_concurrency
                # Grow only while the window is in use (at least half of it in flight).
                in_flight = self._in_flight
                if ticket is not None and ticket.released:
                    in_flight += 1
                in_use = 2 * in_flight >= self._window
                if (cap is None or self._window < cap) and in_use:
                    # About one more request per round trip (additive increase).
                    self._window += _RECOVERY_STEP / self._window
                    if cap is not None and self._window > cap:
                        self._window = max(1.0, float(cap))
                if headers:
                    self._read_budgets(headers, now)
            if self._tokens is not None and usage is not None:
                used = getattr(usage, "total_tokens", None)
                if isinstance(used, int):
                    bucket = self._tokens
                    bucket.level = min(bucket.capacity, bucket.level + estimated_tokens - used)
            if not self._waiting:
                return
            grants, delay = self._grant_locked(now)
        self._deliver(grants, delay)

    def rate_limited(
        self,
        retry_after: float | None,
        ticket: Ticket | None = None,
        max_pause: float | None = None,
    ) -> bool:
        """A request got a 429. Returns True when it was taken as overload: the window
        shrank and, with a ``retry_after`` of at most ``max_pause``, everyone pauses."""
        now = time.monotonic()
        with self._lock:
            self._rate_limited += 1
            if not self.adaptive:
                return False
            self._shed_share = self._shed_share * (1.0 - _SHARE_WEIGHT) + _SHARE_WEIGHT
            # The number in flight when the 429 came, this request included.
            in_flight = self._in_flight
            if ticket is None or ticket.released:
                in_flight += 1
            window_in_use = self._window == float("inf") or 2 * in_flight >= self._window
            overloaded = self._shed_share >= _OVERLOAD_SHARE and window_in_use
            # Once per generation: other 429s of the same generation answer requests
            # sent before the reaction, and counting them again would stall the run.
            first_of_generation = ticket is None or ticket.generation == self._generation
            if not (overloaded and first_of_generation):
                return False
            if (
                retry_after is not None
                and retry_after > 0
                and (max_pause is None or retry_after <= max_pause)
            ):
                self._paused_until = max(self._paused_until, now + retry_after)
                self._pauses += 1
                if self._quota is not None:
                    self._quota.paused(retry_after)
            base = min(self._window, float(in_flight))
            self._window = max(1.0, base * _DECREASE_FACTOR)
            self._generation += 1
            self._decreases += 1
            return True

    def _read_budgets(self, headers: Mapping[str, str], now: float) -> None:
        """Pause until the announced reset when a header says a budget is spent."""
        for kind in ("requests", "tokens"):
            remaining = _header_number(headers, f"x-ratelimit-remaining-{kind}")
            if remaining is None or remaining > 0:
                continue
            reset = _duration(headers.get(f"x-ratelimit-reset-{kind}"))
            if reset is not None and reset > 0:
                self._paused_until = max(self._paused_until, now + min(reset, 60.0))
                self._pauses += 1

    # -- diagnostics ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """In flight now and at most, admitted and rate-limited counts, current window."""
        with self._lock:
            return {
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "waiting": self._waiting,
                "admitted": self._admitted,
                "rate_limited": self._rate_limited,
                "decreases": self._decreases,
                "pauses": self._pauses,
                "concurrency": None if self._window == float("inf") else int(self._window),
                "paused_for": max(0.0, self._paused_until - time.monotonic()),
            }

    def __repr__(self) -> str:
        return f"Limiter({self.name!r}, {self._limits})"

    # -- internals (called with the lock held) ----------------------------------------

    def _blocked_for(self, tokens: int, now: float) -> float | None:
        """0.0: admissible now; seconds: wait that long; None: wait for a release."""
        if now < self._paused_until:
            return self._paused_until - now
        if self._in_flight + 1 > self._window:
            return None
        if self._requests is not None:
            wait = self._requests.wait_time(1.0, now)
            if wait > 0.0:
                return wait
        if self._tokens is not None and tokens > 0:
            wait = self._tokens.wait_time(float(tokens), now)
            if wait > 0.0:
                return wait
        if self._quota is not None:
            return self._quota.wait(tokens, self._in_flight + max(1, self._waiting), now)
        return 0.0

    def _take(self, tokens: int) -> Ticket:
        self._in_flight += 1
        self._admitted += 1
        if self._in_flight > self._max_in_flight:
            self._max_in_flight = self._in_flight
        if self._requests is not None:
            self._requests.level -= 1.0
        if self._tokens is not None:
            self._tokens.level -= tokens
        if self._quota is not None:
            self._quota.taken(tokens)
        return Ticket(tokens, self._generation)

    def _forget(self, waiter: _Waiter) -> None:
        if waiter.done:
            return
        waiter.done = True
        self._waiting -= 1
        self._uncount(waiter.loop)

    def _uncount(self, loop: asyncio.AbstractEventLoop) -> None:
        self._waiting_loops[loop] -= 1
        if self._waiting_loops[loop] <= 0:
            del self._waiting_loops[loop]

    def _grant_locked(self, now: float) -> tuple[list[_Waiter], float | None]:
        """Admit waiters in priority, then arrival order; return them and the delay of a
        time-based block."""
        granted: list[_Waiter] = []
        while self._waiters:
            waiter = self._waiters[0][2]
            if waiter.done:
                heapq.heappop(self._waiters)
                continue
            if waiter.future.cancelled():
                heapq.heappop(self._waiters)
                self._forget(waiter)
                continue
            wait = self._blocked_for(waiter.tokens, now)
            if wait is None:
                return granted, None
            if wait > 0.0:
                return granted, wait
            heapq.heappop(self._waiters)
            self._forget(waiter)
            waiter.ticket = self._take(waiter.tokens)
            granted.append(waiter)
        return granted, None

    # -- internals (called without the lock) -----------------------------------------

    def _deliver(self, granted: list[_Waiter], delay: float | None) -> None:
        """Wake the granted waiters on their loops; arm timers for a time-based block."""
        if granted:
            try:
                current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                current = None
            for waiter in granted:
                if waiter.loop is current:
                    _resolve(waiter.future)
                    continue
                try:
                    waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
                except RuntimeError:
                    # Its loop is closed: nobody will use this admission.
                    assert waiter.ticket is not None
                    self.release(waiter.ticket)
        if delay is not None:
            self._arm(delay)

    def _arm(self, delay: float) -> None:
        deadline = time.monotonic() + delay
        with self._lock:
            loops = []
            for loop in list(self._armed):
                if loop.is_closed():
                    del self._armed[loop]
            for loop in self._waiting_loops:
                if self._armed.get(loop, float("inf")) > deadline + 0.001:
                    self._armed[loop] = deadline
                    loops.append(loop)
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop in loops:
            if loop is current:
                loop.call_later(delay, self._on_timer, loop, deadline)
            else:
                try:
                    loop.call_soon_threadsafe(
                        loop.call_later, delay, self._on_timer, loop, deadline
                    )
                except RuntimeError:
                    pass

    def _on_timer(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        with self._lock:
            if self._armed.get(loop) == deadline:
                del self._armed[loop]
            grants, delay = self._grant_locked(time.monotonic())
        self._deliver(grants, delay)


# -- header budgets ------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str | None) -> float | None:
    """Seconds in an OpenAI-style reset header ("1s", "6m0s", "20ms", "0.5s"), or None."""
    if not text:
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _SECONDS_PER_UNIT[unit] for number, unit in parts)


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# -- the scopes ----------------------------------------------------------------------

_registry_lock = threading.Lock()
_accounts: dict[tuple[Any, ...], Limiter] = {}
_backends: dict[tuple[Any, ...], Limiter] = {}
# A per-process salt: account keys identify credentials only inside this process.
_SALT = os.urandom(16)


def _account_key(backend: Any) -> tuple[Any, ...]:
    """Provider, base URL, extra headers and a salted fingerprint of the key sent now."""
    fingerprint = backend.credential_fingerprint()
    if fingerprint is None:
        # The key comes from the environment where the call runs: fingerprint it now.
        env_name = getattr(backend, "api_key_env", "")
        env_key = os.environ.get(env_name, "") if env_name else ""
        fingerprint = hashlib.sha256(_SALT + env_key.encode("utf-8", "replace")).hexdigest()
    headers = tuple(sorted(backend.request_headers().items()))
    return (backend.provider, backend.base_url, headers, fingerprint)


def _registered(
    registry: dict[tuple[Any, ...], Limiter],
    key: tuple[Any, ...],
    name: str,
    limits: Limits,
    adaptive: bool,
) -> Limiter:
    limiter = registry.get(key)
    if limiter is None:
        with _registry_lock:
            limiter = registry.get(key)
            if limiter is None:
                limiter = registry[key] = Limiter(name, limits, adaptive=adaptive)
    return limiter


def account_limiter(backend: Any) -> Limiter:
    """The process-wide limiter of ``backend``'s account (shared provider state)."""
    key = _account_key(backend)
    return _registered(_accounts, key, f"{backend.provider} {backend.base_url}", _NO_LIMITS, True)


def _backend_limits(backend: Any) -> Limits:
    return Limits(*(getattr(backend, name, None) for name in Limits._fields))


def backend_limiter(backend: Any) -> Limiter | None:
    """The process-wide limiter of ``backend``'s own limits; None when it sets none."""
    limits = _backend_limits(backend)
    if limits.unlimited:
        return None
    key = (backend.identity(), backend.credential_fingerprint(), limits)
    name = f"{backend.provider} {backend.base_url} {type(backend).__name__}(...)"
    return _registered(_backends, key, name, limits, False)


def resolve_limits(backend: Any) -> Limits:
    """The limits that apply to ``backend``'s calls now: the tightest of the current
    context's value and the backend's own, for each limit."""
    values = []
    for name in Limits._fields:
        own = getattr(backend, name, None)
        ambient = context.get(name)
        candidates = [value for value in (own, ambient) if value is not None]
        values.append(min(candidates) if candidates else None)
    return Limits(*values)


def limiter_for(backend: Any) -> Limiter:
    """The account limiter of ``backend`` (kept for diagnostics and older callers)."""
    return account_limiter(backend)


def all_limiters() -> dict[str, Limiter]:
    """Every account and backend limiter created so far, by a readable name."""
    found: dict[str, Limiter] = {}
    with _registry_lock:
        for limiter in [*_accounts.values(), *_backends.values()]:
            kind = "account" if limiter.adaptive else "backend"
            found[f"{kind} {limiter.name} #{len(found)}"] = limiter
    return found


class SharedLimits:
    """Where the limiters of a computation spread over several processes come from.

    A worker of a cluster run sets one (:func:`shared_limits`); :class:`RunLimits`
    then takes each scope's limiter from it instead of this process's registries. The
    base class gives plain per-process limiters. ``salt`` fingerprints credentials
    alike in every process that shares the limits.
    """

    salt: bytes = b""

    def limiter(
        self, scope: str, key: tuple[Any, ...], name: str, limits: Limits, adaptive: bool
    ) -> Limiter:
        """The limiter of ``scope`` (``"compute"``, ``"backend"`` or ``"account"``) for
        ``key``, enforcing ``limits``."""
        return Limiter(name, limits, adaptive=adaptive)


def _shared_account_key(backend: Any, salt: bytes) -> tuple[Any, ...]:
    """An account's key that is the same in every process sharing ``salt``: a credential
    read from the environment is named by its variable."""
    fingerprint = backend.credential_fingerprint(salt)
    if fingerprint is None:
        fingerprint = ("env", getattr(backend, "api_key_env", ""))
    headers = tuple(sorted(backend.request_headers().items()))
    return (backend.provider, backend.base_url, headers, fingerprint)


class Gates(NamedTuple):
    """The limiters one backend's requests pass, outermost first, and its account."""

    limiters: tuple[Limiter, ...]
    account: Limiter


# -- the budget (max_cost) -------------------------------------------------------------

#: Output tokens reserved per answer of a generating call (chat, complete) that sets no
#: ``max_tokens`` (or ``max_completion_tokens``): the reservation of such a call is then
#: a guess, not a bound; an answer longer than this is still billed in full.
ASSUMED_OUTPUT_TOKENS = 1000
#: Input tokens assumed, in the estimate made before a run, for a call whose input is
#: the output of another call (not known until that call answers).
ASSUMED_INPUT_TOKENS = 1000
# Rerank is billed per search: one query over up to this many documents.
_DOCUMENTS_PER_SEARCH = 100


class CostEstimate(NamedTuple):
    """What one request may cost: ``dollars`` (None: its model is not priced), the
    ``model`` priced, and whether its output was guessed (no ``max_tokens``)."""

    dollars: float | None
    model: str | None
    assumed_output: bool


def request_cost_estimate(backend: Any, request: Request, *, batch: bool = False) -> CostEstimate:
    """An upper bound of the dollars ``request`` may be billed, at the price table
    (``batch=True``: at its Batch API prices).

    Input: the request's own token estimate (for chat it counts ``max_tokens`` too, so
    the bound errs high). Output, for a generating method: ``max_completion_tokens``
    or ``max_tokens`` per answer (``n`` answers per item) when given, else
    :data:`ASSUMED_OUTPUT_TOKENS`; none for embeddings. A method priced per search
    (rerank) costs one search per query and 100 documents.
    """
    model = request.model
    price = price_table().price(request.provider, model)
    payload = request.payload
    generates = backend.spec(request.method).generates
    budget = payload.get("max_completion_tokens") or payload.get("max_tokens")
    assumed = generates and not budget
    if price is None:
        return CostEstimate(None, model, assumed)
    if price.input is None and price.search is not None:
        documents = payload.get("documents")
        count = len(documents) if isinstance(documents, list) else 0
        searches = max(1, -(-count // _DOCUMENTS_PER_SEARCH)) * request.items
        searched = Usage(model, search_units=searches)
        return CostEstimate(price.cost(searched, batch=batch), model, False)
    output = 0
    if generates:
        answers = (payload.get("n") or 1) * request.items
        output = (budget or ASSUMED_OUTPUT_TOKENS) * answers
    usage = Usage(model, request.estimated_tokens, output)
    return CostEstimate(price.cost(usage, batch=batch), model, assumed)


def unpriced_error(provider: str, model: str | None) -> ConfigurationError:
    """The error of a budget that cannot price ``provider``'s ``model``."""
    shown = model if model is not None else "<model>"
    return ConfigurationError(
        f"max_cost needs the price of {provider} model {model!r}, which the price table "
        f"does not have: give it with feste.context.set(prices={{{provider!r}: {{{shown!r}: "
        "{'input': ..., 'output': ...}}}) in dollars per 1M tokens (or a TOML file in the "
        "prices option), or leave max_cost unset",
        backend=provider,
        model=model,
    )


def _dollars(amount: float) -> str:
    return f"${amount:.6f}"


class Reservation:
    """Dollars set aside for one request; :meth:`settle` or :meth:`release` it once."""

    __slots__ = ("budget", "dollars", "ended", "provider")

    def __init__(self, budget: Budget | None, dollars: float, provider: str) -> None:
        self.budget = budget
        self.dollars = dollars
        self.provider = provider
        self.ended = False

    def settle(self, usage: Usage | None, *, batch: bool = False) -> None:
        """The request was answered (``batch``: by a Batch API job): it cost the dollars
        of ``usage`` (the reserved amount when the provider reported no usage or its
        model is not priced)."""
        if self.budget is None:
            return
        cost = None if usage is None else price_table().cost(self.provider, usage, batch=batch)
        self.budget.end(self, self.dollars if cost is None else cost)

    def release(self) -> None:
        """The request failed or was not sent: it cost nothing."""
        if self.budget is not None:
            self.budget.end(self, 0.0)


#: The reservation of a request made without a budget: settling or releasing it does nothing.
NOT_RESERVED = Reservation(None, 0.0, "")


class _BudgetWaiter:
    __slots__ = ("dollars", "future", "granted", "loop")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], dollars: float
    ) -> None:
        self.loop = loop
        self.future = future
        self.dollars = dollars
        # None while waiting; True: reserved for it; False: it can never fit.
        self.granted: bool | None = None


class Budget:
    """Dollars one computation may spend (see the module docstring).

    ``spent`` is what settled requests cost, ``reserved`` what requests in flight may
    still cost; ``sent`` and ``refused`` count reservations made and refused.
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._spent = 0.0
        self._reserved = 0.0
        self._waiters: list[_BudgetWaiter] = []
        self.sent = 0
        self.refused = 0

    @property
    def spent(self) -> float:
        with self._lock:
            return round(self._spent, 12)

    @property
    def reserved(self) -> float:
        with self._lock:
            return round(self._reserved, 12)

    def _fits(self, amount: float) -> bool:
        # Rounded like the price table's amounts, so sums of costs compare exactly.
        return round(amount, 12) <= self.limit

    async def reserve(self, dollars: float, request: Request) -> Reservation:
        """Set ``dollars`` aside for ``request``: at once when they fit, after requests
        in flight settle when they may, or :class:`BudgetExceeded` when what was spent
        already leaves no room."""
        with self._lock:
            if not self._fits(self._spent + dollars):
                self.refused += 1
                raise self._refusal(dollars, request)
            if self._fits(self._spent + self._reserved + dollars):
                self._reserved += dollars
                self.sent += 1
                return Reservation(self, dollars, request.provider)
            loop = asyncio.get_running_loop()
            waiter = _BudgetWaiter(loop, loop.create_future(), dollars)
            self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                granted = waiter.granted
                if granted is None:
                    self._waiters.remove(waiter)
            if granted:
                self.end(Reservation(self, dollars, request.provider), 0.0)
            raise
        if not waiter.granted:
            with self._lock:
                error = self._refusal(dollars, request)
            raise error
        return Reservation(self, dollars, request.provider)

    def end(self, reservation: Reservation, charged: float) -> None:
        """``reservation``'s request is over and cost ``charged`` dollars."""
        with self._lock:
            if reservation.ended:
                return
            reservation.ended = True
            self._reserved = max(0.0, self._reserved - reservation.dollars)
            self._spent += charged
            woken: list[_BudgetWaiter] = []
            waiting: list[_BudgetWaiter] = []
            for waiter in self._waiters:
                if not self._fits(self._spent + waiter.dollars):
                    waiter.granted = False
                    self.refused += 1
                    woken.append(waiter)
                elif self._fits(self._spent + self._reserved + waiter.dollars):
                    waiter.granted = True
                    self._reserved += waiter.dollars
                    self.sent += 1
                    woken.append(waiter)
                else:
                    waiting.append(waiter)
            self._waiters = waiting
        for waiter in woken:
            _wake(waiter.loop, waiter.future)

    def _refusal(self, dollars: float, request: Request) -> BudgetExceeded:
        spent = round(self._spent, 12)
        return BudgetExceeded(
            f"not sent: it may cost up to {_dollars(dollars)} and {_dollars(spent)} of "
            f"max_cost={_dollars(self.limit)} is spent; raise max_cost to run the calls "
            "left (with a cache on, a new run with a larger budget pays only for them)",
            estimate=dollars,
            budget=self.limit,
            spent=spent,
            backend=request.provider,
            method=request.method,
            model=request.model,
        )


def _wake(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    """Resolve ``future`` on its own loop, from whichever thread this is."""
    try:
        current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    if loop is current:
        _resolve(future)
        return
    try:
        loop.call_soon_threadsafe(_resolve, future)
    except RuntimeError:
        pass  # its loop is closed: nobody waits on it any more


class RunLimits:
    """The limits of one computation: the context's limits captured when it started,
    each backend's scopes resolved once, the authentication circuit breaker, and the
    budget (``max_cost``: :attr:`budget`, None without one)."""

    def __init__(self) -> None:
        self.limits = Limits(*(context.get(name) for name in Limits._fields))
        # Set on a worker of a cluster run: the limits hold for the whole cluster.
        self.shared = _shared.get()
        # Weak: contexts copied during a run (timers of connection pools) may outlive it,
        # and must not keep its backends and their pools alive.
        self._gates: weakref.WeakKeyDictionary[Any, Gates] = weakref.WeakKeyDictionary()
        self._compute_limiters: dict[tuple[Any, ...], Limiter] = {}
        self._tripped: dict[int, BaseException] = {}
        self._lock = threading.Lock()
        max_cost = context.get("max_cost")
        self.budget = None if max_cost is None else Budget(max_cost)

    async def reserve(self, backend: Any, request: Request, *, batch: bool = False) -> Reservation:
        """Set aside what ``request`` may cost in this computation's budget (a no-op
        without ``max_cost``), at Batch API prices when ``batch``; raises
        :class:`BudgetExceeded` when it cannot fit."""
        if self.budget is None:
            return NOT_RESERVED
        estimate = request_cost_estimate(backend, request, batch=batch)
        if estimate.dollars is None:
            raise unpriced_error(request.provider, estimate.model)
        return await self.budget.reserve(estimate.dollars, request)

    def gates(self, backend: Any) -> Gates:
        """The limiters ``backend``'s requests pass in this computation."""
        gates = self._gates.get(backend)
        if gates is not None:
            return gates
        if self.shared is not None:
            gates = self._shared_gates(backend, self.shared)
            self._gates[backend] = gates
            return gates
        account = account_limiter(backend)
        limiters: list[Limiter] = []
        if not self.limits.unlimited:
            key = _account_key(backend)
            with self._lock:
                limiter = self._compute_limiters.get(key)
                if limiter is None:
                    limiter = Limiter(f"compute {backend.provider}", self.limits)
                    self._compute_limiters[key] = limiter
            limiters.append(limiter)
        own = backend_limiter(backend)
        if own is not None:
            limiters.append(own)
        limiters.append(account)
        gates = Gates(tuple(limiters), account)
        self._gates[backend] = gates
        return gates

    def _shared_gates(self, backend: Any, shared: SharedLimits) -> Gates:
        account_key = _shared_account_key(backend, shared.salt)
        where = f"{backend.provider} {backend.base_url}"
        limiters: list[Limiter] = []
        if not self.limits.unlimited:
            limiters.append(
                shared.limiter("compute", account_key, f"compute {where}", self.limits, False)
            )
        own = _backend_limits(backend)
        if not own.unlimited:
            key = (backend.identity(), backend.credential_fingerprint(shared.salt), own)
            limiters.append(shared.limiter("backend", key, f"backend {where}", own, False))
        account = shared.limiter("account", account_key, f"account {where}", _NO_LIMITS, True)
        limiters.append(account)
        return Gates(tuple(limiters), account)

    def trip(self, account: Limiter, error: BaseException) -> None:
        """An authentication failure on ``account``: its other calls fail fast."""
        if isinstance(error, AuthenticationError):
            with self._lock:
                self._tripped.setdefault(id(account), error)

    def tripped(self, account: Limiter) -> BaseException | None:
        """A copy of the error that tripped ``account``'s breaker in this computation."""
        error = self._tripped.get(id(account))
        if error is None:
            return None
        try:
            return copy.copy(error)
        except Exception:
            return error


_current_run: contextvars.ContextVar[RunLimits | None] = contextvars.ContextVar(
    "feste_run_limits", default=None
)


_shared: contextvars.ContextVar[SharedLimits | None] = contextvars.ContextVar(
    "feste_shared_limits", default=None
)


@contextlib.contextmanager
def shared_limits(shared: SharedLimits | None) -> Iterator[None]:
    """Computations started inside take their limiters from ``shared`` (a cluster's)."""
    token = _shared.set(shared)
    try:
        yield
    finally:
        _shared.reset(token)


_joined: contextvars.ContextVar[RunLimits | None] = contextvars.ContextVar(
    "feste_joined_limits", default=None
)


@contextlib.contextmanager
def joined_scope(scope: RunLimits) -> Iterator[None]:
    """Computations started inside are parts of the one computation ``scope``: they
    share its limits and its circuit breaker (the partitions of a collection mapped by
    :mod:`feste.collections`, each computed on its own, from several threads)."""
    token = _joined.set(scope)
    try:
        yield
    finally:
        _joined.reset(token)


@contextlib.contextmanager
def run_scope() -> Iterator[RunLimits]:
    """Start a computation's limits scope (the context's limits are captured now), or
    enter the computation it is part of (:func:`joined_scope`)."""
    scope = _joined.get() or RunLimits()
    token = _current_run.set(scope)
    try:
        yield scope
    finally:
        _current_run.reset(token)


def run_limits() -> RunLimits:
    """The current computation's scope, or a fresh one (eager calls, Dask workers)."""
    scope = _current_run.get()
    return scope if scope is not None else RunLimits()


def admit_free(limiters: tuple[Limiter, ...], tokens: int) -> list[tuple[Limiter, Ticket]]:
    """Admission from the leading ``limiters`` that admit at once, in order, stopping
    at the first that would make the request wait; :func:`admit` takes the rest."""
    held: list[tuple[Limiter, Ticket]] = []
    for limiter in limiters:
        ticket = limiter.try_acquire(tokens)
        if ticket is None:
            break
        held.append((limiter, ticket))
    return held


async def admit(
    limiters: tuple[Limiter, ...],
    tokens: int,
    priority: float = 0,
    held: list[tuple[Limiter, Ticket]] | None = None,
) -> list[tuple[Limiter, Ticket]]:
    """Acquire every limiter in order; on failure or cancellation release what was held.

    ``held``: the admissions of the first limiters, already taken (:func:`admit_free`).
    """
    held = [] if held is None else held
    try:
        for limiter in limiters[len(held) :]:
            held.append((limiter, await limiter.acquire(tokens, priority)))
    except BaseException:
        release_all(held)
        raise
    return held


def release_all(held: list[tuple[Limiter, Ticket]]) -> None:
    for limiter, ticket in reversed(held):
        limiter.release(ticket)
