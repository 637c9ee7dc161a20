"""``feste.compute`` and friends: collect the graph, optimize it, hand it to a scheduler.

Design
------
There is one path from lazy values to results, and every entry point takes it:

1. **collect** (:func:`prepare`): :meth:`FesteGraph.collect` merges the graphs of the
   lazy values found in the arguments and remembers how to put the results back in
   place;
2. **optimize**: the default optimizer (batching, deduplication) rewrites the graph
   dict, unless ``optimize_graph=False``;
3. **run**: the scheduler chosen by name, ``get`` function or distributed ``Client``
   (:func:`feste.schedulers.get_scheduler`) computes the output keys.

:func:`compute`, :func:`compute_async`, :func:`as_completed`, :func:`explain` (which
stops before running), ``FesteDelayed.compute()`` and ``dask.compute`` on feste values
(:func:`run_dask_graph`, the collections' ``__dask_scheduler__``) all go through
:func:`prepare` or :func:`run_graph_dict`. Lazy values themselves (:mod:`feste.task`)
live one layer up and call into here, as dask's collections call their schedulers.

With a budget (``max_cost``), every entry point estimates the run before it starts
(:func:`check_budget`, on the graph left after the cache answered what it could): the
requests the graph's calls would send, built as the sender builds them and priced by
the rule the sender reserves with (:func:`feste.limits.request_cost_estimate`), so a
run that passes the check is not stopped by its own reservations unless its guesses
were low (inputs known only at run time count :data:`~feste.limits.ASSUMED_INPUT_TOKENS`
each). Above the budget the run is refused with :class:`~feste.errors.BudgetExceeded`
unless ``over_estimate="start"``; either way the sender enforces the budget per
request (:mod:`feste.limits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from dask._task_spec import convert_legacy_graph
from dask.base import is_dask_collection, tokenize
from dask.delayed import Delayed
from dask.task_spec import GraphNode, Task, TaskRef
from dask.utils import ensure_dict, funcname

from feste import context
from feste._batch_jobs import batch_route
from feste._nodes import BackendCall, BatchCall
from feste._replay import replay_cached_calls
from feste._runs import record_run
from feste.backend.prices import price_table
from feste.backend.spec import chunk_items
from feste.errors import BudgetExceeded, FesteError, SchedulerError
from feste.graph import FesteGraph, GraphStats, batch_api_calls, batched_at_run_time, build_task
from feste.limits import (
    ASSUMED_INPUT_TOKENS,
    ASSUMED_OUTPUT_TOKENS,
    request_cost_estimate,
    unpriced_error,
)
from feste.optimization import default_optimizer
from feste.schedulers import SCHEDULERS, get_scheduler
from feste.schedulers._engine import inline_function, run_graph
from feste.schedulers._policy import option_keywords
from feste.schedulers._stream import GraphStream
from feste.schedulers.cluster import ClusterScheduler
from feste.trace import record_trace

__all__ = [
    "Prepared",
    "RunEstimate",
    "as_completed",
    "check_budget",
    "compute",
    "compute_async",
    "estimate_run_cost",
    "explain",
    "prepare",
    "run_dask_graph",
    "run_graph_dict",
]


@dataclass
class Prepared:
    """A collected and optimized graph, ready to run, and how to hand results back."""

    graph: dict[Any, Any]
    keys: list[Any]
    repack: Callable[[Any], tuple[Any, ...]]
    postcomputes: list[Any]
    #: The graph as collected, before optimization (``explain`` counts its calls).
    collected: FesteGraph

    def finish(self, results: Any) -> tuple[Any, ...]:
        """The caller's objects with each result in place."""
        values = [
            finalize(result, *args) for result, (finalize, args) in zip(results, self.postcomputes)
        ]
        return self.repack(values)


def _optimized(graph: dict[Any, Any], keys: list[Any], optimize_graph: bool) -> dict[Any, Any]:
    if optimize_graph and graph:
        return default_optimizer().optimize(graph, keys)
    return graph


def prepare(*objs: Any, optimize_graph: bool = True, traverse: bool = True) -> Prepared:
    """Collect and optimize the graph of ``objs`` (steps 1 and 2 of the module docstring)."""
    collected, collections, repack = FesteGraph.collect(*objs, traverse=traverse)
    keys = [collection.__dask_keys__() for collection in collections]
    postcomputes = [collection.__dask_postcompute__() for collection in collections]
    graph = _optimized(collected.to_dict(), keys, optimize_graph)
    return Prepared(graph, keys, repack, postcomputes, collected)


