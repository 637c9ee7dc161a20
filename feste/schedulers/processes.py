"""The process scheduler: dask's process pool, one worker per core by default.

This is the original feste design's multiprocessing scheduler. It suits CPU-bound
Python tasks; for LLM calls, which wait on the network, the async scheduler is far
faster. Options set around ``feste.compute`` (except callbacks) travel to the workers,
and the reports of the requests made there come back with each result
(:func:`feste.usage.loads_delivering`), so usage records and traces see them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from dask import multiprocessing

from feste import context
from feste.schedulers._local import run_on_dask
from feste.usage import loads_delivering

__all__ = ["get"]


def get(graph: Mapping[Any, Any], keys: Any, num_workers: int | None = None, **kwargs: Any) -> Any:
    num_workers = num_workers or context.get("num_workers")
    return run_on_dask(
        functools.partial(multiprocessing.get, func_loads=loads_delivering),
        graph,
        keys,
        scheduler="processes",
        accepted=("initializer", "num_workers", "pool"),
        ship_options=True,
        num_workers=num_workers,
        **kwargs,
    )
