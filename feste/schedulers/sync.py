"""The synchronous scheduler: one task at a time, in this thread. For debugging."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dask.local import get_sync

from feste.schedulers._local import keyed_graph

__all__ = ["get"]


def get(graph: Mapping[Any, Any], keys: Any, **kwargs: Any) -> Any:
    return get_sync(keyed_graph(graph), keys, **kwargs)
