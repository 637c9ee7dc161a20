"""``FesteGraph``: the task graph of some lazy values, and tools to look at it.

A graph is a plain dict from key to ``dask.task_spec`` node (``Task``, ``DataNode``,
``Alias``...). :meth:`FesteGraph.collect` merges the graphs of any Dask collections
(feste values, ``dask.delayed`` values) found in its arguments and converts old-style
tuple tasks, so everything downstream sees one representation. ``FesteGraph`` is a
mutable mapping over that dict; its tools never run a task.
"""

from __future__ import annotations

import graphlib
import io
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dask._task_spec import (  # containers public dask does not re-export
    Dict,
    Set,
    Tuple,
    convert_legacy_graph,  # graphs of older collections hold tuples
)
from dask.base import is_dask_collection
from dask.delayed import Delayed, unpack_collections
from dask.order import order as dask_order
from dask.task_spec import Alias, DataNode, GraphNode, List, Task, TaskRef
from dask.utils import ensure_dict, funcname

from feste._batch_jobs import batch_route
from feste._nodes import BackendCall, BatchCall, take_item
from feste.backend.base import NOT_ANSWERED
from feste.backend.prices import price_table
from feste.backend.spec import chunk_items
from feste.backend.types import Usage
from feste.errors import GraphError
from feste.optimization import chain_levels, default_optimizer

__all__ = [
    "FesteGraph",
    "GraphStats",
    "batch_api_calls",
    "batched_at_run_time",
    "build_task",
    "is_plain",
    "merged_graph",
]


@dataclass(frozen=True)
class GraphStats:
    """Counts that describe a graph before it runs.

    ``calls`` counts backend calls per ``"provider.method"``; ``requests`` counts the
    requests they become (a batched node is one request per chunk, as planned by the
    optimizer); ``depth`` is the longest chain of dependencies. ``at_run_time`` counts
    the calls of batchable methods whose inputs come from other calls: the optimizer
    leaves them to the async scheduler, which batches them as their inputs arrive, so
    they cost at most one request each (fewer in practice).

    The estimate of what the calls will be billed, per ``"provider.method"``:
    ``estimated_usage`` (tokens estimated from the inputs known before the run, at 4
    characters a token; output tokens from ``max_tokens`` when set, else as long as
    the input: see ``Backend.estimated_usage``) and ``estimated_cost`` in dollars at
    the price table dated ``price_date`` (None for a method whose model is not
    priced). ``unknown_inputs`` counts calls whose input comes from another node: they
    count no input tokens, so the estimate is then a lower bound. ``batch_api`` counts
    the calls that go to provider Batch API jobs (``batch_api``: the call's or backend's
    setting, else the option), per ``"provider.method"``; they are estimated at batch
    prices.
    """

    nodes: int
    depth: int
    calls: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    at_run_time: dict[str, int] = field(default_factory=dict)
    estimated_usage: dict[str, Usage] = field(default_factory=dict)
    estimated_cost: dict[str, float | None] = field(default_factory=dict)
    unknown_inputs: int = 0
    price_date: str | None = None
    batch_api: dict[str, int] = field(default_factory=dict)

    @property
    def total_cost(self) -> float | None:
        """Estimated dollars of all priced calls; None when no call is priced."""
        known = [cost for cost in self.estimated_cost.values() if cost is not None]
        return round(sum(known), 12) if known else None

    def __str__(self) -> str:
        lines = [f"{_count(self.nodes, 'node')}, depth {self.depth}"]
        for method in sorted(set(self.calls) | set(self.requests)):
            calls = _count(self.calls.get(method, 0), "call")
            requests = _count(self.requests.get(method, 0), "request")
            later = self.at_run_time.get(method, 0)
            jobs = self.batch_api.get(method, 0)
            notes = []
            if later:
                notes.append(f"{later} batched at run time as their inputs arrive")
            if jobs:
                notes.append(f"{jobs} through Batch API jobs at batch prices")
            line = f"  {method}: {calls} -> {'at most ' if later else ''}{requests}"
            if notes:
                line += f" ({', '.join(notes)})"
            lines.append(line)
        if self.estimated_usage:
            lines.extend(self._estimate_lines())
        return "\n".join(lines)

    def _estimate_lines(self) -> list[str]:
        total = self.total_cost
        dated = f" at list prices of {self.price_date}" if self.price_date else ""
        shown = "unknown" if total is None else f"${total:.6f}"
        lines = [f"estimated cost: {shown}{dated}"]
        for method in sorted(self.estimated_usage):
            usage = self.estimated_usage[method]
            cost = self.estimated_cost.get(method)
            amount = "unpriced" if cost is None else f"${cost:.6f}"
            billed = f"{usage.prompt_tokens} input + {usage.completion_tokens} output tokens"
            if usage.search_units:
                billed = _count(usage.search_units, "search")
            lines.append(f"  {method}: {billed}, {amount}")
        if self.unknown_inputs:
            lines.append(
                f"  ({_count(self.unknown_inputs, 'call')} with inputs known only at run time "
                "counted without input tokens)"
            )
        return lines


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


