"""The synchronous scheduler: one task at a time, in this thread. For debugging."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dask.local import get_sync

from feste.schedulers._local import run_on_dask

__all__ = ["get"]


def get(graph: Mapping[Any, Any], keys: Any, **kwargs: Any) -> Any:
    return run_on_dask(get_sync, graph, keys, scheduler="sync", **kwargs)
