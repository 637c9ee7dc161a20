"""Shared by the schedulers that run on ``dask.local.get_async`` (sync, threads, processes).

Those schedulers run each node where dask puts it. :func:`run_on_dask` gives them the
same contract as the async scheduler:

* keywords that are feste options (``errors="return"``, callbacks, limits) apply to
  this computation; any other keyword the scheduler does not take is refused;
* every call node is wrapped (:class:`KeyedCall`) so that an exception leaving it names
  the task key (dask re-raises the original exception without saying which task raised
  it), so that options reach worker processes, and, with ``errors="return"``, so that a
  failure becomes a :class:`~feste.errors.Failure` that its dependents pass on as
  cancelled instead of running;
* ``on_task_done``, ``on_task_failed`` and ``on_progress`` are called from dask's
  post-task callback, in the calling process.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dask.task_spec import Task

from feste import context
from feste._nodes import take_item
from feste.errors import CancelledError, Failure, SchedulerError, annotate_task_error


class KeyedCall:
    """Runs a node's function with the caller's options and labels its errors."""

    __slots__ = ("func", "key", "options", "return_failures")

    def __init__(
        self,
        func: Any,
        key: Any,
        options: Mapping[str, Any] | None,
        return_failures: bool = False,
    ) -> None:
        self.func = func
        self.key = key
        self.options = options
        self.return_failures = return_failures

    @property
    def __name__(self) -> str:
        return getattr(self.func, "__name__", type(self.func).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.return_failures:
            # Not `a or b`: a Failure is falsy.
            upstream = _first_failure((*args, *kwargs.values()))
            if upstream is not None:
                return self._passed_on(upstream)
        try:
            if self.options is None:
                return _awaited(self.func(*args, **kwargs))
            with context.set(**self.options):
                return _awaited(self.func(*args, **kwargs))
        except Exception as exc:
            annotated = annotate_task_error(exc, self.key)
            if self.return_failures:
                return Failure(annotated, self.key, getattr(exc, "attempts", None) or 1)
            raise annotated from None
        except BaseException as exc:
            raise annotate_task_error(exc, self.key) from None

    def _passed_on(self, upstream: Failure) -> Failure:
        if self.func is take_item:
            # An item of a failed batch fails with the batch's error, not as cancelled.
            return Failure(upstream.exception, self.key, upstream.attempts)
        cause = upstream.exception
        if upstream.cancelled:
            return Failure(cause, self.key, 0, cancelled=True)
        error = CancelledError(
            f"task {self.key!r} was not run because task {upstream.key!r} failed: "
            f"{type(cause).__name__}: {cause}"
        )
        return Failure(error, self.key, 0, cancelled=True)

    def __reduce__(self) -> tuple[Any, ...]:
        return (KeyedCall, (self.func, self.key, self.options, self.return_failures))


def _first_failure(values: tuple[Any, ...]) -> Failure | None:
    """The first Failure among ``values``, looking inside lists, tuples and dicts."""
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, Failure):
            return value
        if isinstance(value, (list, tuple, set)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return None


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
    graph: Mapping[Any, Any],
    options: Mapping[str, Any] | None = None,
    return_failures: bool = False,
) -> dict[Any, Any]:
    wrapped: dict[Any, Any] = {}
    for key, node in graph.items():
        if type(node) is Task:
            call = KeyedCall(node.func, key, options, return_failures)
            wrapped[key] = Task(key, call, *node.args, **node.kwargs)
        else:
            wrapped[key] = node
    return wrapped


def _event_callbacks(total: int) -> list[tuple[Any, ...]]:
    """dask ``callbacks`` that report each finished task to the feste callbacks."""
    on_task_done = context.get("on_task_done")
    on_task_failed = context.get("on_task_failed")
    on_progress = context.get("on_progress")
    if on_task_done is None and on_task_failed is None and on_progress is None:
        return []
    finished = 0

    def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        nonlocal finished
        finished += 1
        if isinstance(result, Failure):
            if on_task_failed is not None:
                on_task_failed(key, result.exception)
        elif on_task_done is not None:
            on_task_done(key, result)
        if on_progress is not None:
            on_progress(finished, total)

    # dask's callback tuple: (start, start_state, pretask, posttask, finish)
    return [(None, None, None, posttask, None)]


def run_on_dask(
    dask_get: Callable[..., Any],
    graph: Mapping[Any, Any],
    keys: Any,
    *,
    scheduler: str,
    accepted: Iterable[str] = (),
    ship_options: bool = False,
    **kwargs: Any,
) -> Any:
    """Run ``graph`` with one of dask's local ``get`` functions, feste-style.

    ``accepted`` names the keywords passed on to ``dask_get`` (``num_workers``...);
    the others must be feste options. ``ship_options`` sends the options to worker
    processes (threads share the caller's context already).
    """
    accepted = set(accepted)
    options = {
        name: value
        for name, value in kwargs.items()
        if name in context.OPTIONS and name not in accepted
    }
    passed_on = {name: value for name, value in kwargs.items() if name not in options}
    unknown = sorted(set(passed_on) - accepted)
    if unknown:
        valid = sorted(accepted | set(context.OPTIONS))
        raise SchedulerError(
            f"unknown keyword{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for the {scheduler!r} scheduler; it accepts: {', '.join(valid)}"
        )
    with context.set(**options):
        return_failures = context.get("errors") == "return"
        shipped = portable_options() if ship_options else None
        wrapped = keyed_graph(graph, shipped, return_failures)
        callbacks = _event_callbacks(sum(1 for node in wrapped.values() if type(node) is Task))
        return dask_get(wrapped, keys, callbacks=callbacks, **passed_on)
