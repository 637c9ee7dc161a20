"""What the sender uses: keys for calls, bulk lookups and durable writes, run scopes.

Design
------
:func:`calls_cache` gives the sender (:mod:`feste._calls`) a :class:`CallCache` for the
current context, or None when caching is off. For a group of calls (one item, or the
items of a batch) the sender asks for their keys, looks them all up at once, sends only
the misses, and stores what came back before handing any value on.

**Bulk on the event loop.** Lookups and writes are blocking database work; they run in
a small thread pool per store, never on the event loop. On a loop, every lookup made
in the same turn of the loop (the async engine starts thousands of calls in one turn)
is merged into one ``get_many`` query, and writes are group-committed: while one
``put_many`` runs, new entries gather and go in the next one. Each caller still waits
for the transaction holding its own entries, so a value is durable before it is used.

**Run scope.** Calls made with ``pure=False`` are cached only inside a named run:
their key adds the run's name and the call's occurrence number (the first such call
with this content in this execution is 0, the next 1...), so re-running the run
(after a crash) replays each answer once, in order, and another run never sees them.
``feste.compute`` makes a fresh :class:`RunScope` per execution; a process that gets
the ``run`` option without one (a worker process) keeps one per run name.

**Counting.** A :class:`CacheTally` in the context counts hits and sent calls for the
run record.

**Plain tasks.** ``feste_task(pure=True)`` nodes run :class:`PureTask`, which looks the
task up synchronously where it runs (a worker thread or process) and stores a miss's
result before returning it.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from feste import context
from feste.backend.base import Backend
from feste.cache._codec import decode, encode
from feste.cache._open import active_store
from feste.cache.base import CacheEntry, CacheStore
from feste.cache.keys import call_key, task_key
from feste.errors import CacheError

__all__ = [
    "CacheTally",
    "CallCache",
    "MISSING",
    "PureTask",
    "RunScope",
    "calls_cache",
    "current_scope",
    "current_tally",
    "lookup_task",
    "store_task",
]

_THREADS_PER_STORE = 4


class CacheTally:
    """Calls answered from the cache and calls sent, counted from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = 0
        self.sent = 0
        self.stored = 0

    def add(self, hits: int = 0, sent: int = 0, stored: int = 0) -> None:
        with self._lock:
            self.hits += hits
            self.sent += sent
            self.stored += stored


