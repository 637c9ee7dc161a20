"""Answering a whole graph's known calls from the cache before it runs.

Design
------
This sits with ``feste.compute`` (the top layer), since it reads graph nodes; the
cache package below it knows nothing of graphs.

The sender (:mod:`feste._calls`) consults the cache call by call, on every scheduler.
A warm re-run would still schedule every call node, start a coroutine or a worker task
for it and wait for its lookup. :func:`replay_cached_calls` does the lookups of a whole
graph first, in one bulk query: every pure call node whose inputs are all known before
the run (no dependencies) and whose answer is stored becomes a data node holding that
answer, so it never runs at all. A batched node is replaced when all its items are
stored; otherwise it runs and the sender answers its stored items one by one. Calls
whose inputs come from other nodes, ``pure=False`` calls (their answers depend on
their order within a run), and calls whose value the backend finishes after the cache
(structured outputs, whole answers: the cache holds their answer, not their value) are
left to the sender. Replayed calls are told to the current observer
(``RunObserver.calls_cached``), as the sender tells its own hits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dask.task_spec import DataNode, GraphNode, Task

from feste._calls import tell_cached
from feste._nodes import BackendCall, BatchCall
from feste.cache._codec import decode
from feste.cache._open import active_store
from feste.cache._session import current_tally
from feste.cache.keys import call_head, item_key

__all__ = ["replay_cached_calls"]

# A value not decoded yet (None is a value).
_NOT_DECODED: Any = object()


def _literal(arg: Any) -> Any:
    """A node argument's value; it has no dependencies, so nothing to look up."""
    if isinstance(arg, GraphNode):
        return arg({})
    return arg


# Per call of a graph: (whether the backend finishes its value after the cache, the
# head of its cache keys), remembered per backend, method and parameters.
_CallFacts = tuple[bool, str]


def _call_facts(func: Any, params: dict[str, Any], memo: dict[Any, _CallFacts]) -> _CallFacts:
    """What the cache needs to know of a call that is the same for every call of one
    backend, method and parameters (a graph's calls repeat a few of them)."""
    try:
        memo_key: Any = (
            id(func.backend),
            func.method,
            tuple(params.items()),
            tuple(map(type, params.values())),
        )
        facts = memo.get(memo_key)
    except TypeError:  # a parameter value that cannot be hashed
        memo_key, facts = None, None
    if facts is None:
        finishes = bool(func.backend.finishes(func.method, params))
        facts = (finishes, "" if finishes else call_head(func.backend, func.method, params))
        if memo_key is not None:
            memo[memo_key] = facts
    return facts


def _literal_params(kwargs: dict[str, Any]) -> dict[str, Any]:
    for value in kwargs.values():
        if isinstance(value, GraphNode):
            return {name: _literal(value) for name, value in kwargs.items()}
    return kwargs  # the usual case: parameters are plain values


def replay_cached_calls(graph: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """``graph`` with the call nodes the cache can answer replaced by their answers.

    Returns ``graph`` itself when caching is off or nothing is answered.
    """
    store = active_store()
    if store is None:
        return graph
    # graph key -> (whole batch?, cache key per item)
    planned: dict[Any, tuple[bool, list[str]]] = {}
    facts_memo: dict[Any, _CallFacts] = {}
    calls: dict[Any, tuple[Any, list[Any], dict[str, Any]]] = {}  # graph key -> call
    for key, node in graph.items():
        if type(node) is not Task or node.dependencies or len(node.args) != 1:
            continue
        func: Any = node.func
        kind = type(func)
        if kind is BackendCall and func.pure:
            items = [_literal(node.args[0])]
        elif kind is BatchCall and not func.distinct:
            items = list(_literal(node.args[0]))
        else:
            continue
        params = _literal_params(node.kwargs)
        finishes, head = _call_facts(func, params, facts_memo)
        if finishes:
            continue
        planned[key] = (kind is BatchCall, [item_key(head, item) for item in items])
        calls[key] = (func, items, params)
    if not planned:
        return graph
    wanted = list(dict.fromkeys(k for _, keys in planned.values() for k in keys))
    found = store.get_many(wanted)
    if not found:
        return graph
    replayed = dict(graph)
    answered = 0
    decoded: dict[str, Any] = {}
    for key, (whole, cache_keys) in planned.items():
        values = []
        for cache_key in cache_keys:
            value = decoded.get(cache_key, _NOT_DECODED)
            if value is _NOT_DECODED:
                text = found.get(cache_key)
                if text is None:
                    break  # not stored: the call runs (and a batch with it)
                value = decoded[cache_key] = decode(text)
            values.append(value)
        else:
            replayed[key] = DataNode(key, values if whole else values[0])
            answered += len(cache_keys)
            func, items, params = calls[key]
            tell_cached(func.backend, func.method, items, values, params)
    tally = current_tally.get()
    if tally is not None:
        tally.add(hits=answered)
    return replayed
