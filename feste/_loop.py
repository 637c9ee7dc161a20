"""Running coroutines from synchronous code, and closing what lives on event loops.

Backend calls are coroutines. Synchronous callers (eager mode, the ``sync``, ``threads``
and ``processes`` schedulers, ``feste.compute`` itself) reach them through
:func:`run_sync`, which keeps one event loop per thread alive between calls so that HTTP
connection pools are reused instead of rebuilt for every request. When the calling
thread already runs a loop (Jupyter), the coroutine runs on a private background thread
and the caller waits for it.

Which loop: the ``event_loop`` option (:mod:`feste.context`) picks the kind of the loops
feste makes. ``"auto"`` (the default) makes uvloop loops where uvloop is installed
(``pip install 'feste[fast]'``: its loop and socket transports are written in C, which
cuts the client's CPU per request) unless the application installed an event loop
policy of its own, which is then respected; ``"uvloop"`` requires uvloop;
``"asyncio"`` makes the loops asyncio's policy makes, as feste always did. A thread
keeps one loop per kind.

Lifetime: connection pools belong to the loop they were opened on. Whoever opens one
registers a closer with :func:`on_loop_close`; :func:`close_loop_resources` awaits the
closers for one loop. They run

* when a thread that used :func:`run_sync` ends: its loop is retired (a finalizer on an
  object only that thread's locals hold) and closed, resources first, by the next
  :func:`run_sync` call in any thread, or at exit;
* when a loop feste does not own shuts down its async generators, as ``asyncio.run``
  and ``asyncio.Runner`` do before closing it: :func:`watch_loop_shutdown` parks an
  async generator on the running loop whose ``finally`` awaits the closers;
* at interpreter exit, for every loop feste made.

:func:`schedule_close` starts a closer on a loop from any thread without waiting
(finalizers use it), and :func:`close_on_loop` / :func:`aclose_on_loop` close on a
given loop from synchronous or asynchronous code, waiting where that is possible.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import signal
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from feste import context
from feste.errors import ConfigurationError

try:  # optional: the "fast" extra
    import uvloop
except ImportError:  # pragma: no cover - exercised where uvloop is not installed
    uvloop = None  # type: ignore[assignment]

__all__ = [
    "aclose_on_loop",
    "close_loop_resources",
    "close_on_loop",
    "loop_kind",
    "new_loop",
    "on_loop_close",
    "run_on_shared_loop",
    "run_sync",
    "schedule_close",
    "watch_loop_shutdown",
]

T = TypeVar("T")

Closer = Callable[[], Awaitable[Any]]

_local = threading.local()
# Every loop feste made and has not closed yet (closed at exit).
_own_loops: set[asyncio.AbstractEventLoop] = set()
_own_loops_lock = threading.Lock()
# Loops of threads that ended, waiting to be closed by the next run_sync caller.
_retired_loops: list[asyncio.AbstractEventLoop] = []
_loop_closers: list[Callable[[asyncio.AbstractEventLoop], Awaitable[None]]] = []
# Closers started by schedule_close, kept referenced until they finish.
_closing: set[asyncio.Task[Any]] = set()
# Per loop with feste resources, the async generator that closes them at its shutdown.
_shutdown_watchers: dict[asyncio.AbstractEventLoop, Any] = {}
_watchers_lock = threading.Lock()
# How long closing on a loop that runs in another thread may take before we give up.
_CLOSE_WAIT = 10.0


def on_loop_close(closer: Callable[[asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    """Register ``closer(loop)``, awaited before a loop with feste resources closes.

    Transports use it to close the connection pools they opened on that loop.
    """
    _loop_closers.append(closer)


async def close_loop_resources(loop: asyncio.AbstractEventLoop) -> None:
    """Await every registered closer for ``loop``, and the closes already started on it.

    Errors are ignored: the loop is shutting down. Code that runs backend calls on a
    loop it closes itself without ``loop.shutdown_asyncgens()`` should await this first.
    """
    for closer in list(_loop_closers):
        try:
            await closer(loop)
        except Exception:
            pass
    started = [task for task in list(_closing) if task.get_loop() is loop]
    if started:
        await asyncio.gather(*started, return_exceptions=True)


# -- loops that feste does not own -----------------------------------------------------


async def _close_resources_at_shutdown(loop: asyncio.AbstractEventLoop) -> AsyncIterator[None]:
    """Parked on ``loop`` until the loop closes its async generators, then closes."""
    try:
        yield
    finally:
        with _watchers_lock:
            _shutdown_watchers.pop(loop, None)
        await close_loop_resources(loop)


async def watch_loop_shutdown() -> None:
    """Close the running loop's feste resources when the loop shuts down.

    ``asyncio.run`` (and ``asyncio.Runner``, and feste's own loops) call
    ``loop.shutdown_asyncgens()`` before closing a loop; the generator parked here is
    then closed, and its ``finally`` awaits :func:`close_loop_resources`. Cheap after
    the first call on a loop.
    """
    loop = asyncio.get_running_loop()
    if loop in _shutdown_watchers:
        return
    watcher = _close_resources_at_shutdown(loop)
    with _watchers_lock:
        if loop in _shutdown_watchers:
            return
        # A loop closed without shutting down its generators never ran its watcher.
        for stale in [old for old in _shutdown_watchers if old.is_closed()]:
            del _shutdown_watchers[stale]
        _shutdown_watchers[loop] = watcher
    # The first step registers the generator with the running loop (its asyncgen hooks).
    await watcher.__anext__()


# -- closing on a given loop ---------------------------------------------------------------


async def _await(close: Closer) -> None:
    await close()


def _start_close(loop: asyncio.AbstractEventLoop, close: Closer) -> None:
    task = loop.create_task(_await(close))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def schedule_close(loop: asyncio.AbstractEventLoop, close: Closer) -> None:
    """Start ``close()`` on ``loop`` from any thread, without waiting for it.

    Safe in finalizers. An idle loop runs it when it next runs, at the latest when it
    shuts down; on a closed loop nothing can run and nothing happens.
    """
    if loop.is_closed():
        return
    try:
        loop.call_soon_threadsafe(_start_close, loop, close)
    except RuntimeError:  # closed in the meantime
        pass


def close_on_loop(loop: asyncio.AbstractEventLoop, close: Closer) -> None:
    """Run ``close()`` on ``loop`` from synchronous code, waiting for it where possible.

    It waits when ``loop`` is this thread's idle feste loop (run here) or runs in
    another thread; when ``loop`` runs this very code, or is idle and someone else's,
    the close is only started (:func:`schedule_close`).
    """
    if loop.is_closed():
        return
    if loop.is_running():
        if _running_loop() is loop:
            schedule_close(loop, close)
            return
        future = asyncio.run_coroutine_threadsafe(_await(close), loop)
        future.result(_CLOSE_WAIT)
        return
    if loop in _thread_loops().values() and _running_loop() is None:
        loop.run_until_complete(_await(close))
        return
    schedule_close(loop, close)


async def aclose_on_loop(loop: asyncio.AbstractEventLoop, close: Closer) -> None:
    """Run ``close()`` on ``loop`` from a coroutine, waiting for it where possible."""
    if loop.is_closed():
        return
    if loop is asyncio.get_running_loop():
        await close()
    elif loop.is_running():
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_await(close), loop))
    else:
        schedule_close(loop, close)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# -- feste's own loops -------------------------------------------------------------------


def loop_kind(choice: str | None = None) -> str:
    """``"uvloop"`` or ``"asyncio"``: the kind of loop feste makes for the ``event_loop``
    option (``choice``, else the current context's value)."""
    if choice is None:
        choice = context.get("event_loop")
    if choice == "asyncio":
        return "asyncio"
    if choice == "uvloop":
        if uvloop is None:
            raise ConfigurationError(
                "event_loop='uvloop' but uvloop is not installed: pip install 'feste[fast]' "
                "(or uvloop), or set event_loop='auto' to use it only where it is installed"
            )
        return "uvloop"
    # "auto": uvloop where installed, unless the application chose a policy of its own.
    if uvloop is None or type(asyncio.get_event_loop_policy()) is not _DEFAULT_POLICY:
        return "asyncio"
    return "uvloop"


_DEFAULT_POLICY = asyncio.DefaultEventLoopPolicy


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new event loop of ``kind`` (a :func:`loop_kind` answer)."""
    if kind == "uvloop" and uvloop is not None:
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def _shut_down(loop: asyncio.AbstractEventLoop) -> None:
    """Close an idle loop feste made: its tasks, its resources, its generators, itself."""
    with _own_loops_lock:
        _own_loops.discard(loop)
    if loop.is_closed():
        return
    try:
        # Closes already started are left to finish; anything else cannot run anymore.
        pending = [
            task for task in asyncio.all_tasks(loop) if not task.done() and task not in _closing
        ]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(close_loop_resources(loop))
        loop.run_until_complete(loop.shutdown_asyncgens())
    except Exception:
        pass
    finally:
        loop.close()


class _ThreadLoopOwner:
    """Held only by one thread's locals: dropped when the thread ends, which retires
    the thread's loop (a finalizer appends it to ``_retired_loops``)."""

    __slots__ = ("__weakref__",)


def _close_retired_loops() -> None:
    while True:
        try:
            loop = _retired_loops.pop()
        except IndexError:
            return
        _shut_down(loop)


def _thread_loops() -> dict[str, asyncio.AbstractEventLoop]:
    """This thread's loops by kind."""
    loops: dict[str, asyncio.AbstractEventLoop] | None = getattr(_local, "loops", None)
    if loops is None:
        loops = _local.loops = {}
    return loops


def _thread_loop(kind: str) -> asyncio.AbstractEventLoop:
    if _retired_loops:
        _close_retired_loops()
    loops = _thread_loops()
    loop = loops.get(kind)
    if loop is None or loop.is_closed():
        loop = new_loop(kind)
        owner = _ThreadLoopOwner()
        retire = weakref.finalize(owner, _retired_loops.append, loop)
        retire.atexit = False  # at exit, _close_all_loops closes every loop
        loops[kind] = loop
        # Held by this thread's locals only: dropped (and the loop retired) with the thread.
        owners: list[_ThreadLoopOwner] = getattr(_local, "owners", [])
        owners.append(owner)
        _local.owners = owners
        with _own_loops_lock:
            _own_loops.add(loop)
    return loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code and return its result.

    It runs on this thread's loop of the kind the ``event_loop`` option names."""
    if _running_loop() is not None:
        return _run_on_helper_thread(coro)
    try:
        kind = loop_kind()
    except BaseException:
        coro.close()  # never started: no "coroutine was never awaited" warning
        raise
    loop = _thread_loop(kind)
    task = loop.create_task(coro)
    try:
        return loop.run_until_complete(task)
    except BaseException:
        # Ctrl-C (KeyboardInterrupt) stops the loop with the task still pending: cancel
        # it and let it wind down, so its in-flight requests end before we re-raise.
        if not task.done():
            task.cancel()
            try:
                loop.run_until_complete(task)
            except BaseException:
                pass
        raise


_helper_lock = threading.Lock()
# The background loops by kind (one thread each), started when first needed.
_helper_loops: dict[str, asyncio.AbstractEventLoop] = {}


def _start_helper() -> asyncio.AbstractEventLoop:
    """The background loop of the kind the ``event_loop`` option names (started once)."""
    kind = loop_kind()
    with _helper_lock:
        loop = _helper_loops.get(kind)
        if loop is None or loop.is_closed():
            loop = new_loop(kind)
            thread = threading.Thread(target=loop.run_forever, name="feste-loop", daemon=True)
            thread.start()
            _helper_loops[kind] = loop
            with _own_loops_lock:
                _own_loops.add(loop)
        return loop


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Let Ctrl-C interrupt a blocking wait on the main thread.

    ``asyncio.run`` installs a SIGINT handler that only cancels its main task, which
    cannot happen while that task is blocked in a synchronous ``feste.compute``: the
    computation would run to the end. While waiting, Ctrl-C raises KeyboardInterrupt
    here instead; the handler is restored afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous) or previous is signal.default_int_handler:
        yield  # the default already raises; SIG_IGN and SIG_DFL are left as they are
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_on_shared_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on feste's one background loop and wait for it: the threads of a
    process that call this share that loop and its connection pools (the partition tasks
    of :mod:`feste.collections`) instead of running a loop each."""
    return _run_on_helper_thread(coro)


def _run_on_helper_thread(coro: Coroutine[Any, Any, T]) -> T:
    try:
        loop = _start_helper()
    except BaseException:
        coro.close()
        raise
    ctx = contextvars.copy_context()
    future: Future[T] = Future()
    tasks: list[asyncio.Task[T]] = []

    def start() -> None:
        task = ctx.run(loop.create_task, coro)
        tasks.append(task)

        def done(t: asyncio.Task[T]) -> None:
            if t.cancelled():
                future.cancel()
            elif t.exception() is not None:
                future.set_exception(t.exception())
            else:
                future.set_result(t.result())

        task.add_done_callback(done)

    loop.call_soon_threadsafe(start)
    try:
        with _interruptible():
            return future.result()
    except BaseException:
        # Interrupted while waiting (Ctrl-C in Jupyter): cancel the work on the helper loop.
        if not future.done():
            started = tasks[0] if tasks else None
            if started is not None:
                loop.call_soon_threadsafe(started.cancel)
            try:
                future.exception(timeout=10)
            except BaseException:
                pass
        raise


@atexit.register
def _close_all_loops() -> None:
    with _own_loops_lock:
        loops = list(_own_loops)
    _retired_loops.clear()
    for loop in loops:
        if loop.is_closed():
            continue
        try:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(close_loop_resources(loop), loop).result(5)
                loop.call_soon_threadsafe(loop.stop)
            else:
                _shut_down(loop)
        except Exception:
            pass