class RunScope:
    """One execution of a named run: numbers the ``pure=False`` calls of each content."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}

    def scope_of(self, base_key: str) -> dict[str, Any]:
        with self._lock:
            occurrence = self._seen.get(base_key, 0)
            self._seen[base_key] = occurrence + 1
        return {"run": self.name, "occurrence": occurrence}


current_tally: contextvars.ContextVar[CacheTally | None] = contextvars.ContextVar(
    "feste_cache_tally", default=None
)
current_scope: contextvars.ContextVar[RunScope | None] = contextvars.ContextVar(
    "feste_run_scope", default=None
)

_process_scopes: dict[str, RunScope] = {}
_process_scopes_lock = threading.Lock()


def _run_scope() -> RunScope | None:
    name = context.get("run")
    if name is None:
        return None
    scope = current_scope.get()
    if scope is not None and scope.name == name:
        return scope
    with _process_scopes_lock:
        scope = _process_scopes.get(name)
        if scope is None:
            scope = _process_scopes[name] = RunScope(name)
        return scope


# -- bulk work off the event loop -------------------------------------------------------

_executors: weakref.WeakKeyDictionary[CacheStore, tuple[int, ThreadPoolExecutor]] = (
    weakref.WeakKeyDictionary()
)
_executors_lock = threading.Lock()


def _executor(store: CacheStore) -> ThreadPoolExecutor:
    with _executors_lock:
        entry = _executors.get(store)
        if entry is None or entry[0] != os.getpid():
            executor = ThreadPoolExecutor(_THREADS_PER_STORE, thread_name_prefix="feste-cache")
            entry = _executors[store] = (os.getpid(), executor)
        return entry[1]


class _LoopBatcher:
    """Merges the lookups and writes of one store made on one event loop."""

    def __init__(self, store: CacheStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self.gets: list[tuple[Sequence[str], asyncio.Future[dict[str, str]]]] = []
        self.puts: list[tuple[Sequence[CacheEntry], asyncio.Future[None]]] = []
        self.get_scheduled = False
        self.put_running = False

    async def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        future: asyncio.Future[dict[str, str]] = self.loop.create_future()
        self.gets.append((keys, future))
        if not self.get_scheduled:
            self.get_scheduled = True
            # After the other calls started in this turn of the loop have asked too.
            self.loop.call_soon(self._flush_gets)
        return await future

    def _flush_gets(self) -> None:
        self.get_scheduled = False
        waiting, self.gets = self.gets, []
        keys = list(dict.fromkeys(key for asked, _ in waiting for key in asked))
        done = _executor(self.store).submit(self.store.get_many, keys)
        self._when_done(done, waiting)

    async def put_many(self, entries: Sequence[CacheEntry]) -> None:
        future: asyncio.Future[None] = self.loop.create_future()
        self.puts.append((entries, future))
        if not self.put_running:
            self.put_running = True
            self.loop.call_soon(self._flush_puts)
        # Shielded: a caller cancelled meanwhile does not withdraw entries already queued.
        await asyncio.shield(future)

    def _flush_puts(self) -> None:
        waiting, self.puts = self.puts, []
        entries = [entry for queued, _ in waiting for entry in queued]
        done = _executor(self.store).submit(self.store.put_many, entries)
        self._when_done(done, waiting, then=self._after_put)

    def _after_put(self) -> None:
        if self.puts:
            self._flush_puts()
        else:
            self.put_running = False

    def _when_done(
        self,
        done: ConcurrentFuture[Any],
        waiting: Sequence[tuple[Any, asyncio.Future[Any]]],
        then: Callable[[], None] | None = None,
    ) -> None:
        def settle(outcome: ConcurrentFuture[Any]) -> None:
            error = outcome.exception()
            for _, future in waiting:
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(outcome.result())
            if then is not None:
                then()

        def from_worker(outcome: ConcurrentFuture[Any]) -> None:
            try:
                self.loop.call_soon_threadsafe(settle, outcome)
            except RuntimeError:  # the loop closed meanwhile: nobody is waiting
                pass

        done.add_done_callback(from_worker)


_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, _LoopBatcher]] = (
    weakref.WeakKeyDictionary()
)


def _batcher(store: CacheStore) -> _LoopBatcher:
    loop = asyncio.get_running_loop()
    per_store = _batchers.get(loop)
    if per_store is None:
        per_store = _batchers[loop] = {}
    batcher = per_store.get(id(store))
    if batcher is None or batcher.store is not store:
        batcher = per_store[id(store)] = _LoopBatcher(store, loop)
    return batcher


# -- the sender's view --------------------------------------------------------------------


class CallCache:
    """The cache as the sender sees it, for the current context."""

    def __init__(self, store: CacheStore, scope: RunScope | None, tally: CacheTally | None):
        self.store = store
        self.scope = scope
        self.tally = tally

    def keys(
        self,
        backend: Backend,
        method: str,
        items: Sequence[Any],
        params: Mapping[str, Any],
        *,
        pure: bool,
    ) -> list[str | None]:
        """A key per item; None for a ``pure=False`` call outside a named run (never
        cached)."""
        if pure:
            return [call_key(backend, method, item, params) for item in items]
        if self.scope is None:
            return [None] * len(items)
        scope = self.scope
        return [
            call_key(
                backend,
                method,
                item,
                params,
                scope=scope.scope_of(call_key(backend, method, item, params)),
            )
            for item in items
        ]

    async def lookup(self, keys: Sequence[str | None]) -> dict[str, Any]:
        """The cached values of those of ``keys`` that are stored (decoded)."""
        wanted = [key for key in keys if key is not None]
        if not wanted:
            return {}
        texts = await _batcher(self.store).get_many(wanted)
        found = {key: decode(texts[key]) for key in wanted if key in texts}
        if self.tally is not None:
            self.tally.add(hits=sum(1 for key in wanted if key in found))
        return found

    def sent(self, count: int) -> None:
        if self.tally is not None and count:
            self.tally.add(sent=count)

    async def store_values(
        self,
        backend: Backend,
        method: str,
        params: Mapping[str, Any],
        pairs: Sequence[tuple[str, Any]],
        *,
        pure: bool,
    ) -> None:
        """Store ``(key, value)`` pairs; returns once they are committed."""
        if not pairs:
            return
        label = f"{backend.provider}.{method}"
        model = params.get("model")
        if isinstance(model, str):
            label = f"{label} {model}"
        run = None if pure or self.scope is None else self.scope.name
        entries = []
        for key, value in pairs:
            try:
                text = encode(value)
            except (TypeError, ValueError) as error:
                raise CacheError(
                    f"the result of {backend.provider}.{method} cannot be stored in the cache "
                    f"{self.store.location}: {error}"
                ) from None
            entries.append(CacheEntry(key, text, label, run))
        await _batcher(self.store).put_many(entries)
        if self.tally is not None:
            self.tally.add(stored=len(entries))


def calls_cache() -> CallCache | None:
    """The sender's cache for the current context; None when caching is off."""
    store = active_store()
    if store is None:
        return None
    return CallCache(store, _run_scope(), current_tally.get())


