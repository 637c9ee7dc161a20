"""The process scheduler: dask's process pool, one worker per core by default.

This is the original feste design's multiprocessing scheduler. It suits CPU-bound
Python tasks; for LLM calls, which wait on the network, the async scheduler is far
faster. Options set around ``feste.compute`` (except callbacks) travel to the workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dask import multiprocessing

from feste import context
from feste.schedulers._local import run_on_dask

__all__ = ["get"]


def get(graph: Mapping[Any, Any], keys: Any, num_workers: int | None = None, **kwargs: Any) -> Any:
    num_workers = num_workers or context.get("num_workers")
    return run_on_dask(
        multiprocessing.get,
        graph,
        keys,
        scheduler="processes",
        accepted=("initializer", "num_workers", "pool"),
        ship_options=True,
        num_workers=num_workers,
        **kwargs,
    )