_CONTAINERS: dict[type, Any] = {list: List, tuple: Tuple, set: Set}
# Exact types that are node arguments as they are (most arguments are text).
_LEAVES = frozenset({str, bytes, int, float, bool, type(None)})
# Exact types whose repr() is their value, the same in every process (a subclass may
# define its own repr).
_PLAIN_SCALARS = frozenset({str, int, float, bool, type(None)})
# How deep is_plain looks into nested lists, tuples and dicts.
_PLAIN_DEPTH = 4


def is_plain(value: Any, depth: int = 0) -> bool:
    """True for plain scalars (str, int, float, bool, None; exact types) and lists,
    tuples and dicts of them, a few levels deep: most arguments of LLM calls (a text,
    a list of messages). Such a value holds no lazy value, so it is a node argument as
    it is, and its ``repr()`` is a deterministic, unambiguous text of it."""
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    if depth >= _PLAIN_DEPTH:
        return False
    if kind is list or kind is tuple:
        # Loops, not all(...): this runs for every argument of every call.
        for item in value:  # noqa: SIM110
            if not is_plain(item, depth + 1):
                return False
        return True
    if kind is dict:
        for name, item in value.items():
            if type(name) not in _PLAIN_SCALARS or not is_plain(item, depth + 1):
                return False
        return True
    return False


def _node_argument(value: Any, collections: list[Any]) -> Any:
    """``value`` as a node argument: lazy values become references to their keys.

    Containers holding lazy values become ``task_spec`` containers, so the references
    inside them are dependencies; plain values pass through unchanged. (dask's own
    ``unpack_collections`` culls a graph per lazy element, quadratic for wide lists.)
    """
    kind = type(value)
    if kind in _LEAVES:
        return value
    if isinstance(value, Delayed):
        collections.append(value)
        return TaskRef(value.key)
    container = _CONTAINERS.get(kind)
    if container is not None:
        items = [_node_argument(item, collections) for item in value]
        if any(isinstance(item, (TaskRef, GraphNode)) for item in items):
            return container(*items)
        return value
    if kind is dict:
        entries = {name: _node_argument(item, collections) for name, item in value.items()}
        if any(isinstance(item, (TaskRef, GraphNode)) for item in entries.values()):
            return Dict(entries)
        return value
    if is_dask_collection(value):  # other Dask collections (arrays, bags...)
        unpacked, found = unpack_collections(value)
        collections.extend(found)
        return unpacked
    return value


