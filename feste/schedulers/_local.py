"""Shared by the schedulers that run on ``dask.local.get_async`` (sync, threads, processes).

Those schedulers run each node where dask puts it. :func:`keyed_graph` wraps every
call node so that an exception leaving it names the task key (dask's local scheduler
re-raises the original exception without saying which task raised it), and so that
the options set around ``feste.compute`` apply inside worker processes too.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from dask.task_spec import Task

from feste import context
from feste.errors import annotate_task_error


class KeyedCall:
    """Runs a node's function with the caller's options and labels its errors."""

    __slots__ = ("func", "key", "options")

    def __init__(self, func: Any, key: Any, options: Mapping[str, Any] | None) -> None:
        self.func = func
        self.key = key
        self.options = options

    @property
    def __name__(self) -> str:
        return getattr(self.func, "__name__", type(self.func).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if self.options is None:
                return _awaited(self.func(*args, **kwargs))
            with context.set(**self.options):
                return _awaited(self.func(*args, **kwargs))
        except BaseException as exc:
            raise annotate_task_error(exc, self.key) from None

    def __reduce__(self) -> tuple[Any, ...]:
        return (KeyedCall, (self.func, self.key, self.options))


def _awaited(value: Any) -> Any:
    """An ``async def`` task returns a coroutine: run it on this thread's loop."""
    if inspect.iscoroutine(value):
        from feste._loop import run_sync

        return run_sync(value)
    return value


def portable_options() -> dict[str, Any]:
    """Options worth sending to another process (callbacks stay behind)."""
    return {name: value for name, value in context.snapshot().items() if not callable(value)}


def keyed_graph(
    graph: Mapping[Any, Any], options: Mapping[str, Any] | None = None
) -> dict[Any, Any]:
    wrapped: dict[Any, Any] = {}
    for key, node in graph.items():
        if type(node) is Task:
            wrapped[key] = Task(key, KeyedCall(node.func, key, options), *node.args, **node.kwargs)
        else:
            wrapped[key] = node
    return wrapped