def run_graph_dict(
    graph: Mapping[Any, Any], keys: Any, scheduler: Any = None, **kwargs: Any
) -> Any:
    """Step 3: run an optimized graph dict on a scheduler and return the key values.

    Keywords go to the scheduler: feste's own take feste options (``errors=``,
    ``max_concurrency=``...) for this computation and refuse anything else. With a
    budget (``max_cost``) the run is estimated first (:func:`check_budget`).
    """
    get = get_scheduler(scheduler)
    check_budget(graph, get, kwargs)
    return get(graph, keys, **kwargs)


# -- the budget ------------------------------------------------------------------------

# The options the estimate reads: the budget's, and the Batch API's (batch prices).
_BUDGET_OPTIONS = ("batch_api", "batch_api_on_expiry", "max_cost", "over_estimate")


@dataclass(frozen=True)
class RunEstimate:
    """What the backend calls of a graph may cost (:func:`estimate_run_cost`).

    ``dollars`` sums the bound of every request; ``calls`` and ``requests`` count them;
    ``unknown_inputs`` counts calls whose input comes from another call (estimated at
    :data:`~feste.limits.ASSUMED_INPUT_TOKENS`), ``assumed_outputs`` requests without
    ``max_tokens`` (:data:`~feste.limits.ASSUMED_OUTPUT_TOKENS` per answer);
    ``unpriced`` names the ``(provider, model)`` pairs the price table lacks.
    """

    dollars: float
    calls: int
    requests: int
    unknown_inputs: int
    assumed_outputs: int
    unpriced: tuple[tuple[str, str | None], ...]


def _known(value: Any) -> bool:
    return not isinstance(value, (TaskRef, GraphNode))


def estimate_run_cost(graph: Mapping[Any, Any]) -> RunEstimate:
    """An upper bound of what the backend calls of ``graph`` may cost, running nothing.

    Each call node's requests are built as the sender builds them (a batched node is
    cut into chunks by the same rule) and priced by
    :func:`~feste.limits.request_cost_estimate`, the bound the sender reserves. An
    input that comes from another call is assumed to be
    :data:`~feste.limits.ASSUMED_INPUT_TOKENS` tokens long; a call whose request
    cannot be built before the run (a parameter comes from another call) is priced by
    ``Backend.estimated_usage``.
    """
    placeholder = "x" * (4 * ASSUMED_INPUT_TOKENS)
    online_on_expiry = context.get("batch_api_on_expiry") == "online"
    table = price_table()
    dollars = 0.0
    calls = requests = unknown = assumed = 0
    unpriced: dict[tuple[str, str | None], None] = {}
    for node in graph.values():
        if not isinstance(node, Task) or not isinstance(node.func, (BackendCall, BatchCall)):
            continue
        func = node.func
        backend, method = func.backend, func.method
        if isinstance(func, BatchCall):
            container = node.args[0] if node.args else ()
            items = list(container.args) if isinstance(container, Task) else list(container)
            chunks = chunk_items(backend.spec(method), [_assumed(i, placeholder) for i in items])
        else:
            items = [node.args[0]] if node.args else []
            chunks = [[_assumed(item, placeholder) for item in items]]
        known_params = {name: value for name, value in node.kwargs.items() if _known(value)}
        # Batch API calls are priced at batch prices, and sent without their routing.
        batch, params = batch_route(backend, method, known_params)
        # As the sender reserves: at online prices when an expired job may go online.
        batch = batch and not online_on_expiry
        calls += len(items)
        unknown += sum(1 for item in items if not _known(item))
        for chunk in chunks:
            requests += 1
            try:
                request = backend.build_request(method, chunk, params)
            except FesteError:
                usage = None
                for item in chunk:
                    estimate = backend.estimated_usage(method, item, params)
                    usage = estimate if usage is None else usage + estimate
                model = None if usage is None else usage.model
                cost = None if usage is None else table.cost(backend.provider, usage, batch=batch)
            else:
                priced = request_cost_estimate(backend, request, batch=batch)
                model, cost = priced.model, priced.dollars
                assumed += priced.assumed_output
            if cost is None:
                unpriced[(backend.provider, model)] = None
            else:
                dollars += cost
    return RunEstimate(round(dollars, 12), calls, requests, unknown, assumed, tuple(unpriced))


def _assumed(item: Any, placeholder: str) -> Any:
    """``item``, or a text of the assumed size where it is known only at run time."""
    return item if _known(item) else placeholder


def _scheduler_name(get: Any) -> str:
    if isinstance(get, ClusterScheduler):
        return "the cluster scheduler (a distributed.Client)"
    return f"the get function {funcname(get)!r}"