def build_task(
    key: Any, func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[Task, list[Any]]:
    """A ``Task`` calling ``func(*args, **kwargs)`` and the lazy values it depends on.

    Lazy values in the arguments (also inside lists, tuples, sets and dicts) become
    references to their keys; the caller merges the returned collections' graphs.
    """
    collections: list[Any] = []
    for argument in (*args, *kwargs.values()):
        if type(argument) not in _LEAVES and not is_plain(argument):
            break
    else:  # only plain values (most backend calls): nothing to look into
        return Task(key, func, *args, **kwargs), collections
    node_args = [_node_argument(argument, collections) for argument in args]
    node_kwargs = {name: _node_argument(value, collections) for name, value in kwargs.items()}
    return Task(key, func, *node_args, **node_kwargs), collections


def merged_graph(collections: Iterable[Any]) -> dict[Any, Any]:
    """The one graph of ``collections`` and of everything they depend on.

    A feste value answers ``__feste_node__()`` with ``(key, node, inputs)``: its own
    node and the lazy values its node refers to, so the graph is put together here in
    one walk that visits each key once (dependencies before their dependents), linear
    in the nodes. Merging a graph per node, as ``HighLevelGraph`` does, copies every
    upstream layer at each step: quadratic in the length of a chain. Other Dask
    collections (and feste values that already hold a graph, such as persisted ones)
    contribute their whole graph.
    """
    graph: dict[Any, Any] = {}
    # (value, expanded): a value is expanded once its inputs have been pushed above it.
    stack: list[tuple[Any, bool]] = [(collection, False) for collection in collections]
    stack.reverse()
    while stack:
        value, expanded = stack.pop()
        describe = getattr(type(value), "__feste_node__", None)
        parts = describe(value) if describe is not None else None
        if parts is None:
            graph.update(ensure_dict(value.__dask_graph__()))
            continue
        key, node, inputs = parts
        if key in graph:
            continue
        if expanded:
            graph[key] = node
            continue
        stack.append((value, True))
        for dependency in reversed(inputs):
            stack.append((dependency, False))
    return graph


def _node_label(node: Any) -> str:
    if isinstance(node, Task):
        return funcname(node.func)
    if isinstance(node, Alias):
        return "alias"
    if isinstance(node, DataNode):
        return "data"
    return type(node).__name__


def _backend_calls(node: Any) -> tuple[str, int, int] | None:
    """(``provider.method``, items, requests) for a backend-call node, else None.

    A batched node holds several items and is sent as one request per chunk, cut by
    the same rule as at run time (items not known yet count as zero tokens).
    """
    if not isinstance(node, Task):
        return None
    func = node.func
    if isinstance(func, BackendCall):
        return f"{func.backend.provider}.{func.method}", 1, 1
    if isinstance(func, BatchCall):
        items = node.args[0] if node.args else ()
        batch = list(items.args) if isinstance(items, Task) else list(items)
        n_requests = len(chunk_items(func.backend.spec(func.method), batch)) if batch else 0
        return f"{func.backend.provider}.{func.method}", len(batch), n_requests
    return None


def batch_api_calls(graph: Mapping[Any, Any]) -> dict[str, int]:
    """Per ``provider.method``: the calls of ``graph`` that go to Batch API jobs."""
    counts: Counter[str] = Counter()
    for node in graph.values():
        if not isinstance(node, Task) or not isinstance(node.func, (BackendCall, BatchCall)):
            continue
        func = node.func
        params = {name: _literal(value) for name, value in node.kwargs.items()}
        batch, _ = batch_route(func.backend, func.method, params)
        if not batch:
            continue
        if isinstance(func, BatchCall):
            container = node.args[0] if node.args else ()
            items = container.args if isinstance(container, Task) else container
            counts[f"{func.backend.provider}.{func.method}"] += len(items)
        else:
            counts[f"{func.backend.provider}.{func.method}"] += 1
    return dict(counts)


def batched_at_run_time(graph: Mapping[Any, Any]) -> dict[str, int]:
    """Per ``provider.method``, the calls of batchable methods waiting on other nodes:
    the ones the async scheduler batches as their inputs arrive."""
    found: Counter[str] = Counter()
    for node in graph.values():
        if (
            isinstance(node, Task)
            and type(node.func) is BackendCall
            and node.dependencies
            and node.func.spec.batchable
        ):
            found[f"{node.func.backend.provider}.{node.func.method}"] += 1
    return dict(found)


def _count_calls(graph: Mapping[Any, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """Calls and requests per ``provider.method`` in ``graph`` as it stands.

    A batched node counts one call per key that takes an item out of it (duplicates
    share an item but are still calls), or one per item when nothing takes from it.
    """
    takers: Counter[Any] = Counter()
    for node in graph.values():
        if isinstance(node, Task) and node.func is take_item and node.args:
            source = node.args[0]
            if isinstance(source, TaskRef):
                takers[source.key] += 1
    calls: Counter[str] = Counter()
    requests: Counter[str] = Counter()
    for key, node in graph.items():
        found = _backend_calls(node)
        if found is not None:
            method, n_items, n_requests = found
            calls[method] += takers.get(key) or n_items
            requests[method] += n_requests
    return dict(calls), dict(requests)


def _literal(value: Any) -> Any:
    """A node argument's value when it is known before the run, else NOT_ANSWERED."""
    if isinstance(value, (TaskRef, GraphNode)):
        return NOT_ANSWERED
    return value


def _estimate(
    graph: Mapping[Any, Any],
) -> tuple[dict[str, Usage], dict[str, float | None], int]:
    """Estimated usage and dollars per ``provider.method`` of the calls in ``graph``."""
    grouped: dict[tuple[str, str, str | None, bool], Usage] = {}
    methods: dict[tuple[str, str, str | None, bool], str] = {}
    unknown = 0
    for node in graph.values():
        if not isinstance(node, Task) or not isinstance(node.func, (BackendCall, BatchCall)):
            continue
        func = node.func
        if isinstance(func, BatchCall):
            container = node.args[0] if node.args else ()
            items = list(container.args) if isinstance(container, Task) else list(container)
        else:
            items = [node.args[0]] if node.args else []
        params = {name: _literal(value) for name, value in node.kwargs.items()}
        params = {name: value for name, value in params.items() if value is not NOT_ANSWERED}
        batch, sent = batch_route(func.backend, func.method, params)
        params = dict(sent)
        for item in items:
            known = _literal(item)
            if known is NOT_ANSWERED:
                unknown += 1
                known = None
            usage = func.backend.estimated_usage(func.method, known, params)
            model = usage.model if isinstance(usage.model, str) else None
            group = (func.backend.provider, func.method, model, batch)
            grouped[group] = grouped[group] + usage if group in grouped else usage
            methods[group] = f"{func.backend.provider}.{func.method}"
    table = price_table()
    usage_by_method: dict[str, Usage] = {}
    cost_by_method: dict[str, float | None] = {}
    for group, usage in grouped.items():
        method = methods[group]
        usage_by_method[method] = (
            usage_by_method[method] + usage if method in usage_by_method else usage
        )
        cost = table.cost(group[0], usage, batch=group[3])
        previous = cost_by_method.get(method, 0.0)
        if (method in cost_by_method and previous is None) or cost is None:
            cost_by_method[method] = None
        else:
            cost_by_method[method] = round((previous or 0.0) + cost, 12)
    return usage_by_method, cost_by_method, unknown


def _every_node(node: Any) -> bool:
    return True


class _Slot:
    """Where the i-th collected lazy value sits in the objects given to ``collect``."""

    __slots__ = ("position",)

    def __init__(self, position: int) -> None:
        self.position = position


class _Container:
    """A list, tuple, set or dict that holds lazy values somewhere inside."""

    __slots__ = ("items", "kind")

    def __init__(self, kind: type, items: list[Any]) -> None:
        self.kind = kind
        self.items = items


def _template(
    obj: Any, traverse: bool, collections: list[Any], position_of_key: dict[Any, int]
) -> Any:
    """A template of ``obj`` with _Slot(i) where collection i sits (collected on the way).

    A module function, not a closure: a recursive closure is a reference cycle that
    would keep every collected value (backends and their connection pools included)
    alive until the cycle collector runs.
    """
    # Delayed first: is_dask_collection probes attributes, which costs more.
    if isinstance(obj, Delayed) or is_dask_collection(obj):
        identity = obj.key if isinstance(obj, Delayed) else id(obj)
        position = position_of_key.get(identity)
        if position is None:
            position = position_of_key[identity] = len(collections)
            collections.append(obj)
        return _Slot(position)
    if not traverse:
        return obj
    kind = type(obj)
    if kind in (list, tuple, set, frozenset):
        return _Container(
            kind, [_template(item, traverse, collections, position_of_key) for item in obj]
        )
    if kind is dict:
        return _Container(
            dict,
            [
                (key, _template(value, traverse, collections, position_of_key))
                for key, value in obj.items()
            ],
        )
    return obj


def _fill(template: Any, results: list[Any]) -> Any:
    if isinstance(template, _Slot):
        return results[template.position]
    if isinstance(template, _Container):
        if template.kind is dict:
            return {key: _fill(value, results) for key, value in template.items}
        return template.kind(_fill(item, results) for item in template.items)
    return template


class FesteGraph(MutableMapping[Any, Any]):
    """A task graph: key -> ``dask.task_spec`` node."""

    def __init__(self, graph: Mapping[Any, Any] | None = None) -> None:
        self._graph: dict[Any, Any] = convert_legacy_graph(ensure_dict(graph or {}))

    # -- building ---------------------------------------------------------------------

    @classmethod
    def collect(
        cls, *objs: Any, traverse: bool = True
    ) -> tuple[FesteGraph, list[Any], Callable[[Any], Any]]:
        """The merged graph of every lazy value in ``objs``.

        Returns ``(graph, collections, repack)``: ``collections`` are the lazy values
        found (also inside lists, tuples, dicts when ``traverse``), and
        ``repack(results)`` rebuilds ``objs`` with one result per collection.
        """
        collections: list[Any] = []
        position_of_key: dict[Any, int] = {}
        templates = [_template(obj, traverse, collections, position_of_key) for obj in objs]

        def repack(results: Any) -> tuple[Any, ...]:
            results = list(results)
            return tuple(_fill(template, results) for template in templates)

        return cls(merged_graph(collections)), collections, repack

    # -- mapping ----------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        return self._graph[key]

    def __setitem__(self, key: Any, node: Any) -> None:
        self._graph[key] = node

    def __delitem__(self, key: Any) -> None:
        del self._graph[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._graph)

    def __len__(self) -> int:
        return len(self._graph)

    def __repr__(self) -> str:
        return f"<FesteGraph: {len(self._graph)} nodes>"

    def to_dict(self) -> dict[Any, Any]:
        """A shallow copy of the underlying dict."""
        return dict(self._graph)

    # -- structure --------------------------------------------------------------------

    def get_all_dependencies(self) -> dict[Any, set[Any]]:
        """key -> keys it depends on directly (only keys inside this graph)."""
        deps: dict[Any, set[Any]] = {}
        for key, node in self._graph.items():
            node_deps: frozenset[Any] = getattr(node, "dependencies", frozenset())
            missing = [d for d in node_deps if d not in self._graph]
            if missing:
                raise GraphError(
                    f"task {key!r} depends on {missing[0]!r}, which is not in the graph"
                )
            deps[key] = set(node_deps)
        return deps

    def get_all_dependents(self) -> dict[Any, set[Any]]:
        dependents: dict[Any, set[Any]] = {key: set() for key in self._graph}
        for key, deps in self.get_all_dependencies().items():
            for dep in deps:
                dependents[dep].add(key)
        return dependents

    def topological_sorter(self) -> graphlib.TopologicalSorter[Any]:
        """A ``graphlib.TopologicalSorter`` over the graph (dependencies first)."""
        return graphlib.TopologicalSorter(self.get_all_dependencies())

    def topological_order(self) -> list[Any]:
        try:
            return list(self.topological_sorter().static_order())
        except graphlib.CycleError as exc:
            raise GraphError(f"the graph has a cycle through {exc.args[1]!r}") from None

    def order(self) -> dict[Any, int]:
        """``dask.order`` priorities: lower runs first, following the critical path."""
        return dict(dask_order(self._graph))

    def depth(self) -> int:
        """The number of nodes on the longest chain of dependencies."""
        graph = self._graph
        for node in graph.values():
            if any(dependency not in graph for dependency in getattr(node, "dependencies", ())):
                self.get_all_dependencies()  # raises the error naming it
        levels = chain_levels(graph, _every_node)
        if levels is None:
            self.topological_order()  # raises the error naming the cycle
            return 0
        return max(levels.values(), default=0)

    def backend_calls(self) -> tuple[dict[str, int], dict[str, int]]:
        """Per ``provider.method``: the calls this graph holds and the requests it would
        send as it stands (a batched node sends one request per chunk)."""
        return _count_calls(self._graph)

    def estimated_usage(self) -> tuple[dict[str, Usage], dict[str, float | None], int]:
        """``(usage, dollars, unknown inputs)`` estimated for the calls of this graph as
        it stands, per ``provider.method`` (see :class:`GraphStats`). Nothing runs."""
        return _estimate(self._graph)

    def stats(self, optimize: bool = True) -> GraphStats:
        """Node count, depth, backend calls, the requests they become, and their cost.

        ``nodes``, ``depth`` and ``calls`` describe this graph; ``requests`` and the
        estimates are made on the graph the default optimizer makes of it (batching,
        deduplication), or on this graph as it stands when ``optimize`` is false.
        Nothing runs.
        """
        calls, requests = self.backend_calls()
        planned = self._graph
        if optimize and calls:
            planned = default_optimizer().optimize(self._graph, list(self._graph))
            _, requests = _count_calls(planned)
        usage, cost, unknown = _estimate(planned)
        date = price_table().date if usage else None
        return GraphStats(
            len(self._graph),
            self.depth(),
            calls,
            requests,
            at_run_time=batched_at_run_time(planned),
            batch_api=batch_api_calls(planned),
            estimated_usage=usage,
            estimated_cost=cost,
            unknown_inputs=unknown,
            price_date=date,
        )

    # -- display ----------------------------------------------------------------------

    def _describe(self, key: Any) -> str:
        node = self._graph[key]
        deps = sorted(map(str, getattr(node, "dependencies", ())))
        arrow = f" <- {', '.join(deps)}" if deps else ""
        return f"{key} = {_node_label(node)}{arrow}"

    def print(self, file: IO[str] | None = None) -> None:
        """Print one line per node, dependencies first."""
        out = file or sys.stdout
        for key in self.topological_order():
            print(self._describe(key), file=out)

    def __str__(self) -> str:
        buffer = io.StringIO()
        self.print(file=buffer)
        return buffer.getvalue()

    def to_dot(self) -> str:
        """The graph in Graphviz's dot language (labels show function names, never values)."""
        lines = ["digraph feste {", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica"];']
        ids = {key: f"n{index}" for index, key in enumerate(self._graph)}
        for key, node in self._graph.items():
            label = f"{_node_label(node)}\\n{str(key)[:48]}".replace('"', "'")
            lines.append(f'  {ids[key]} [label="{label}"];')
        for key, deps in self.get_all_dependencies().items():
            for dep in sorted(deps, key=str):
                lines.append(f"  {ids[dep]} -> {ids[key]};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def visualize(
        self, filename: str | Path = "feste-graph.png", format: str | None = None
    ) -> Path:
        """Render the graph with Graphviz to ``filename`` (png, svg, pdf or dot)."""
        path = Path(filename)
        fmt = (format or path.suffix.lstrip(".") or "png").lower()
        if fmt not in ("png", "svg", "pdf", "dot"):
            raise ValueError(f"cannot render format {fmt!r}; use png, svg, pdf or dot")
        dot_source = self.to_dot()
        if fmt == "dot":
            path.write_text(dot_source)
            return path
        if shutil.which("dot") is None:
            raise RuntimeError(
                "rendering needs Graphviz's `dot` program, which is not on PATH: install "
                "Graphviz (e.g. `apt-get install graphviz` or `brew install graphviz`), "
                "or save the source with visualize('graph.dot')"
            )
        import subprocess

        result = subprocess.run(
            ["dot", f"-T{fmt}", "-o", str(path)],
            input=dot_source.encode(),
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"dot failed: {result.stderr.decode(errors='replace').strip()}")
        return path
