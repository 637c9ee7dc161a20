"""The process scheduler: plain Python tasks in a pool of processes, one per core.

It suits CPU-bound Python tasks. It is the async engine with ``python_executor=
"processes"``: plain tasks run in worker processes (their functions, inputs and
results must pickle; options set around ``feste.compute``, except callbacks, travel
with them), while backend calls stay in this process as coroutines. So every request
goes through this process's limiters: a ``max_concurrency`` holds for the whole pool,
and the progress bar and ``record_usage`` see every request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from feste import context
from feste._loop import run_sync
from feste.schedulers._engine import run_graph
from feste.schedulers._policy import option_keywords

__all__ = ["get"]


def get(graph: Mapping[Any, Any], keys: Any, num_workers: int | None = None, **kwargs: Any) -> Any:
    """Compute ``keys`` of ``graph``; keywords are feste options (and ``num_workers``)."""
    options = option_keywords(kwargs)
    if num_workers is not None:
        options["num_workers"] = num_workers
    with context.set(python_executor="processes", **options):
        return run_sync(run_graph(graph, keys))
