"""Schedulers: each is a small module exposing ``get(graph, keys, **kwargs)``.

``get`` takes a dict graph (key -> ``dask.task_spec`` node, already optimized by
``feste.compute``) and the keys to return, possibly nested lists of keys, and returns
the values in the same nesting. :data:`SCHEDULERS` maps names to those modules; a
distributed ``Client`` or any ``get`` function is accepted as well.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from feste.errors import SchedulerError

__all__ = ["DEFAULT_SCHEDULER", "SCHEDULERS", "get_scheduler"]

#: name -> module that defines ``get``
SCHEDULERS: dict[str, str] = {
    "async": "feste.schedulers.asyncio",
    "processes": "feste.schedulers.processes",
    "sync": "feste.schedulers.sync",
    "threads": "feste.schedulers.threads",
}

DEFAULT_SCHEDULER = "async"

_ALIASES = {
    "synchronous": "sync",
    "single-threaded": "sync",
    "threading": "threads",
    "multiprocessing": "processes",
    "local": "async",
}


def get_scheduler(scheduler: Any = None) -> Callable[..., Any]:
    """The ``get`` function for a scheduler name, a ``get`` function or a Client."""
    if scheduler is None:
        from feste import context

        scheduler = context.get("scheduler") or DEFAULT_SCHEDULER
    if isinstance(scheduler, str):
        name = _ALIASES.get(scheduler, scheduler)
        module_name = SCHEDULERS.get(name)
        if module_name is None:
            valid = ", ".join(repr(n) for n in sorted(SCHEDULERS))
            raise SchedulerError(
                f"unknown scheduler {scheduler!r}; valid schedulers: {valid}, "
                "or a distributed.Client"
            )
        return importlib.import_module(module_name).get
    client_get = getattr(scheduler, "get", None)
    if type(scheduler).__name__ == "Client" and callable(client_get):
        return client_get
    if callable(scheduler):
        return scheduler
    raise SchedulerError(
        f"cannot schedule with {scheduler!r}: pass a scheduler name "
        f"({', '.join(sorted(SCHEDULERS))}), a get function or a distributed.Client"
    )