# -- plain Python tasks (synchronous, in the worker that runs them) ----------------------


def lookup_task(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[CacheStore | None, str | None, Any]:
    """``(store, key, value)`` for a pure task: value is the cached one when key is in
    the store, else :data:`MISSING`; store is None when caching is off."""
    store = active_store()
    if store is None:
        return None, None, MISSING
    key = task_key(func, args, kwargs)
    texts = store.get_many([key])
    tally = current_tally.get()
    if key in texts:
        if tally is not None:
            tally.add(hits=1)
        return store, key, decode(texts[key])
    return store, key, MISSING


def store_task(store: CacheStore, key: str, func: Callable[..., Any], value: Any) -> None:
    """Store a pure task's result (committed on return)."""
    name = getattr(func, "__qualname__", repr(func))
    try:
        text = encode(value)
    except (TypeError, ValueError) as error:
        raise CacheError(
            f"the result of feste task {name} cannot be stored in the cache {store.location}: "
            f"{error} (return JSON-like data from a cached task, or make it pure=False)"
        ) from None
    store.put_many([CacheEntry(key, text, f"task {name}")])
    tally = current_tally.get()
    if tally is not None:
        tally.add(stored=1)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Hashable = _Missing()


class PureTask:
    """The function of a ``feste_task(pure=True)`` node: looks its result up first.

    With a cache on, the call's key (:func:`~feste.cache.keys.task_key`: the function's
    code and the argument values) is looked up where the task runs, in whichever
    thread or process that is; a miss runs the function and stores its result before
    returning it. With no cache it only calls the function.
    """

    __slots__ = ("func",)

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func

    @property
    def __name__(self) -> str:  # graph keys, reprs and dask's funcname()
        return str(getattr(self.func, "__name__", type(self.func).__name__))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        store, key, value = lookup_task(self.func, args, kwargs)
        if value is not MISSING:
            return value
        value = self.func(*args, **kwargs)
        if store is not None and key is not None:
            store_task(store, key, self.func, value)
        return value

    def __reduce__(self) -> tuple[Any, ...]:
        return (PureTask, (self.func,))

    def __repr__(self) -> str:
        return f"<cached {self.__name__}>"
