"""The threaded scheduler: dask's thread pool runs the tasks, backend calls included.

Each worker thread keeps its own event loop for backend calls (see ``feste._loop``).
``num_workers`` (argument or option) sets the pool size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dask import threaded

from feste import context
from feste.schedulers._local import run_on_dask

__all__ = ["get"]


def get(graph: Mapping[Any, Any], keys: Any, num_workers: int | None = None, **kwargs: Any) -> Any:
    num_workers = num_workers or context.get("num_workers")
    return run_on_dask(
        threaded.get,
        graph,
        keys,
        scheduler="threads",
        accepted=("num_workers", "pool"),
        num_workers=num_workers,
        **kwargs,
    )
