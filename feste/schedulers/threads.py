"""The threaded scheduler: dask's thread pool runs the tasks, backend calls included.

Each worker thread keeps its own event loop for backend calls (see ``feste._loop``).
``num_workers`` (argument or option) sets the pool size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dask import threaded

from feste import context
from feste.schedulers._local import keyed_graph

__all__ = ["get"]


def get(graph: Mapping[Any, Any], keys: Any, num_workers: int | None = None, **kwargs: Any) -> Any:
    num_workers = num_workers or context.get("num_workers")
    return threaded.get(keyed_graph(graph), keys, num_workers=num_workers, **kwargs)
