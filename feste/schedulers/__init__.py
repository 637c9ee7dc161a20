"""Schedulers: each is a small module exposing ``get(graph, keys, **kwargs)``.

``get`` takes a dict graph (key -> ``dask.task_spec`` node, already optimized by
``feste.compute``) and the keys to return, possibly nested lists of keys, and returns
the values in the same nesting. :data:`SCHEDULERS` maps names to those modules; a
distributed ``Client`` or any ``get`` function is accepted as well.

Layers, each importing only the ones below it: the scheduler modules (``asyncio``,
``sync``, ``threads``, ``processes``, and ``cluster`` for a ``distributed.Client``)
adapt the protocol; ``_engine`` (the async
engine's scheduling loop, with ``_pools`` for its worker pools and ``_stream`` for
streaming on top of it) and ``_local`` (dask's local schedulers) run graphs; ``_policy``
is what every scheduler promises about keywords, failures and callbacks. Below them
are the sender (``feste._calls``) and the graph nodes; ``feste.compute`` sits above.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from feste import context
from feste.errors import SchedulerError
from feste.schedulers import asyncio, cluster, processes, sync, threads

__all__ = ["DEFAULT_SCHEDULER", "SCHEDULERS", "get_scheduler"]

#: name -> module that defines ``get``
SCHEDULERS: dict[str, ModuleType] = {
    "async": asyncio,
    "processes": processes,
    "sync": sync,
    "threads": threads,
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
        scheduler = context.get("scheduler") or DEFAULT_SCHEDULER
    if isinstance(scheduler, str):
        name = _ALIASES.get(scheduler, scheduler)
        module = SCHEDULERS.get(name)
        if module is None:
            valid = ", ".join(repr(n) for n in sorted(SCHEDULERS))
            raise SchedulerError(
                f"unknown scheduler {scheduler!r}; valid schedulers: {valid}, "
                "or a distributed.Client"
            )
        get: Callable[..., Any] = module.get
        return get
    client_get = getattr(scheduler, "get", None)
    if type(scheduler).__name__ == "Client" and callable(client_get):
        return cluster.ClusterScheduler(scheduler)
    if callable(scheduler):
        return scheduler
    raise SchedulerError(
        f"cannot schedule with {scheduler!r}: pass a scheduler name "
        f"({', '.join(sorted(SCHEDULERS))}), a get function or a distributed.Client"
    )
