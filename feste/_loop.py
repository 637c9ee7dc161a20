"""Running coroutines from synchronous code.

Backend calls are coroutines. Synchronous callers (eager mode, the ``sync``, ``threads``
and ``processes`` schedulers, ``feste.compute`` itself) reach them through
:func:`run_sync`, which keeps one event loop per thread alive between calls so that HTTP
connection pools are reused instead of rebuilt for every request. When the calling
thread already runs a loop (Jupyter), the coroutine runs on a private background thread
and the caller waits for it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_local = threading.local()
_all_loops: list[asyncio.AbstractEventLoop] = []
_all_loops_lock = threading.Lock()
_loop_closers: list[Callable[[asyncio.AbstractEventLoop], Awaitable[None]]] = []


def on_loop_close(closer: Callable[[asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    """Register ``closer(loop)``, awaited before a feste-owned loop is closed.

    Transports use it to close the connection pools they opened on that loop.
    """
    _loop_closers.append(closer)


async def close_loop_resources(loop: asyncio.AbstractEventLoop) -> None:
    """Await every registered closer for ``loop`` (errors are ignored: we are shutting down)."""
    for closer in list(_loop_closers):
        try:
            await closer(loop)
        except Exception:
            pass


def _thread_loop() -> asyncio.AbstractEventLoop:
    loop = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        _local.loop = loop
        with _all_loops_lock:
            _all_loops.append(loop)
    return loop


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code and return its result."""
    if _in_running_loop():
        return _run_on_helper_thread(coro)
    loop = _thread_loop()
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
_helper_loop: asyncio.AbstractEventLoop | None = None


def _start_helper() -> asyncio.AbstractEventLoop:
    global _helper_loop
    with _helper_lock:
        if _helper_loop is None or _helper_loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="feste-loop", daemon=True)
            thread.start()
            _helper_loop = loop
            with _all_loops_lock:
                _all_loops.append(loop)
        return _helper_loop


def _run_on_helper_thread(coro: Coroutine[Any, Any, T]) -> T:
    loop = _start_helper()
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
    with _all_loops_lock:
        loops = list(_all_loops)
        _all_loops.clear()
    for loop in loops:
        if loop.is_closed():
            continue
        try:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(close_loop_resources(loop), loop).result(5)
                loop.call_soon_threadsafe(loop.stop)
            else:
                loop.run_until_complete(close_loop_resources(loop))
                loop.close()
        except Exception:
            pass
