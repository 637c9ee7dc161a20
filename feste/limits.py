"""Per-backend limits: requests in flight, requests and tokens per minute, 429 back-off.

Design
------
There is one :class:`Limiter` per backend *identity* (``Backend.identity()``: class,
base URL and settings, never the API key) in the whole process, returned by
:func:`limiter_for`. Every request feste sends goes through it (see
``feste._calls.send``), so a limit holds across every graph computed at the same time,
whichever thread or event loop computes it.

Admission (``ticket = await limiter.acquire(tokens)`` ... ``limiter.release(ticket)``,
or ``async with limiter.admit(tokens)``) waits until all of these allow the request:

* **concurrency**: fewer than the *effective* concurrency limit in flight. It starts at
  ``max_concurrency`` (unlimited when unset) and follows AIMD: a 429 multiplies it by
  0.75 (at most
  once per generation of requests: a 429 from a request admitted before the last
  decrease does not decrease it again), and each success while at least half of it is
  in use raises it by one, back up to ``max_concurrency`` (or, when none is configured,
  without bound);
* **requests per minute**: a token bucket refilled at ``rpm / 60`` per second holding
  at most one second's worth (providers enforce per-minute limits over short windows);
* **tokens per minute**: the same with the request's estimated tokens; the estimate is
  corrected by the usage the provider reports (:meth:`Limiter.succeeded`). A request
  larger than the bucket is admitted when the bucket is full (the bucket goes into
  debt) so that it is never starved;
* **pause**: a 429 with ``Retry-After`` sets a shared pause-until time: nobody is
  admitted before it, whichever call got the 429. Like the decrease, only the first
  429 of a generation pauses; later ones answer requests sent before the reaction
  (the request that got it still waits its own ``Retry-After`` before its retry).

Waiters are served first come, first served. The state is guarded by a
``threading.Lock``; a waiter is an ``asyncio`` future on its own loop, resolved
directly when the grant happens on that loop's thread and through
``loop.call_soon_threadsafe`` otherwise. Waiters blocked by time (rate buckets, pause)
are woken by a timer armed on each loop that has waiters.

Limits come from the backend (``OpenAI(max_concurrency=...)``) or from the context
(``context.set(max_concurrency=...)``), the context winning; :func:`limiter_for` applies
the current values each time it is asked for a backend's limiter.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

from feste import context
from feste.errors import ConfigurationError, OptionError

__all__ = ["Limiter", "Limits", "Ticket", "all_limiters", "limiter_for", "resolve_limits"]

# Each success (while the window is in use) raises the effective concurrency by this
# much, back up to the limit: at most doubling per round of requests, so it recovers
# within a few rounds after a burst of 429s without jumping back at once.
_RECOVERY_STEP = 1.0
# A 429 multiplies the effective concurrency by this. Gentler than halving: a provider
# that sheds a share of requests at random (a common 429 pattern) should not starve
# the run, while a sustained limit still shrinks the window geometrically.
_DECREASE_FACTOR = 0.75


class Limits(NamedTuple):
    """The configured limits of one backend; ``None`` means unlimited."""

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
    __slots__ = ("future", "loop", "ticket", "tokens")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], tokens: int
    ) -> None:
        self.loop = loop
        self.future = future
        self.tokens = tokens
        self.ticket: Ticket | None = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Limiter:
    """Admission control for one backend identity (see the module docstring)."""

    def __init__(self, name: str = "", limits: Limits | None = None) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._waiting_loops: collections.Counter[asyncio.AbstractEventLoop] = collections.Counter()
        self._armed: dict[asyncio.AbstractEventLoop, float] = {}
        self._in_flight = 0
        self._generation = 0
        self._paused_until = 0.0
        self._limits = Limits()
        self._window = float("inf")
        self._requests: _Bucket | None = None
        self._tokens: _Bucket | None = None
        # Counters for diagnostics and tests.
        self._max_in_flight = 0
        self._admitted = 0
        self._rate_limited = 0
        self._decreases = 0
        self.configure(limits or Limits())

    # -- configuration --------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        return self._limits

    def configure(self, limits: Limits) -> None:
        """Apply new limits (from the backend or the context); waiters are re-examined."""
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

    async def acquire(self, tokens: int = 0) -> Ticket:
        """Wait for admission of one request of about ``tokens`` tokens."""
        with self._lock:
            if not self._waiters and self._blocked_for(tokens, time.monotonic()) == 0.0:
                return self._take(tokens)
            loop = asyncio.get_running_loop()
            waiter = _Waiter(loop, loop.create_future(), tokens)
            self._waiters.append(waiter)
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
            if not self._waiters:
                return
            grants, delay = self._grant_locked(time.monotonic())
        self._deliver(grants, delay)

    # -- outcomes -------------------------------------------------------------------

    def succeeded(self, estimated_tokens: int, usage: Any, ticket: Ticket | None = None) -> None:
        """A request succeeded: recover concurrency, correct the token estimate."""
        with self._lock:
            cap = self._limits.max_concurrency
            # Grow only while the window is in use (at least half of it in flight), not
            # while few requests are in flight (a pause, or little demand).
            in_flight = self._in_flight
            if ticket is not None and ticket.released:
                in_flight += 1
            if (cap is None or self._window < cap) and 2 * in_flight >= self._window:
                self._window += _RECOVERY_STEP
                if cap is not None and self._window > cap:
                    self._window = max(1.0, float(cap))
            refund = 0.0
            if self._tokens is not None and usage is not None:
                used = getattr(usage, "total_tokens", None)
                if isinstance(used, int):
                    refund = estimated_tokens - used
                    bucket = self._tokens
                    bucket.level = min(bucket.capacity, bucket.level + refund)
            if not self._waiters:
                return
            grants, delay = self._grant_locked(time.monotonic())
        self._deliver(grants, delay)

    def rate_limited(self, retry_after: float | None, ticket: Ticket | None = None) -> None:
        """A request got a 429: pause everyone for ``retry_after`` and shrink concurrency."""
        now = time.monotonic()
        with self._lock:
            self._rate_limited += 1
            if ticket is None or ticket.generation == self._generation:
                # Only the first 429 of a generation pauses and shrinks: the others
                # answer requests sent before the limiter reacted, and counting them
                # again would stall a backend that merely sheds some load.
                if retry_after is not None and retry_after > 0:
                    self._paused_until = max(self._paused_until, now + retry_after)
                # The number in flight when the 429 came, this request included.
                in_flight = self._in_flight
                if ticket is None or ticket.released:
                    in_flight += 1
                base = min(self._window, float(in_flight))
                self._window = max(1.0, base * _DECREASE_FACTOR)
                self._generation += 1
                self._decreases += 1

    # -- diagnostics ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """In flight now and at most, admitted and rate-limited counts, current window."""
        with self._lock:
            return {
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "waiting": len(self._waiters),
                "admitted": self._admitted,
                "rate_limited": self._rate_limited,
                "decreases": self._decreases,
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
        return Ticket(tokens, self._generation)

    def _forget(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        self._uncount(waiter.loop)

    def _uncount(self, loop: asyncio.AbstractEventLoop) -> None:
        self._waiting_loops[loop] -= 1
        if self._waiting_loops[loop] <= 0:
            del self._waiting_loops[loop]

    def _grant_locked(self, now: float) -> tuple[list[_Waiter], float | None]:
        """Admit waiters in arrival order; return them and the delay of a time-based block."""
        granted: list[_Waiter] = []
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.cancelled():
                self._waiters.popleft()
                self._uncount(waiter.loop)
                continue
            wait = self._blocked_for(waiter.tokens, now)
            if wait is None:
                return granted, None
            if wait > 0.0:
                return granted, wait
            self._waiters.popleft()
            self._uncount(waiter.loop)
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


_registry: dict[str, Limiter] = {}
_registry_lock = threading.Lock()
_identities: weakref.WeakKeyDictionary[Any, tuple[dict[str, Any], str]] = (
    weakref.WeakKeyDictionary()
)


def _identity(backend: Any) -> str:
    """``backend.identity()``, remembered while the backend's public settings are unchanged.

    Computing the identity tokenizes the backend's settings (about 10 us); every request
    needs it, so it is kept per backend object and recomputed only when a public
    attribute (or the client object) changed since.
    """
    state = {name: value for name, value in vars(backend).items() if not name.startswith("_")}
    state["_client"] = id(getattr(backend, "_client", None))
    try:
        remembered = _identities.get(backend)
    except TypeError:  # not weak-referenceable or not hashable
        return str(backend.identity())
    if remembered is not None and remembered[0] == state:
        return remembered[1]
    identity = str(backend.identity())
    _identities[backend] = (state, identity)
    return identity


def resolve_limits(backend: Any) -> Limits:
    """The limits that apply to ``backend``'s calls now: the context's value of each
    limit when set, else the backend's own (both checked by the context's rules)."""
    values = []
    for name in Limits._fields:
        value = context.get(name)
        values.append(value if value is not None else getattr(backend, name, None))
    return Limits(*values)


def limiter_for(backend: Any) -> Limiter:
    """The process-wide limiter of ``backend``'s identity, set to the current limits.

    Limits set with ``context.set`` win over the backend's own attributes.
    """
    limits = resolve_limits(backend)
    identity = _identity(backend)
    limiter = _registry.get(identity)
    if limiter is None:
        with _registry_lock:
            limiter = _registry.get(identity)
            if limiter is None:
                provider = getattr(backend, "provider", type(backend).__name__)
                name = f"{provider} {getattr(backend, 'base_url', '')}".strip()
                limiter = Limiter(name, limits)
                _registry[identity] = limiter
    if limiter.limits != limits:
        limiter.configure(limits)
    return limiter


def all_limiters() -> dict[str, Limiter]:
    """Every limiter created so far, by backend identity (for diagnostics)."""
    with _registry_lock:
        return dict(_registry)
