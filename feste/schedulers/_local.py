"""Shared by the schedulers that run on ``dask.local.get_async`` (sync, threads, processes).

Those schedulers run each node where dask puts it. :func:`run_on_dask` gives them the
contract of the async scheduler, with the policy of :mod:`feste.schedulers._policy`:

* keywords that are feste options (``errors="return"``, callbacks, limits) apply to
  this computation; the scheduler's own keywords go to dask; any other is refused;
* every task node is wrapped (:class:`KeyedCall`) so that an exception leaving it names
  the task key (dask re-raises the original exception without saying which task raised
  it), so that options reach worker processes, and, with ``errors="return"``, so that a
  failure becomes a :class:`~feste.errors.Failure` that its dependents pass on
  (cancelled, or with the same error for an item pick) instead of running;
* ``on_task_done``, ``on_task_failed`` and ``on_progress`` are called from dask's
  post-task callback, in the calling process;
* an ``async def`` task runs on its worker thread's event loop
  (:func:`feste._loop.run_sync`);
* in worker processes (``ship_options``), each task runs under
  :func:`feste.usage.run_relayed`, so the reports of the requests it makes come back
  with its result and reach the caller's usage records and traces.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dask.task_spec import Task

from feste import context
from feste._loop import run_sync
from feste._nodes import BatchCall
from feste.errors import Failure, annotate_task_error
from feste.limits import run_scope
from feste.schedulers._policy import (
    TaskEvents,
    batch_without_failed_inputs,
    dependent_failure,
    first_failure,
    passes_failure_on,
    portable_options,
    returns_failures,
    split_keywords,
    task_failure,
)
from feste.usage import run_relayed

__all__ = ["KeyedCall", "keyed_graph", "run_on_dask"]


class KeyedCall:
    """Runs a node's function with the caller's options and labels its errors.

    ``return_failures`` (``errors="return"``): an exception becomes the task's
    :class:`~feste.errors.Failure`, and a failure among the arguments is passed on
    instead of calling the function (``same_error``: with the upstream's error, else as
    cancelled).
    """

    __slots__ = ("func", "key", "options", "return_failures", "same_error")

    def __init__(
        self,
        func: Any,
        key: Any,
        options: Mapping[str, Any] | None,
        return_failures: bool = False,
        same_error: bool = False,
    ) -> None:
        self.func = func
        self.key = key
        self.options = options
        self.return_failures = return_failures
        self.same_error = same_error

    @property
    def __name__(self) -> str:
        return getattr(self.func, "__name__", type(self.func).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.options is not None:  # in a worker process: send request reports back
            return run_relayed(self._run, *args, **kwargs)
        return self._run(*args, **kwargs)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        if self.return_failures and type(self.func) is BatchCall and args:
            entries = self._batch_without_failed_items(args, kwargs)
            if entries is not None:
                return entries
        if self.return_failures:
            upstream = first_failure((*args, *kwargs.values()))
            # Not `if upstream`: a Failure is falsy.
            if upstream is not None:
                return dependent_failure(self.key, upstream, same_error=self.same_error)
        try:
            if self.options is None:
                return _awaited(self.func(*args, **kwargs))
            with context.set(**self.options):
                return _awaited(self.func(*args, **kwargs))
        except Exception as exc:
            if self.return_failures:
                return task_failure(self.key, exc)
            raise annotate_task_error(exc, self.key) from None
        except BaseException as exc:
            raise annotate_task_error(exc, self.key) from None

    def _batch_without_failed_items(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A batch whose inputs partly failed goes out with the other items: one entry
        per item (or the batch's own failure); None when no input failed."""
        items = list(args[0])
        failures = [first_failure([item]) for item in items]
        if all(failure is None for failure in failures):
            return None
        kept, merged = batch_without_failed_inputs(items, failures)
        if not kept:
            return merged([])
        batch = KeyedCall(self.func, self.key, self.options, self.return_failures)
        results = batch(kept, *args[1:], **kwargs)
        if isinstance(results, Failure):
            return results
        return merged(results)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            KeyedCall,
            (self.func, self.key, self.options, self.return_failures, self.same_error),
        )


def _awaited(value: Any) -> Any:
    """An ``async def`` task returns a coroutine: run it on this thread's loop."""
    if inspect.iscoroutine(value):
        return run_sync(value)
    return value


def keyed_graph(
    graph: Mapping[Any, Any],
    options: Mapping[str, Any] | None = None,
    return_failures: bool = False,
) -> dict[Any, Any]:
    """``graph`` with the function of every ``Task`` node wrapped in a :class:`KeyedCall`."""
    wrapped: dict[Any, Any] = {}
    for key, node in graph.items():
        if type(node) is Task:
            call = KeyedCall(node.func, key, options, return_failures, passes_failure_on(node))
            wrapped[key] = Task(key, call, *node.args, **node.kwargs)
        else:
            wrapped[key] = node
    return wrapped


def _event_callbacks(task_keys: set[Any]) -> list[tuple[Any, ...]]:
    """dask ``callbacks`` that report each finished task to the feste callbacks."""
    events = TaskEvents(len(task_keys))
    if not events.wanted:
        return []

    def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if key not in task_keys:  # a literal or an alias: not a task of its own
            return
        if isinstance(result, Failure):
            events.failed(key, result.exception)
        else:
            events.done(key, result)

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
    options, passed_on = split_keywords(kwargs, scheduler=scheduler, accepted=accepted)
    with context.set(**options), run_scope():
        shipped = portable_options() if ship_options else None
        wrapped = keyed_graph(graph, shipped, returns_failures())
        task_keys = {key for key, node in wrapped.items() if type(node) is Task}
        callbacks = _event_callbacks(task_keys)
        return dask_get(wrapped, keys, callbacks=callbacks, **passed_on)
