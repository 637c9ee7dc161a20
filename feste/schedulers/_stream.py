"""Streaming results: :class:`GraphStream`, behind ``feste.as_completed``.

A stream runs one graph on the async engine with an ``on_output`` hook and hands each
output over as it settles, as ``(index, value)`` pairs: ``outputs`` maps each output key
to the indexes it answers (one key may answer several), and values known before the
run (plain objects) come first. With ``preserve_order`` a :class:`_Release` holds each
value back until all the earlier indexes are known.

* ``for`` loops: the engine runs on feste's helper loop thread
  (:func:`feste._loop._start_helper`) and hands results over through a thread-safe
  queue.
* ``async for`` loops: the engine runs on the caller's loop.

Either way, leaving the loop early (``break``, an exception, ``close()`` or
``aclose()``) cancels the run and waits for its in-flight requests to end, so no
request outlives the stream. A stream can be iterated once.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import time
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from feste import context
from feste._loop import _start_helper
from feste.schedulers._engine import CANCEL_GRACE, run_graph

__all__ = ["GraphStream"]


class _Release:
    """Lets ``(index, value)`` pairs out at once, or in index order when ``in_order``."""

    def __init__(self, in_order: bool) -> None:
        self.in_order = in_order
        self.pending: dict[int, Any] = {}
        self.next_index = 0

    def add(self, index: int, value: Any) -> list[tuple[int, Any]]:
        if not self.in_order:
            return [(index, value)]
        self.pending[index] = value
        released = []
        while self.next_index in self.pending:
            released.append((self.next_index, self.pending.pop(self.next_index)))
            self.next_index += 1
        return released


class GraphStream:
    """Runs a graph and yields ``(index, value)`` as each output settles.

    ``outputs`` maps each output key to the indexes it answers (one key may answer
    several indexes); ``ready`` holds indexes whose values are known before running.
    Iterating with ``for`` runs the engine on feste's helper loop thread and hands
    results over through a thread-safe queue; ``async for`` runs it on the caller's
    loop. Either way, leaving the loop early (``break``, an exception, ``close()``)
    cancels the run and waits for its in-flight requests to end. With
    ``preserve_order`` results come in index order, each as soon as it and all the
    earlier ones are known.
    """

    def __init__(
        self,
        graph: Mapping[Hashable, Any],
        outputs: Mapping[Hashable, list[int]],
        ready: Mapping[int, Any],
        *,
        options: Mapping[str, Any],
        preserve_order: bool = False,
    ) -> None:
        self.graph = graph
        self.outputs = dict(outputs)
        self.ready = dict(ready)
        self.options = dict(options)
        self.preserve_order = preserve_order
        self.count = len(self.ready) + sum(len(indexes) for indexes in self.outputs.values())
        self._started = False
        self._generator: Any = None

    async def _run(self, on_output: Callable[[Hashable, Any], None]) -> None:
        if not self.outputs:
            return
        with context.set(**self.options):
            await run_graph(self.graph, list(self.outputs), on_output=on_output)

    def _claim(self) -> None:
        if self._started:
            raise RuntimeError("as_completed results can be iterated only once")
        self._started = True

    def __len__(self) -> int:
        return self.count

    # -- synchronous iteration ----------------------------------------------------------

    def __iter__(self) -> Any:
        self._claim()
        generator = self._iterate()
        # A weak reference: the generator refers to self, and breaking out of a ``for``
        # loop must leave it unreferenced so that it is closed (and the run cancelled)
        # at once.
        self._generator = weakref.ref(generator)
        return generator

    def close(self) -> None:
        """Stop the run (if iteration began and has not finished)."""
        generator = self._generator() if self._generator is not None else None
        if generator is not None:
            generator.close()

    def __enter__(self) -> GraphStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _iterate(self) -> Any:
        results: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        loop = _start_helper()
        ctx = contextvars.copy_context()
        started: list[asyncio.Task[None]] = []

        def start() -> None:
            task = ctx.run(
                loop.create_task, self._run(lambda key, value: results.put(("item", key, value)))
            )
            started.append(task)
            task.add_done_callback(lambda task: results.put(("end", task, None)))

        loop.call_soon_threadsafe(start)
        ended = False
        release = _Release(self.preserve_order)
        try:
            for index in sorted(self.ready):
                yield from release.add(index, self.ready[index])
            while True:
                kind, key, value = results.get()
                if kind == "end":
                    ended = True
                    task = key
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()
                    return
                for index in self.outputs[key]:
                    yield from release.add(index, value)
        finally:
            if not ended:

                def cancel() -> None:
                    for task in started:
                        task.cancel()

                loop.call_soon_threadsafe(cancel)
                deadline = time.monotonic() + CANCEL_GRACE * 2
                while time.monotonic() < deadline:
                    try:
                        kind, _, _ = results.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if kind == "end":
                        break

    # -- asynchronous iteration ---------------------------------------------------------

    def __aiter__(self) -> Any:
        self._claim()
        generator = self._aiterate()
        self._generator = weakref.ref(generator)
        return generator

    async def aclose(self) -> None:
        """Stop the run (if ``async for`` began and has not finished)."""
        generator = self._generator() if self._generator is not None else None
        if generator is not None:
            await generator.aclose()

    async def __aenter__(self) -> GraphStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _aiterate(self) -> Any:
        results: asyncio.Queue[tuple[Hashable, Any] | None] = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(
            self._run(lambda key, value: results.put_nowait((key, value)))
        )
        task.add_done_callback(lambda _: results.put_nowait(None))
        release = _Release(self.preserve_order)
        try:
            for index in sorted(self.ready):
                for pair in release.add(index, self.ready[index]):
                    yield pair
            while True:
                item = await results.get()
                if item is None:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                    return
                key, value = item
                for index in self.outputs[key]:
                    for pair in release.add(index, value):
                        yield pair
        finally:
            if not task.done():
                task.cancel()
                # Wait for the run to wind down without raising its CancelledError here.
                await asyncio.wait({task})