def check_budget(graph: Mapping[Any, Any], get: Any, kwargs: Mapping[str, Any]) -> None:
    """Before a run: refuse it when ``max_cost`` (a keyword in ``kwargs`` or the
    context's) is below the estimated cost and ``over_estimate`` is ``"refuse"``, when a
    model is not priced, or when the scheduler ``get`` cannot enforce a budget."""
    options = {name: kwargs[name] for name in _BUDGET_OPTIONS if name in kwargs}
    with context.set(**options):
        budget = context.get("max_cost")
        over_estimate = context.get("over_estimate")
        if budget is None:
            return
        estimate = estimate_run_cost(graph)
    if not any(get is module.get for module in SCHEDULERS.values()):
        raise SchedulerError(
            f"max_cost is enforced by feste's own schedulers "
            f"({', '.join(map(repr, sorted(SCHEDULERS)))}), not by {_scheduler_name(get)}, "
            "which cannot keep one budget for the whole computation: use one of those "
            "schedulers, or leave max_cost unset"
        )
    if estimate.unpriced:
        provider, model = estimate.unpriced[0]
        raise unpriced_error(provider, model)
    if estimate.dollars <= budget or over_estimate == "start":
        return
    guesses = []
    if estimate.unknown_inputs:
        guesses.append(
            f"{_plural(estimate.unknown_inputs, 'call')} whose input comes from another "
            f"call counted at {ASSUMED_INPUT_TOKENS} input tokens each"
        )
    if estimate.assumed_outputs:
        guesses.append(
            f"{_plural(estimate.assumed_outputs, 'request')} without max_tokens counted at "
            f"{ASSUMED_OUTPUT_TOKENS} output tokens per answer"
        )
    assumptions = f" ({'; '.join(guesses)})" if guesses else ""
    raise BudgetExceeded(
        f"estimated cost ${estimate.dollars:.6f} of {_plural(estimate.calls, 'call')} "
        f"({_plural(estimate.requests, 'request')}) is above max_cost=${budget:.6f}"
        f"{assumptions}; nothing was sent. Raise max_cost, set max_tokens for a tighter "
        "estimate, or pass over_estimate='start' to run anyway (no request is sent once "
        "the budget would be passed)",
        estimate=estimate.dollars,
        budget=budget,
        unknown_inputs=estimate.unknown_inputs,
    )


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def run_dask_graph(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """``dask.compute(feste_value)`` lands here: optimize and run on feste's scheduler.

    Dask hands over an expression or a graph; both become a plain dict of
    ``task_spec`` nodes first. The optimizer runs here because dask does not apply
    ``__dask_optimize__`` everywhere.
    """
    if hasattr(dsk, "__dask_graph__"):
        dsk = dsk.__dask_graph__()
    graph = convert_legacy_graph(ensure_dict(dsk))
    return run_graph_dict(_optimized(graph, keys, True), keys, **kwargs)


def compute(
    *objs: Any,
    scheduler: Any = None,
    optimize_graph: bool = True,
    traverse: bool = True,
    cache: Any = None,
    run: str | None = None,
    trace: str | os.PathLike[str] | None = None,
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
    are looked up where they are sent. ``trace`` is a file to write a Chrome/Perfetto
    trace of the run's requests to (:mod:`feste.trace`). Extra keywords go to the
    scheduler.
    """
    with context.set(**_cache_options(cache, run)), _traced(trace):
        prepared = prepare(*objs, optimize_graph=optimize_graph, traverse=traverse)
        if not prepared.keys:
            return objs
        name = context.get("run")
        if name is None:
            graph = replay_cached_calls(prepared.graph)
            return prepared.finish(run_graph_dict(graph, prepared.keys, scheduler, **kwargs))
        chosen = scheduler if scheduler is not None else context.get("scheduler")
        with record_run(
            name, prepared.graph, objs, scheduler=chosen, traverse=traverse
        ) as recording:
            graph = replay_cached_calls(prepared.graph)
            results = run_graph_dict(graph, prepared.keys, scheduler, **kwargs)
            values = prepared.finish(results)
            recording.finished(values)
        return values


# -- cache, run and trace options ------------------------------------------------------


@contextlib.contextmanager
def _traced(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Record a trace of the requests made inside the block when ``path`` is given."""
    if path is None:
        yield
        return
    with record_trace(path):
        yield


def _cache_options(cache: Any, run: str | None) -> dict[str, Any]:
    """The ``cache`` and ``run`` arguments given (None: not given) as context options."""
    options: dict[str, Any] = {}
    if cache is not None:
        options["cache"] = cache
    if run is not None:
        options["run"] = run
    return options


def explain(*objs: Any, optimize_graph: bool = True) -> GraphStats:
    """What computing ``objs`` would do, and about what it would cost, running nothing.

    Reports the node count and depth of the graph that would run, and per backend
    method how many calls the graph holds and how many requests they become after
    optimization (``str()`` of the result: ``"openai.embed: 5000 calls -> 3 requests"``),
    then the estimated tokens and dollars of those requests at the price table's list
    prices (:class:`~feste.graph.GraphStats`; ``"estimated cost: $0.0012 ..."``).
    Calls whose inputs come from other calls are batched by the async scheduler as
    they arrive: they count as at most one request each, and the line says so.
    """
    prepared = prepare(*objs, optimize_graph=optimize_graph)
    calls, _ = prepared.collected.backend_calls()
    graph = FesteGraph(prepared.graph)
    _, requests = graph.backend_calls()
    usage, cost, unknown = graph.estimated_usage()
    date = price_table().date if usage else None
    return GraphStats(
        len(graph),
        graph.depth(),
        calls,
        requests,
        at_run_time=batched_at_run_time(prepared.graph),
        batch_api=batch_api_calls(prepared.graph),
        estimated_usage=usage,
        estimated_cost=cost,
        unknown_inputs=unknown,
        price_date=date,
    )


def _runs_on_engine(scheduler: Any) -> bool:
    if scheduler is None:
        scheduler = context.get("scheduler")
    return scheduler is None or scheduler in ("async", "local")


async def compute_async(
    *objs: Any,
    scheduler: Any = None,
    optimize_graph: bool = True,
    traverse: bool = True,
    cache: Any = None,
    run: str | None = None,
    trace: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """``await feste.compute_async(...)``: :func:`compute` for async code.

    With the async scheduler (the default) the graph runs on the caller's event loop,
    next to whatever else it runs; keywords are feste options for this computation
    (``errors="return"``, ``max_concurrency=...``). Another scheduler runs in a worker
    thread, so the loop is never blocked. ``cache``, ``run`` and ``trace`` are those of
    :func:`compute`.
    """
    with context.set(**_cache_options(cache, run)), _traced(trace):
        prepared = prepare(*objs, optimize_graph=optimize_graph, traverse=traverse)
        if not prepared.keys:
            return objs

        async def results() -> Any:
            graph = replay_cached_calls(prepared.graph)
            if _runs_on_engine(scheduler):
                with context.set(**option_keywords(kwargs)):
                    check_budget(graph, get_scheduler("async"), {})
                    return await run_graph(graph, prepared.keys)
            # to_thread copies this context, so run recording reaches the thread.
            return await asyncio.to_thread(
                run_graph_dict, graph, prepared.keys, scheduler, **kwargs
            )

        name = context.get("run")
        if name is None:
            return prepared.finish(await results())
        chosen = scheduler if scheduler is not None else context.get("scheduler")
        with record_run(
            name, prepared.graph, objs, scheduler=chosen, traverse=traverse
        ) as recording:
            values = prepared.finish(await results())
            recording.finished(values)
        return values


@inline_function
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
    scheduler = options.pop("scheduler", None)
    if scheduler not in (None, "async", "local"):
        raise SchedulerError(
            f"as_completed runs on the async engine; got scheduler={scheduler!r} "
            "(leave it out, or use feste.compute for other schedulers)"
        )
    checked = option_keywords({**options, "errors": errors})
    with context.set(**checked):  # check the values now rather than mid-stream
        pass
    ready: dict[int, Any] = {}
    outputs: dict[Any, list[int]] = {}
    graph: dict[Any, Any] = {}
    collections: list[Any] = []
    for index, obj in enumerate(objs):
        if isinstance(obj, Delayed):
            key = obj.key
            collections.append(obj)
        elif is_dask_collection(obj) or FesteGraph.collect(obj)[1]:
            # A structure holding lazy values is one output: a node returning it whole.
            key = f"as-completed-{tokenize(obj)}"
            node, found = build_task(key, _whole_value, (obj,), {})
            graph[key] = node
            collections.extend(found)
        else:
            ready[index] = obj
            continue
        outputs.setdefault(key, []).append(index)
    if collections:
        collected, _, _ = FesteGraph.collect(*collections, traverse=False)
        graph.update(collected.to_dict())
        graph = _optimized(graph, [[key] for key in outputs], optimize_graph)
        with context.set(**checked):
            check_budget(graph, get_scheduler("async"), {})
    return GraphStream(graph, outputs, ready, options=checked, preserve_order=preserve_order)
