"""Graph optimization: an :class:`Optimizer` runs a list of :class:`Optimization` passes.

A pass takes the graph dict (key -> ``dask.task_spec`` node) and the output keys, and
returns a new graph in which every output key still yields the same value. Passes may
add nodes (batched requests) and rewrite others (to pick their item out of a batch),
but never remove an output key. ``feste.compute`` runs the default optimizer on the
graph dict itself before dispatch, so the same optimized graph reaches every scheduler,
a distributed Client included (which does not apply a collection's
``__dask_optimize__``).

Automatic batching (:class:`BatchOptimization`)
-----------------------------------------------
Candidates
    ``Task`` nodes whose function is a :class:`~feste.backend.base.BackendCall` of a
    batchable method (``MethodSpec.batchable``: embeddings, legacy completions) with
    exactly one positional argument, the item (a literal, a ``TaskRef`` or a nested
    node). Nodes whose function is a ``BatchCall`` are already batched and are never
    candidates, so running the pass again changes nothing. Chat has no batch endpoint:
    its calls stay separate nodes, and the scheduler's concurrency (many requests in
    flight within the provider's limits) is what makes them fast.

Groups
    Two candidates may share a request when ``BackendCall.batch_group(params)`` is
    equal: same backend identity (class, base URL, settings; the API key is not part
    of it), same method, equal keyword parameters. The pass additionally keeps apart
    backends given different API keys (directly or through their client), comparing a
    salted hash that lives only in memory (``Backend.credential_fingerprint``, part of
    ``batch_group``), so calls are never sent with another backend's key.

What is fused here, and what at run time
    Only calls whose inputs need no other backend call are fused here: each node
    gets a *call level*, the largest number of backend-call nodes (any method) on a
    path from a source up to and including it, and only level-1 candidates are
    candidates. Their inputs are literals or come from local steps (rendering a
    prompt, a plain task), so a batch waits for nothing slow: ``embed("literal")`` and
    ``embed(render(x))`` share a batch and go out at once. A call whose input comes
    from another call (``embed(chat(x))``) is left as its own node: the async
    scheduler gathers such calls as their inputs arrive (runtime coalescing, within the
    ``batch_window`` option), so no request waits for the slowest input of a batch
    planned in advance, and one failed input costs only its own call. The other
    schedulers send those calls one by one. ``explain()`` reports both kinds.

    Safety: a fused node waits for the union of its members' dependencies, so no
    member may depend on another member's output. A member that is an ancestor of
    another call has a descendant of level at least 2, so two level-1 candidates
    never depend on each other, and fusing them cannot create a cycle. The levels are
    computed in one topological sweep (Kahn's algorithm), linear in nodes plus edges.

    A fused batch whose local inputs partly fail (a plain task raising) still goes
    out, with the items whose inputs succeeded: with ``errors="return"`` each failed
    input fails its own item and its own dependents, on every scheduler.

Deduplication
    Identical pure calls already share one key (the key is a hash of the backend
    identity, method, item and parameters), so they are one node. Inside a group the
    pass also sends identical items once: the same literal (strings and other
    hashable values, compared by type and value) or the same ``TaskRef``; every key
    that asked for it takes the same result. Calls made with ``pure=False`` (sampling
    the same prompt several times) are never merged: each keeps its own item, and the
    batch node is marked ``distinct`` so the sender does not merge them either.

Chunking
    The unique items of a group, in graph order, are cut into chunks of at most the
    method's ``batch_size`` and, for literal strings, of at most ``batch_tokens``
    estimated tokens (:func:`feste.backend.spec.chunk_items`, the same rule the sender applies).
    Items that come from other nodes are unknown when the graph is planned and count
    as zero tokens; :func:`feste._calls.run_batch` cuts the real values again at run
    time, so the budget always holds, and ``explain()`` may then under-count requests.

Rewrite
    Each chunk that serves two keys or more becomes one node
    ``Task(batch_key, BatchCall(backend, method), List(item0, item1, ...), **params)``
    (``List`` makes the ``TaskRef`` items dependencies) and each member key becomes
    ``Task(key, take_item, TaskRef(batch_key), index)``, so downstream nodes and outputs
    see the same values under the same keys. A failed item comes back as an
    ``ItemFailure``, and ``take_item`` raises its error under the member's own key.
    ``batch_key`` is ``f"{provider}-{method}-batch-{hash of the sorted member keys}"``,
    deterministic for the same graph. A group, or a chunk, serving a single key keeps
    its original node (a batch of one saves nothing).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from dask.task_spec import GraphNode, List, Task, TaskRef

from feste._nodes import BackendCall, BatchCall, flatten_keys, take_item
from feste.backend.spec import chunk_items

__all__ = [
    "BatchOptimization",
    "Optimization",
    "Optimizer",
    "call_levels",
    "chain_levels",
    "default_optimizer",
]


class Optimization:
    """One graph rewrite. Subclasses implement :meth:`apply`."""

    name = "optimization"

    def apply(self, graph: dict[Any, Any], keys: Sequence[Any]) -> dict[Any, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Optimizer:
    """Applies its passes in order."""

    def __init__(self, optimizations: Iterable[Optimization] = ()) -> None:
        self.optimizations = list(optimizations)
        for optimization in self.optimizations:
            if not isinstance(optimization, Optimization):
                raise TypeError(f"Optimizer takes Optimization instances, got {optimization!r}")

    def optimize(self, graph: Mapping[Any, Any], keys: Any) -> dict[Any, Any]:
        flat_keys = flatten_keys(keys, [])
        optimized = dict(graph)
        for optimization in self.optimizations:
            optimized = optimization.apply(optimized, flat_keys)
        return optimized

    def __repr__(self) -> str:
        return f"Optimizer({self.optimizations!r})"


def _is_call_node(node: Any) -> bool:
    return isinstance(node, Task) and isinstance(node.func, (BackendCall, BatchCall))


def call_levels(graph: Mapping[Any, Any]) -> dict[Any, int] | None:
    """key -> the most backend-call nodes on a path from a source to it, inclusive.

    None when the graph has a cycle (the scheduler reports it). Dependencies outside
    the graph (data held by a distributed cluster) count as sources.
    """
    return chain_levels(graph, _is_call_node)


def chain_levels(graph: Mapping[Any, Any], counted: Callable[[Any], bool]) -> dict[Any, int] | None:
    """key -> how many ``counted`` nodes lie on the longest path from a source to it,
    inclusive; one sweep in dependency order (Kahn's algorithm), linear in nodes plus
    edges. None when the graph has a cycle; dependencies outside it count as sources.
    """
    dependents: dict[Any, list[Any]] = {}
    waiting: dict[Any, int] = {}
    ready: list[Any] = []
    for key, node in graph.items():
        count = 0
        for dep in getattr(node, "dependencies", ()):
            if dep in graph:
                dependents.setdefault(dep, []).append(key)
                count += 1
        if count:
            waiting[key] = count
        else:
            ready.append(key)
    # The level a node inherits from its dependencies, raised as each one is done.
    inherited: dict[Any, int] = {}
    levels: dict[Any, int] = {}
    while ready:
        key = ready.pop()
        level = inherited.get(key, 0)
        if counted(graph[key]):
            level += 1
        levels[key] = level
        for child in dependents.get(key, ()):
            if inherited.get(child, 0) < level:
                inherited[child] = level
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    if len(levels) != len(graph):
        return None
    return levels


def _item_identity(item: Any) -> Any:
    """What makes two items the same request item, or None if unknown."""
    if isinstance(item, TaskRef):
        return ("ref", item.key)
    if isinstance(item, GraphNode):
        return None
    try:
        hash(item)
    except TypeError:
        return None
    return ("literal", type(item), item)


def _keys_digest(keys: Iterable[Any]) -> str:
    """A deterministic hash of a set of graph keys (the name of their batch)."""
    return hashlib.sha1("\0".join(sorted(map(str, keys))).encode()).hexdigest()[:32]


# A group not worked out yet (None is a group: not batchable).
_UNKNOWN: Any = object()


class BatchOptimization(Optimization):
    """Fuse independent calls of one batchable backend method into batched requests.

    See the module docstring for the grouping, safety and chunking rules.
    """

    name = "batch"

    def apply(self, graph: dict[Any, Any], keys: Sequence[Any]) -> dict[Any, Any]:
        groups = self._candidate_groups(graph)
        if not groups:
            return graph
        optimized = dict(graph)
        for members in groups.values():
            if len(members) > 1:
                self._fuse(optimized, members)
        return optimized

    def _candidate_groups(self, graph: Mapping[Any, Any]) -> dict[Any, list[Any]]:
        """group -> level-1 member keys in graph order; empty if nothing to fuse."""
        candidates: list[tuple[Any, Any]] = []
        group_cache: dict[Any, Any] = {}
        # Whether each call function's method is batchable at all (most graphs hold a
        # few functions, shared by many nodes): chat calls are skipped at once.
        batchable: dict[int, bool] = {}
        # Only candidates that wait for other nodes need the call levels: a call with
        # no dependencies is level 1 by definition.
        any_dependent = False
        for key, node in graph.items():
            if not isinstance(node, Task):
                continue
            func = node.func
            if type(func) is not BackendCall or len(node.args) != 1:
                continue
            can_batch = batchable.get(id(func))
            if can_batch is None:
                can_batch = batchable[id(func)] = func.spec.batchable
            if not can_batch:
                continue
            group = self._group_of(func, node.kwargs, group_cache)
            if group is not None:
                candidates.append((key, group))
                if node.dependencies:
                    any_dependent = True
        if len(candidates) < 2:
            return {}
        groups: dict[Any, list[Any]] = {}
        if not any_dependent:
            for key, group in candidates:
                groups.setdefault(group, []).append(key)
            return groups
        levels = call_levels(graph)
        if levels is None:
            return {}
        for key, group in candidates:
            if levels[key] == 1:
                groups.setdefault(group, []).append(key)
        return groups

    @staticmethod
    def _group_of(call: BackendCall, params: Mapping[str, Any], cache: dict[Any, Any]) -> Any:
        # batch_group tokenizes the backend and the parameters; on a large graph most
        # calls repeat a few (backend, method, params), so remember each answer. The
        # types are part of the memo key: 1, 1.0 and True are equal but not the same
        # parameter.
        try:
            cache_key: Any = (
                id(call.backend),
                call.method,
                tuple(params.items()),
                tuple(map(type, params.values())),
            )
            group = cache.get(cache_key, _UNKNOWN)
        except TypeError:  # a parameter value that cannot be hashed
            return call.batch_group(params)
        if group is _UNKNOWN:
            group = cache[cache_key] = call.batch_group(params)
        return group

    @staticmethod
    def _fuse(graph: dict[Any, Any], members: list[Any]) -> None:
        """Replace ``members`` (one group, all of level 1) by batch nodes and item picks."""
        nodes = [graph[key] for key in members]
        first = nodes[0]
        call: BackendCall = first.func
        params = first.kwargs

        unique_items: list[Any] = []
        position_of: dict[Any, int] = {}
        item_index_of_member: list[int] = []
        all_pure = True
        for node in nodes:
            item = node.args[0]
            # An impure call (pure=False, e.g. sampling twice) asks for its own answer.
            if node.func.pure:
                # A str (most items) stands for itself: it never equals another
                # identity, which are tuples.
                identity = item if type(item) is str else _item_identity(item)
            else:
                identity = None
                all_pure = False
            index = position_of.get(identity) if identity is not None else None
            if index is None:
                index = len(unique_items)
                unique_items.append(item)
                if identity is not None:
                    position_of[identity] = index
            item_index_of_member.append(index)

        chunks = chunk_items(call.spec, unique_items)
        chunk_of_item: list[tuple[int, int]] = []  # unique item -> (chunk, offset)
        for chunk_number, chunk in enumerate(chunks):
            for offset in range(len(chunk)):
                chunk_of_item.append((chunk_number, offset))

        served: list[list[tuple[Any, int]]] = [[] for _ in chunks]
        for key, index in zip(members, item_index_of_member):
            chunk_number, offset = chunk_of_item[index]
            served[chunk_number].append((key, offset))

        distinct = not all_pure
        # The call site of each unique item: that of the first member asking for it.
        site_of_item: list[str | None] = [None] * len(unique_items)
        for node, index in zip(reversed(nodes), reversed(item_index_of_member)):
            site_of_item[index] = node.func.call_site
        prefix = f"{call.backend.provider}-{call.method}-batch-"
        first_item = 0
        for chunk, keys_and_offsets in zip(chunks, served):
            chunk_sites = tuple(site_of_item[first_item : first_item + len(chunk)])
            first_item += len(chunk)
            if len(keys_and_offsets) < 2:
                continue  # one key: its original node is already one request
            batch_call = BatchCall(call.backend, call.method, distinct, chunk_sites)
            batch_key = prefix + _keys_digest(key for key, _ in keys_and_offsets)
            graph[batch_key] = Task(batch_key, batch_call, List(chunk), **params)
            batch_ref = TaskRef(batch_key)  # one reference, shared by the item picks
            for key, offset in keys_and_offsets:
                graph[key] = Task(key, take_item, batch_ref, offset)


def default_optimizer() -> Optimizer:
    """The passes ``feste.compute`` applies when ``optimize_graph=True``."""
    return Optimizer([BatchOptimization()])
