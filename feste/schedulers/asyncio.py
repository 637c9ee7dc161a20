"""The async scheduler (``scheduler="async"``, the default): hands the graph to the engine.

All the work happens in :mod:`feste.schedulers._engine`; this module only adapts it to
the ``get(graph, keys, **kwargs)`` protocol of the scheduler registry. Keywords are feste
options (``errors="return"``, ``max_concurrency=8``, ``on_task_done=...``) applied to this
computation only. The engine runs on this thread's event loop, or on a helper thread
when a loop is already running here (Jupyter), see :func:`feste._loop.run_sync`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from feste import context
from feste._loop import run_sync
from feste.schedulers._engine import run_graph
from feste.schedulers._policy import option_keywords

__all__ = ["get"]


def get(graph: Mapping[Any, Any], keys: Any, **kwargs: Any) -> Any:
    """Compute ``keys`` of ``graph`` on the async engine; keywords are feste options."""
    with context.set(**option_keywords(kwargs)):
        return run_sync(run_graph(graph, keys))
