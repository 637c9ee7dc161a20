"""``feste.compute``: collect the graph, optimize it, hand it to a scheduler.

This is the one place where that happens; ``FesteDelayed.compute``, ``dask.compute``
on feste values (through ``__dask_scheduler__``) and eager mode all come through here
or through the same optimizer and scheduler registry.
"""

from __future__ import annotations

from typing import Any

from feste.graph import FesteGraph, GraphStats
from feste.optimization import default_optimizer
from feste.schedulers import get_scheduler

__all__ = ["compute", "explain", "prepare"]


def prepare(
    *objs: Any, optimize_graph: bool = True, traverse: bool = True
) -> tuple[dict[Any, Any], list[Any], Any, list[Any]]:
    """Collect and optimize: ``(graph, keys, repack, postcomputes)``."""
    graph, collections, repack = FesteGraph.collect(*objs, traverse=traverse)
    keys = [collection.__dask_keys__() for collection in collections]
    postcomputes = [collection.__dask_postcompute__() for collection in collections]
    graph_dict = graph.to_dict()
    if optimize_graph and graph_dict:
        graph_dict = default_optimizer().optimize(graph_dict, keys)
    return graph_dict, keys, repack, postcomputes


def finish(results: Any, repack: Any, postcomputes: list[Any]) -> tuple[Any, ...]:
    values = [finalize(result, *args) for result, (finalize, args) in zip(results, postcomputes)]
    return repack(values)


def compute(
    *objs: Any,
    scheduler: Any = None,
    optimize_graph: bool = True,
    traverse: bool = True,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """Compute lazy values; return a tuple with one result per argument.

    Arguments may be nested lists, tuples and dicts holding lazy values; they come back
    with the same shape and the results in place. ``scheduler`` is a name (``"async"``,
    the default, ``"sync"``, ``"threads"``, ``"processes"``), a ``get`` function or a
    distributed ``Client``. Extra keywords go to the scheduler.
    """
    graph, keys, repack, postcomputes = prepare(
        *objs, optimize_graph=optimize_graph, traverse=traverse
    )
    if not keys:
        return objs
    get = get_scheduler(scheduler)
    results = get(graph, keys, **kwargs)
    return finish(results, repack, postcomputes)


def explain(*objs: Any, optimize_graph: bool = True) -> GraphStats:
    """What computing ``objs`` would do, without running anything.

    Reports the node count and depth of the graph that would run, and per backend
    method how many calls the graph holds and how many requests they become after
    optimization (``str()`` of the result: ``"openai.embed: 5000 calls -> 3 requests"``).
    """
    graph, _, _, _ = prepare(*objs, optimize_graph=optimize_graph)
    to_run = FesteGraph(graph).stats(optimize=False)
    if not optimize_graph:
        return to_run
    raw_graph, _, _ = FesteGraph.collect(*objs)
    # Calls are counted in the graph as written; requests in the optimized one.
    written = raw_graph.stats(optimize=False)
    return GraphStats(to_run.nodes, to_run.depth, written.calls, to_run.requests)
