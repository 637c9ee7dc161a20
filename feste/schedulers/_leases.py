"""Cluster-wide limits: workers lease concurrency and rate budgets from the scheduler.

Design
------
A limit that holds per process lets ``n`` workers send ``n`` times the cap. Here the
budget of each shared scope lives in one place, a :class:`LeaseBoard` plugin on the
Dask scheduler (distributed's own coordination point; no server of ours), and each
worker process holds a *lease* of it (:class:`Lease`, a :class:`feste.limits.Quota`)
that its local :class:`~feste.limits.Limiter` admits through:

* **concurrency slots** are leased in bulk: a worker asks for as many as it has
  requests waiting, keeps them while it uses them, and gives back the ones it does not
  need in one message. When another worker is short of slots, the board says so and
  every holder gives back what it holds above its fair share (the cap divided among
  the workers that want slots) as its requests finish;
* **requests and tokens per minute** are buckets on the board, granted in bulk as
  permits the worker spends;
* **a provider's pause** (an overload 429 with ``Retry-After``) is reported to the
  board and handed to every worker with its next answer; a worker with requests in
  flight talks to the board at least every :data:`HEARTBEAT` seconds.

So the coordination cost is a message per burst of requests and a heartbeat, not a
round trip per request. A worker that dies gives its leases back (the board's
``remove_worker`` hook). Budgets of one computation (``max_concurrency=`` in the
context or the compute keywords) are pools named after the run and dropped when it
ends; a backend's own limits and an account's pause are pools of their own, shared by
every run on the cluster.

What stays per worker: the account's overload window (the adaptive concurrency that
reacts to 429s) and the authentication circuit breaker of a computation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from feste.limits import Limiter, Limits, Quota, SharedLimits, shared_limits

__all__ = ["BOARD_NAME", "HEARTBEAT", "Lease", "LeaseBoard", "WorkerLimits", "worker_quotas"]

BOARD_NAME = "feste-leases"
#: A worker with admissions in flight talks to the board at least this often (seconds).
HEARTBEAT = 0.05
# A worker short of slots asks again after this long (seconds).
_RETRY = 0.005
# A holder that asked for slots and got fewer counts as short for this long (seconds).
_SHORT_FOR = 0.25


# -- on the scheduler ------------------------------------------------------------------


class _Bucket:
    """Permits refilled at ``per_minute / 60`` a second, holding one second's worth."""

    def __init__(self, per_minute: float) -> None:
        self.per_second = per_minute / 60.0
        self.capacity = max(1.0, self.per_second)
        self.level = self.capacity
        self.updated = time.monotonic()

    def take(self, wanted: float, now: float, whole: bool) -> float:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = now
        if wanted <= 0:
            return 0.0
        if whole:
            granted = float(min(math.floor(self.level), math.ceil(wanted)))
        elif self.level >= min(wanted, self.capacity):
            granted = wanted  # a request larger than the bucket goes when it is full
        else:
            granted = 0.0
        granted = max(0.0, granted)
        self.level -= granted
        return granted


