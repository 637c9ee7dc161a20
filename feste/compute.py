"""``feste.compute``: collect the graph, optimize it, hand it to a scheduler.

This is the one place where that happens; ``FesteDelayed.compute``, ``dask.compute``
on feste values (through ``__dask_scheduler__``) and eager mode all come through here
or through the same optimizer and scheduler registry.
"""

from __future__ import annotations

from typing import Any

from feste import context
from feste._replay import replay_cached_calls
from feste._runs import record_run
from feste.errors import SchedulerError
from feste.graph import FesteGraph, GraphStats
from feste.optimization import default_optimizer
from feste.schedulers import get_scheduler

__all__ = ["as_completed", "compute", "compute_async", "explain", "prepare"]


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
    cache: Any = None,
    run: str | None = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """Compute lazy values; return a tuple with one result per argument.

    Arguments may be nested lists, tuples and dicts holding lazy values; they come back
    with the same shape and the results in place. ``scheduler`` is a name (``"async"``,
    the default, ``"sync"``, ``"threads"``, ``"processes"``), a ``get`` function or a
    distributed ``Client``. ``cache`` is a result cache (a path, a ``postgresql://``
    URL or a store; ``False`` for none) and ``run`` names the run to record in it; both
    default to the context's options. With a cache, calls it can answer before the run
    (their inputs known) are answered in one bulk lookup and never scheduled; the others
    are looked up where they are sent. Extra keywords go to the scheduler.
    """
    with context.set(**_cache_options(cache, run)):
        graph, keys, repack, postcomputes = prepare(
            *objs, optimize_graph=optimize_graph, traverse=traverse
        )
        if not keys:
            return objs
        get = get_scheduler(scheduler)
        name = context.get("run")
        if name is None:
            results = get(replay_cached_calls(graph), keys, **kwargs)
            return finish(results, repack, postcomputes)
        chosen = scheduler if scheduler is not None else context.get("scheduler")
        with record_run(name, graph, objs, scheduler=chosen, traverse=traverse) as recording:
            results = get(replay_cached_calls(graph), keys, **kwargs)
            values = finish(results, repack, postcomputes)
            recording.finished(values)
        return values


# -- cache and run options ------------------------------------------------------------


def _cache_options(cache: Any, run: str | None) -> dict[str, Any]:
    """The ``cache`` and ``run`` arguments given (None: not given) as context options."""
    options: dict[str, Any] = {}
    if cache is not None:
        options["cache"] = cache
    if run is not None:
        options["run"] = run
    return options


def explain(*objs: Any, optimize_graph: bool = True) -> GraphStats:
    """What computing ``objs`` would do, without running anything.

    Reports the node count and depth of the graph that would run, and per backend
    method how many calls the graph holds and how many requests they become after
    optimization (``str()`` of the result: ``"openai.embed: 5000 calls -> 3 requests"``).
    """
    # The same steps as prepare(), keeping the graph as written to count its calls.
    graph, collections, _ = FesteGraph.collect(*objs)
    calls, requests = graph.backend_calls()
    if optimize_graph and len(graph):
        keys = [collection.__dask_keys__() for collection in collections]
        graph = FesteGraph(default_optimizer().optimize(graph.to_dict(), keys))
        _, requests = graph.backend_calls()
    return GraphStats(len(graph), graph.depth(), calls, requests)


async def compute_async(
    *objs: Any,
    scheduler: Any = None,
    optimize_graph: bool = True,
    traverse: bool = True,
    cache: Any = None,
    run: str | None = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """``await feste.compute_async(...)``: :func:`compute` for async code.

    With the async scheduler (the default) the graph runs on the caller's event loop,
    next to whatever else it runs; keywords are feste options for this computation
    (``errors="return"``, ``max_concurrency=...``). Another scheduler runs in a worker
    thread, so the loop is never blocked. ``cache`` and ``run`` are those of
    :func:`compute`.
    """
    from feste.schedulers._engine import option_keywords, run_graph

    with context.set(**_cache_options(cache, run)):
        graph, keys, repack, postcomputes = prepare(
            *objs, optimize_graph=optimize_graph, traverse=traverse
        )
        if not keys:
            return objs
        if scheduler is None:
            scheduler = context.get("scheduler")

        async def results() -> Any:
            to_run = replay_cached_calls(graph)
            if scheduler is None or scheduler in ("async", "local"):
                with context.set(**option_keywords(kwargs)):
                    return await run_graph(to_run, keys)
            import asyncio

            get = get_scheduler(scheduler)
            # to_thread copies this context, so run recording reaches the thread.
            return await asyncio.to_thread(get, to_run, keys, **kwargs)

        name = context.get("run")
        if name is None:
            return finish(await results(), repack, postcomputes)
        with record_run(name, graph, objs, scheduler=scheduler, traverse=traverse) as recording:
            values = finish(await results(), repack, postcomputes)
            recording.finished(values)
        return values


def _whole_value(value: Any) -> Any:
    return value


def as_completed(
    objs: Any,
    *,
    preserve_order: bool = False,
    optimize_graph: bool = True,
    errors: str = "return",
    **options: Any,
) -> Any:
    """Stream results: yield ``(index, value)`` for each of ``objs`` as it finishes.

    ``objs`` is a sequence of lazy values (or structures holding them; plain values come
    back at once). All of them are computed as one optimized graph on the async engine,
    and each is yielded as soon as it is known, fastest first; ``preserve_order=True``
    yields them in input order instead. The result works with ``for`` and with
    ``async for``; leaving the loop early (``break``) cancels the rest, in-flight
    requests included. Use it as a context manager, or call ``close()``/``aclose()``,
    to stop a run whose iterator you keep.

    A failed object is yielded as a :class:`feste.Failure` in its place: by default
    (``errors="return"``) the stream never raises because one object failed. Pass
    ``errors="raise"`` to stop the stream with the first error instead (annotated with
    its task key; in-flight work is cancelled). Other keywords are feste options for
    this run (``max_concurrency=8``, ``progress=True``, ...).
    """
    from dask.base import is_dask_collection
    from dask.delayed import Delayed

    from feste.schedulers._engine import GraphStream, inline_function, option_keywords
    from feste.task import lazy_call, lazy_values_in

    scheduler = options.pop("scheduler", None)
    if scheduler not in (None, "async", "local"):
        raise SchedulerError(
            f"as_completed runs on the async engine; got scheduler={scheduler!r} "
            "(leave it out, or use feste.compute for other schedulers)"
        )
    checked = option_keywords({**options, "errors": errors})
    with context.set(**checked):  # check the values now rather than mid-stream
        pass
    inline_function(_whole_value)
    items = list(objs)
    ready: dict[int, Any] = {}
    wrapped: dict[int, Any] = {}
    for index, obj in enumerate(items):
        if isinstance(obj, Delayed):
            wrapped[index] = obj
        elif is_dask_collection(obj) or lazy_values_in(obj):
            wrapped[index] = lazy_call(_whole_value, obj, name="as-completed", pure=True)
        else:
            ready[index] = obj
    outputs: dict[Any, list[int]] = {}
    for index, value in wrapped.items():
        outputs.setdefault(value.key, []).append(index)
    graph: dict[Any, Any] = {}
    if wrapped:
        collected, _, _ = FesteGraph.collect(*wrapped.values(), traverse=False)
        graph = collected.to_dict()
        if optimize_graph:
            graph = default_optimizer().optimize(graph, [[key] for key in outputs])
    return GraphStream(graph, outputs, ready, options=checked, preserve_order=preserve_order)