class _Pool:
    """One shared budget: slots held per worker, permit buckets, the pause."""

    def __init__(self, limits: Limits) -> None:
        self.cap = limits.max_concurrency
        self.held: dict[str, int] = {}
        self.short: dict[str, float] = {}
        self.requests = (
            None if limits.requests_per_minute is None else _Bucket(limits.requests_per_minute)
        )
        self.tokens = (
            None if limits.tokens_per_minute is None else _Bucket(limits.tokens_per_minute)
        )
        self.paused_until = 0.0
        self.max_held = 0

    def lease(
        self,
        holder: str,
        want_slots: int,
        returned_slots: int,
        want_requests: int,
        want_tokens: float,
        pause: float,
    ) -> dict[str, Any]:
        now = time.monotonic()
        if pause > 0:
            self.paused_until = max(self.paused_until, now + pause)
        held = max(0, self.held.get(holder, 0) - returned_slots)
        paused_for = max(0.0, self.paused_until - now)
        for name, since in list(self.short.items()):
            if now - since > _SHORT_FOR:
                del self.short[name]
        others_short = any(name != holder for name in self.short)
        granted_slots = 0
        share = self.cap
        if self.cap is not None:
            active = {name for name, count in self.held.items() if count > 0}
            active.update(self.short)
            active.add(holder)
            share = max(1, -(-self.cap // len(active)))
            if want_slots > 0 and not paused_for:
                free = self.cap - (sum(self.held.values()) - self.held.get(holder, 0) + held)
                limit = max(0, share - held) if others_short else want_slots
                granted_slots = max(0, min(want_slots, free, limit))
                if granted_slots < want_slots:
                    self.short[holder] = now
                else:
                    self.short.pop(holder, None)
        held += granted_slots
        if held:
            self.held[holder] = held
        else:
            self.held.pop(holder, None)
        self.max_held = max(self.max_held, sum(self.held.values()))
        granted_requests = 0.0
        granted_tokens = 0.0
        if not paused_for:
            if self.requests is not None:
                granted_requests = self.requests.take(want_requests, now, whole=True)
            if self.tokens is not None:
                granted_tokens = self.tokens.take(want_tokens, now, whole=False)
        return {
            "slots": granted_slots,
            "requests": int(granted_requests),
            "tokens": granted_tokens,
            "share": share,
            "contended": bool(self.short) and any(name != holder for name in self.short),
            "paused_for": paused_for,
        }

    def drop(self, holder: str) -> None:
        self.held.pop(holder, None)
        self.short.pop(holder, None)


class LeaseBoard:
    """A Dask scheduler plugin holding the shared budgets (see the module docstring).

    Registered by the cluster scheduler on each client it runs on (idempotent by
    name); it adds the ``feste_lease``, ``feste_forget`` and ``feste_board`` handlers to
    the scheduler.
    """

    name = BOARD_NAME
    idempotent = True

    def __init__(self) -> None:
        self.pools: dict[str, _Pool] = {}

    # SchedulerPlugin hooks (duck-typed: distributed calls what is there).
    async def start(self, scheduler: Any) -> None:
        scheduler.handlers["feste_lease"] = self.lease
        scheduler.handlers["feste_forget"] = self.forget
        scheduler.handlers["feste_board"] = self.describe

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        for pool in self.pools.values():
            pool.drop(worker)

    # Handlers.
    def lease(
        self,
        pool: str,
        limits: tuple[Any, ...],
        holder: str,
        want_slots: int = 0,
        returned_slots: int = 0,
        want_requests: int = 0,
        want_tokens: float = 0.0,
        pause: float = 0.0,
    ) -> dict[str, Any]:
        found = self.pools.get(pool)
        if found is None:
            found = self.pools[pool] = _Pool(Limits(*limits))
        return found.lease(holder, want_slots, returned_slots, want_requests, want_tokens, pause)

    def forget(self, prefix: str) -> int:
        names = [name for name in self.pools if name.startswith(prefix)]
        for name in names:
            del self.pools[name]
        return len(names)

    def describe(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"held": dict(pool.held), "max_held": pool.max_held, "cap": pool.cap}
            for name, pool in self.pools.items()
        }

    # Client side.
    @staticmethod
    def register(client: Any) -> bytes:
        """Make sure ``client``'s scheduler has the board; return the client's salt.

        The salt fingerprints credentials alike on every worker (pool names hold such
        fingerprints, never a key); one per client, so its runs share backend pools.
        """
        salt = _registered.get(client)
        if salt is None:
            client.register_plugin(_scheduler_plugin(), name=BOARD_NAME)
            salt = _registered[client] = os.urandom(16)
        return salt

    @staticmethod
    def forget_run(client: Any, run_id: str) -> None:
        """Drop the pools of one computation (called when it ends)."""
        with contextlib.suppress(Exception):
            client.sync(_forget, client, f"compute:{run_id}:")


async def _forget(client: Any, prefix: str) -> None:
    await client.scheduler.feste_forget(prefix=prefix)


_registered: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def _scheduler_plugin() -> Any:
    """A :class:`LeaseBoard` that is a ``SchedulerPlugin`` (distributed imported late:
    importing feste must not import distributed)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class _Board(LeaseBoard, SchedulerPlugin):
        pass

    return _Board()


# -- on a worker -------------------------------------------------------------------------


class Lease(Quota):
    """This worker's lease of one pool of the board (see the module docstring)."""

    def __init__(self, pool: str, limits: Limits, holder: str, worker: Any) -> None:
        self.pool = pool
        self.limits = limits
        self.holder = holder
        self.worker = worker
        self._lock = threading.Lock()
        self._limiter: Limiter | None = None
        self.held = 0
        self.used = 0
        self.requests = 0
        self.tokens = 0.0
        self.demand = 0
        self.blocked_tokens = 0
        self.paused_until = 0.0
        self.pause_to_send = 0.0
        self.share = limits.max_concurrency
        self.contended = False
        self._syncing = False
        self._again = False
        self.messages = 0

    # -- Quota (called with the limiter's lock held) -------------------------------------

    def attach(self, limiter: Limiter) -> None:
        self._limiter = limiter

    def wait(self, tokens: int, demand: int, now: float) -> float | None:
        with self._lock:
            self.demand = demand
            if now < self.paused_until:
                return self.paused_until - now
            short = False
            if self.limits.max_concurrency is not None and self.used >= self.held:
                short = True
            if self.limits.requests_per_minute is not None and self.requests < 1:
                short = True
            if self.limits.tokens_per_minute is not None and tokens > 0:
                capacity = max(1.0, self.limits.tokens_per_minute / 60.0)
                if self.tokens < min(float(tokens), capacity):
                    self.blocked_tokens = tokens
                    short = True
            if not short:
                return 0.0
        self._start_sync()
        return None

    def taken(self, tokens: int) -> None:
        with self._lock:
            self.used += 1
            if self.limits.requests_per_minute is not None:
                self.requests -= 1
            if self.limits.tokens_per_minute is not None:
                self.tokens -= tokens

    def returned(self, demand: int) -> None:
        with self._lock:
            self.used -= 1
            self.demand = demand
            surplus = self._surplus()
        if surplus:
            self._start_sync()

    def paused(self, seconds: float) -> None:
        with self._lock:
            self.pause_to_send = max(self.pause_to_send, seconds)
            self.paused_until = max(self.paused_until, time.monotonic() + seconds)
        self._start_sync()

    # -- talking to the board --------------------------------------------------------------

    def _surplus(self) -> int:
        if self.limits.max_concurrency is None:
            return 0
        keep = max(self.used, min(self.demand, self.limits.max_concurrency))
        if self.contended and self.share is not None:
            keep = max(self.used, min(keep, self.share))
        return max(0, self.held - keep)

    def _start_sync(self) -> None:
        with self._lock:
            if self._syncing:
                self._again = True
                return
            self._syncing = True
            self._again = False
        try:
            asyncio.run_coroutine_threadsafe(self._sync(), self.worker.loop.asyncio_loop)
        except RuntimeError:  # the worker is closing
            with self._lock:
                self._syncing = False

    def _message(self) -> dict[str, Any]:
        cap = self.limits.max_concurrency
        message: dict[str, Any] = {
            "pool": self.pool,
            "limits": tuple(self.limits),
            "holder": self.holder,
        }
        if cap is not None:
            wanted = max(0, min(self.demand, cap) - self.held)
            message["want_slots"] = wanted
            returned = self._surplus()
            message["returned_slots"] = returned
            self.held -= returned
        waiting = max(0, self.demand - self.used)
        if self.limits.requests_per_minute is not None:
            message["want_requests"] = max(0, waiting - self.requests)
        if self.limits.tokens_per_minute is not None and waiting:
            message["want_tokens"] = max(0.0, self.blocked_tokens * waiting - self.tokens)
        if self.pause_to_send:
            message["pause"] = self.pause_to_send
            self.pause_to_send = 0.0
        return message

    def _apply(self, answer: dict[str, Any]) -> None:
        self.held += int(answer["slots"])
        self.requests += int(answer["requests"])
        self.tokens += float(answer["tokens"])
        self.share = answer["share"]
        self.contended = bool(answer["contended"])
        paused_for = float(answer["paused_for"])
        if paused_for > 0:
            self.paused_until = max(self.paused_until, time.monotonic() + paused_for)

    def _next_wait(self) -> float | None:
        """Seconds until the next message to the board, or None when there is no need."""
        if self.pause_to_send or self._surplus():
            return 0.0
        short = self.demand > self.used and (
            (self.limits.max_concurrency is not None and self.held <= self.used)
            or (self.limits.requests_per_minute is not None and self.requests < 1)
            or (self.limits.tokens_per_minute is not None and self.blocked_tokens > self.tokens)
        )
        if short:
            return _RETRY
        if self._again:
            return 0.0
        if self.used > 0 or self.held > 0:
            return HEARTBEAT
        return None

    async def _sync(self) -> None:
        """Runs on the worker's event loop: one message at a time, until idle."""
        try:
            while True:
                with self._lock:
                    self._again = False
                    message = self._message()
                self.messages += 1
                answer = await self.worker.scheduler.feste_lease(**message)
                with self._lock:
                    self._apply(answer)
                if self._limiter is not None:
                    self._limiter.wake()
                with self._lock:
                    delay = self._next_wait()
                    if delay is None:
                        self._syncing = False
                        return
                if delay:
                    await asyncio.sleep(delay)
        except BaseException:
            with self._lock:
                self._syncing = False
            raise


def _pool_name(scope: str, key: tuple[Any, ...], run_id: str) -> str:
    """A pool's name on the board: the scope, the run for a computation's own limits,
    and a digest of the key (which may hold credential fingerprints and headers)."""
    digest = hashlib.sha256(repr(key).encode("utf-8", "replace")).hexdigest()[:24]
    if scope == "compute":
        return f"compute:{run_id}:{digest}"
    return f"{scope}:{digest}"


# Per worker process: pool name -> its limiter (admitting through its lease).
_limiters: dict[str, Limiter] = {}
_limiters_lock = threading.Lock()
_runs_here: dict[str, int] = {}


class WorkerLimits(SharedLimits):
    """The limiters of a cluster run on one worker: one per pool, shared by its blocks."""

    def __init__(self, run_id: str, worker: Any, salt: bytes) -> None:
        self.run_id = run_id
        self.worker = worker
        self.salt = salt

    def limiter(
        self, scope: str, key: tuple[Any, ...], name: str, limits: Limits, adaptive: bool
    ) -> Limiter:
        pool = _pool_name(scope, (key, tuple(limits)), self.run_id)
        with _limiters_lock:
            limiter = _limiters.get(pool)
            if limiter is None:
                lease = Lease(pool, limits, self.worker.address, self.worker)
                # Locally unlimited: the lease enforces the limits, cluster-wide.
                limiter = _limiters[pool] = Limiter(name, None, adaptive=adaptive, quota=lease)
            return limiter


def _worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


@contextlib.contextmanager
def worker_quotas(salt: bytes, run_id: str) -> Iterator[None]:
    """Inside, computations take cluster-wide limiters (on a Dask worker; elsewhere,
    for example a block run in the client's process by a test, per-process ones)."""
    worker = _worker()
    if worker is None or not salt:
        yield
        return
    with _limiters_lock:
        _runs_here[run_id] = _runs_here.get(run_id, 0) + 1
    try:
        with shared_limits(WorkerLimits(run_id, worker, salt)):
            yield
    finally:
        with _limiters_lock:
            _runs_here[run_id] -= 1
            if not _runs_here[run_id]:
                del _runs_here[run_id]
                prefix = f"compute:{run_id}:"
                for name in [name for name in _limiters if name.startswith(prefix)]:
                    del _limiters[name]
