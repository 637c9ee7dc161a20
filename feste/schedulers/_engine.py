"""The async execution engine behind ``scheduler="async"`` (feste's default).

One :class:`Engine` runs one optimized graph on one asyncio event loop. It is a state
machine driven by completions: every node is *waiting* (for dependencies), *ready*,
*running*, or *settled* (finished, failed or cancelled), and each completion moves its
dependents along. There is no polling loop: work starts from :meth:`Engine._pump`,
called after every batch of completions.

Where each node runs
--------------------
* **Backend calls** (``Task`` whose function is a ``BackendCall`` or ``BatchCall``) run
  as coroutines on the loop, awaiting :func:`feste._calls.run_call` /
  :func:`~feste._calls.run_batch` directly (``BackendCall.__call__`` would block). They
  are started in exactly one place, :meth:`Engine._send`. Calls of a batchable method
  that become ready at different moments are *coalesced*: calls of one batch group
  (``BackendCall.batch_group``) wait up to the ``batch_window`` option, or until the
  method's batch size is reached, and go out as one ``run_batch`` request in which each
  key gets its own value or its own failure.
* **async feste tasks** (``async def`` functions) are awaited on the loop.
* **Cheap internal nodes** (``DataNode``, ``Alias``, item picks such as ``take_item``
  and ``operator.getitem``, dask's ``List``/``Tuple``/``Set``/``Dict`` containers) run
  inline on the loop, without an asyncio task.
* **Plain Python tasks** run in worker threads (``num_workers``, default
  ``max(4, cores)``), or in processes when the ``python_executor`` option says
  ``"processes"`` (the pools are :mod:`feste.schedulers._pools`). Ready tasks are sent
  in chunks sized from their measured run time (about 2 ms of work per chunk for
  threads, 50 ms for processes), so that thousands of trivial tasks cost a few
  hand-offs, and long tasks still spread over all workers. Workers hand results back in
  bulk with one loop wake-up.

Every node runs inside the ``contextvars`` context captured where the computation
started, so options and callbacks set with ``feste.context.set`` apply in worker
threads and coroutines alike.

Task-selection policy
---------------------
Python tasks are ordered by ``dask.order.order`` (memory-friendly). Backend calls are
ordered by the critical path of calls: each call's *chain priority* is the length of
the longest chain of backend calls through it (calls before it plus calls still to
come after it), ties going to the call with more calls still to come, then to
``dask.order``. Ready Python tasks leave a priority heap while fewer than two chunks
per worker are queued; ready backend calls leave one heap per backend object, highest
chain priority first, while fewer of its started calls than its ``max_concurrency``
are in flight or waiting for admission (calls waiting to retry hold no admission and
do not count), and under a cap (four times its ``max_concurrency`` and at least 64,
else 1024): a call is started when it can be admitted, not parked at the limiter.
Inline nodes run as soon as they are ready. At the start, the nodes that need nothing
are readied best first in slices of ``_START_SLICE`` units of work (a call or an async
task counts ``_CALL_UNITS``, any other node one), with a turn of the loop between slices,
so the first requests leave, and their connections open, while the rest of a large
graph is readied (Python tasks are handed to the workers once all are readied, and batch
groups opened then wait their ``batch_window`` from the end of the start). A task whose
request is answered goes on with the next call of its lane when there is room, so the
next request leaves without waiting for a new task to start; the keys of an answer
without failures are settled a moment later, by one callback for all the answers read
in the same turn of the loop, so their bookkeeping never holds back the next requests
(a failure is settled at once: a run that stops at its first error sends nothing more).
The requests of single calls waiting in a lane are built ahead
(``feste._calls.prepare_call``), in a turn of the loop of their own after the start, a
millisecond at a time and at most ``_PREPARE_AHEAD`` per lane: the loop builds them
while it waits for answers, and an answer's next request only has to be sent.
The limiters (:mod:`feste.limits`) then decide when a started call is sent, serving
waiters by the same chain priority (``feste._calls.call_priority``) and then in arrival
order: when requests are scarce, a chain of five dependent calls next to hundreds of
independent ones is not sent last.

State
-----
``nodes`` (key -> graph node of the needed part of the graph), ``kind`` (how each node
runs), ``dependents`` and ``waiting`` (number of dependencies not yet finished),
``priority``, ``refs`` (dependents that have not settled yet: a value is released as
soon as it drops to zero, output values are kept), ``values``, ``failures``
(``errors="return"``), the ready structures above, ``tasks`` (asyncio tasks in
flight) and counters (``remaining``, ``done``, ``failed``, ``running``).

Failure
-------
The policy is the one every scheduler shares (:mod:`feste.schedulers._policy`). With
``errors="raise"`` the first failure, annotated with its task key, stops the run:
in-flight requests are cancelled and awaited (no orphan request keeps running) and the
error is raised. With ``errors="return"`` the failed key settles to a
:class:`~feste.errors.Failure`, its dependents to what
:func:`~feste.schedulers._policy.dependent_failure` says (cancelled, or the same error
for an item pick or an alias), and everything independent finishes. Every result
lands in :meth:`Engine._finish` and every failure in :meth:`Engine._fail`: callbacks,
caches and traces hook in there.

An ``on_output`` hook sees each output as it settles: streaming
(:mod:`feste.schedulers._stream`) is built on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import copy
import heapq
import math
import operator
import os
import sys
import time
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from dask._task_spec import (
    Alias,
    DataNode,
    GraphNode,
    List,
    NestedContainer,
    Task,
    TaskRef,
    convert_legacy_graph,
)
from dask._task_spec import identity as _dask_identity
from dask.order import order as dask_order

from feste import context
from feste._batch_jobs import batch_route
from feste._calls import (
    PreparedCall,
    RetryWaits,
    call_priority,
    prepare_call,
    prepares_calls,
    retry_waits,
    run_batch,
    run_call,
)
from feste._nodes import (
    BackendCall,
    BatchCall,
    describe_item_failures,
    flatten_keys,
    take_item,
)
from feste._progress import RunProgress
from feste.backend.types import ItemFailure
from feste.errors import Failure, GraphError, annotate_task_error, describe_call
from feste.limits import resolve_limits, run_scope
from feste.schedulers._policy import (
    TaskEvents,
    batch_without_failed_inputs,
    dependent_failure,
    passes_failure_on,
    returns_failures,
    task_failure,
)
from feste.schedulers._pools import (
    Chunk,
    ChunkResults,
    ThreadWorkers,
    run_chunk,
    submit_to_processes,
    thread_pool,
)

__all__ = ["CANCEL_GRACE", "Engine", "inline_function", "run_graph"]

# How a node runs.
_DATA = 0  # a literal value
_INLINE = 1  # cheap: computed on the loop, no task
_PYTHON = 2  # a plain function: worker pool
_ASYNC = 3  # an async def function: awaited on the loop
_CALL = 4  # BackendCall: one request (or coalesced with others of its batch group)
_BATCH = 5  # BatchCall: one batched request made by the optimizer
# The kinds that start a task of their own when readied (see _START_SLICE).
_COSTLY_TO_READY = frozenset({_ASYNC, _CALL, _BATCH})

# Functions cheap enough to run on the loop.
_INLINE_FUNCTIONS: set[Any] = {take_item, operator.getitem, _dask_identity}

_CHUNK_SECONDS = {"threads": 0.002, "processes": 0.05}
_MAX_CHUNK = 256
CANCEL_GRACE = 5.0  # seconds to wait for cancelled work to wind down
_NO_LANE_CAP = 1024
# Units of work readied at the start between two yields to the loop (see Engine._start):
# a call (or an async task) costs about four times a plain node to ready, so a slice is
# 64 calls or 256 plain nodes. Small enough that the connections the first calls open
# are taken up within a slice or two, large enough that yields cost little.
_START_SLICE = 256
_CALL_UNITS = 4
# Requests of queued calls built ahead, at most per lane, and for at most so many
# seconds at a time (see Engine._prepare_lanes).
_PREPARE_AHEAD = 4096
_PREPARE_SECONDS = 0.001
# The lane of calls routed to Batch API jobs: no cap (a job holds up to 50,000 calls).
_UNCAPPED = sys.maxsize


def inline_function(func: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``func`` as cheap: nodes calling it run on the engine's loop."""
    _INLINE_FUNCTIONS.add(func)
    return func


def _classify_function(func: Any) -> int:
    func_type = type(func)
    if func_type is BackendCall:
        return _CALL
    if func_type is BatchCall:
        return _BATCH
    try:
        if func in _INLINE_FUNCTIONS:
            return _INLINE
    except TypeError:  # an unhashable callable
        pass
    if asyncio.iscoroutinefunction(func):
        return _ASYNC
    return _PYTHON


def _classify(node: Any, memo: dict[Any, int]) -> int:
    """How ``node`` runs; ``memo`` remembers the answer per function object."""
    node_type = type(node)
    if node_type is Task:
        func = node.func
        try:
            return memo[func]
        except KeyError:
            kind = memo[func] = _classify_function(func)
            return kind
        except TypeError:
            return _classify_function(func)
    if node_type is DataNode:
        return _DATA
    if node_type is Alias or isinstance(node, NestedContainer):
        return _INLINE
    if isinstance(node, Task):
        return _PYTHON
    raise GraphError(f"cannot run graph node {node!r}: expected a dask.task_spec node")


def _item_pick(node: Any) -> tuple[Hashable, int] | None:
    """``(batch key, index)`` when ``node`` is ``take_item(<batch>, <index>)``, else None.

    The engine runs such picks (one per call of a planned batch) with a direct call of
    :func:`take_item`, without building the node's argument dict."""
    if type(node) is not Task or node.func is not take_item or node.kwargs:
        return None
    if len(node.args) != 2:
        return None
    source, index = node.args
    if type(source) is not TaskRef or type(index) is not int:
        return None
    return source.key, index


def _argument(arg: Any, values: Mapping[Hashable, Any]) -> Any:
    """The value of one argument of a node (a literal, a reference or a nested node)."""
    if isinstance(arg, TaskRef):
        return values[arg.key]
    if isinstance(arg, GraphNode):
        return arg({dep: values[dep] for dep in arg.dependencies})
    return arg


def _has_failure(values: list[Any]) -> bool:
    for value in values:  # noqa: SIM110 - a loop: this runs for every answer
        if isinstance(value, ItemFailure):
            return True
    return False


def _copied(error: BaseException) -> BaseException:
    """A separate error object, so each key's failure is labelled on its own."""
    try:
        return copy.copy(error)
    except Exception:
        return error


def _nest(keys: Any, lookup: Callable[[Hashable], Any]) -> Any:
    """Results in the shape of ``keys`` (lists become tuples, as in dask's schedulers)."""
    if not isinstance(keys, list):
        return lookup(keys)
    # A loop, not a generator: it runs once per output at the end of every run.
    nested = []
    for item in keys:
        nested.append(_nest(item, lookup) if isinstance(item, list) else lookup(item))
    return tuple(nested)


# -- the engine -----------------------------------------------------------------------


class _Lane:
    """Ready backend calls of one backend object, and how many of them are started.

    A lane starts a call while fewer than ``limit`` of its started calls are neither
    done nor waiting to retry (``limit`` is the backend's concurrency limit), and never
    more than ``cap`` at once. So a call is started when an admission is free and is
    admitted without waiting at the limiter, while a call waiting to retry (holding no
    admission) lets another one start; the limiters still decide every admission.
    """

    __slots__ = (
        "__weakref__",
        "cap",
        "heap",
        "limit",
        "outstanding",
        "prepared",
        "retrying",
        "to_prepare",
        "waits",
        "wake",
    )

    def __init__(self, cap: int, limit: int, wake: weakref.WeakMethod[Callable[[], None]]) -> None:
        self.cap = cap
        self.limit = limit
        self.heap: list[tuple[float, int, int, _Job]] = []
        self.outstanding = 0
        # Single calls queued here, in queue order, whose requests are still to build
        # (see Engine._prepare_lanes), and how many queued calls hold a built one.
        self.to_prepare: collections.deque[_Job] = collections.deque()
        self.prepared = 0
        # Started calls now waiting to retry (told by the sender through ``waits``).
        self.retrying = 0
        # The engine's pump (weakly: no cycle keeps the engine): a call that begins to
        # wait leaves room for another.
        self.wake = wake
        self.waits = _LaneWaits(self)

    def has_room(self) -> bool:
        outstanding = self.outstanding
        return outstanding < self.cap and outstanding - self.retrying < self.limit

    def take(self) -> _Job:
        """The next job to start (the lane must have one)."""
        *_, job = heapq.heappop(self.heap)
        self.outstanding += 1
        if job.prepared is None:
            job.prepared = False  # started before its turn to be built: built when sent
        elif job.prepared is not False:
            self.prepared -= 1
        return job


class _LaneWaits(RetryWaits):
    """What the sender tells about a lane's retry waits (see :class:`_Lane`).

    It lives in the calls' contexts, which timers of connection pools may keep after the
    run: it refers to its lane weakly, so the run's engine and backends are not kept."""

    __slots__ = ("lane",)

    def __init__(self, lane: _Lane) -> None:
        self.lane = weakref.ref(lane)

    def retry_waiting(self, change: int) -> None:
        lane = self.lane()
        if lane is None:
            return
        lane.retrying += change
        if change > 0 and lane.heap:
            pump = lane.wake()
            if pump is not None:
                pump()


class _Job:
    """One request to start: a single call, a coalesced batch, or an optimizer batch."""

    __slots__ = (
        "backend",
        "call_sites",
        "chain_priority",
        "dedupe",
        "items",
        "keys",
        "merge",
        "method",
        "params",
        "prepared",
        "whole",
    )

    def __init__(
        self,
        backend: Any,
        method: str,
        keys: list[Hashable],
        items: list[Any],
        params: Mapping[str, Any],
        whole: bool,
        dedupe: bool = True,
    ) -> None:
        self.backend = backend
        self.method = method
        self.keys = keys
        self.items = items
        self.params = params
        # True: a BatchCall node, whose value is the whole list of results.
        self.whole = whole
        # False when an item comes from a pure=False call: identical items all go out.
        self.dedupe = dedupe
        # Where the user made each item's call, for error messages.
        self.call_sites: list[str | None] = []
        # A planned batch some of whose inputs failed: puts the results of the items
        # sent back among the failed items' entries.
        self.merge: Callable[[list[Any]], list[Any]] | None = None
        # The longest chain of calls through this request: served first when scarce.
        self.chain_priority = 0.0
        # A single call's request, built while it waited in its lane (see
        # Engine._prepare_lanes); False when it is built where it is sent.
        self.prepared: PreparedCall | bool | None = None


class _Group:
    """Calls of one batch group gathering during the batch window."""

    __slots__ = (
        "backend",
        "call_sites",
        "chain_priority",
        "dedupe",
        "group_key",
        "items",
        "keys",
        "lane",
        "method",
        "params",
        "priority",
        "timer",
    )

    def __init__(
        self,
        group_key: Hashable,
        backend: Any,
        method: str,
        params: Mapping[str, Any],
        lane: _Lane,
    ) -> None:
        self.group_key = group_key
        self.backend = backend
        self.method = method
        self.params = params
        self.lane = lane
        self.dedupe = True
        self.keys: list[Hashable] = []
        self.items: list[Any] = []
        self.priority = math.inf
        self.call_sites: list[str | None] = []
        self.chain_priority = 0.0
        self.timer: asyncio.TimerHandle | None = None


class Engine:
    """Runs one graph; see the module docstring. Use :func:`run_graph` or :meth:`run`."""

    def __init__(
        self,
        graph: Mapping[Hashable, Any],
        keys: Any,
        *,
        on_output: Callable[[Hashable, Any], None] | None = None,
    ) -> None:
        if not all(isinstance(node, GraphNode) for node in graph.values()):
            graph = convert_legacy_graph(dict(graph))
        self.graph = graph
        self.keys = keys
        self.output_list = flatten_keys(keys, [])
        self.outputs = set(self.output_list)
        self.on_output = on_output

        self.return_failures = returns_failures()
        self.events = TaskEvents()
        self.batch_window = context.get("batch_window")
        self.executor_kind = context.get("python_executor")
        workers = context.get("num_workers")
        if workers is None:
            cores = os.cpu_count() or 1
            workers = max(4, cores) if self.executor_kind == "threads" else cores
        self.workers = workers

        self.nodes: dict[Hashable, Any] = {}
        self.kind: dict[Hashable, int] = {}
        self.dependents: dict[Hashable, list[Hashable]] = {}
        self.waiting: dict[Hashable, int] = {}
        self.refs: dict[Hashable, int] = {}
        self.priority: dict[Hashable, int] = {}
        # Backend-call nodes: the longest chain of calls through each (critical path).
        self.chain_priority: dict[Hashable, float] = {}
        self.values: dict[Hashable, Any] = {}
        self.failures: dict[Hashable, Failure] = {}
        self.settled: set[Hashable] = set()

        self.total = 0  # tasks to run (literals excluded)
        self.remaining = 0  # nodes not settled yet, literals included
        self.done = 0
        self.failed = 0
        self.running = 0

        self._inline: list[Hashable] = []
        # Inline item picks, run as take_item(values[batch], index) (see _item_pick).
        self._picks: dict[Hashable, tuple[Hashable, int]] = {}
        self._python: list[tuple[int, Hashable]] = []
        self._lanes: dict[int, _Lane] = {}
        self._batch_lane: _Lane | None = None
        self._groups: dict[Hashable, _Group] = {}
        self._group_keys: dict[Hashable, Hashable] = {}
        self._flush_soon: list[_Group] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sequence = 0
        # Jobs whose answers are in, settled by the next _settle_unsettled (see _sent).
        self._unsettled: list[tuple[_Job, list[Any]]] = []
        self._prepare_scheduled = False
        self._prepares_calls = False

        self._pool: ThreadWorkers | None = None
        self._chunks_in_flight = 0
        self._task_seconds: float | None = None
        self._completed: collections.deque[Any] = collections.deque()
        self._wake_pending = False

        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: contextvars.Context | None = None
        self._finished: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._pumping = False
        # True while _start readies the first nodes: the graph is not stuck then.
        self._starting = False
        # Batch groups opened during the start, whose window starts when it ends.
        self._unarmed: list[_Group] = []
        self.progress: Any = None

    # -- building the state -----------------------------------------------------------

    def _build(self) -> None:
        graph = self.graph
        stack = list(self.output_list)
        nodes = self.nodes
        kind = self.kind
        dependents = self.dependents
        memo: dict[Any, int] = {}
        while stack:
            key = stack.pop()
            if key in nodes:
                continue
            try:
                node = graph[key]
            except (KeyError, TypeError):
                needed_by = [k for k, deps in dependents.items() if key in deps] or None
                where = f" (needed by {needed_by[0]!r})" if needed_by else " (an output key)"
                raise GraphError(f"the graph has no node for key {key!r}{where}") from None
            nodes[key] = node
            kind[key] = _classify(node, memo)
            dependents.setdefault(key, [])
            deps = node.dependencies
            self.waiting[key] = len(deps)
            for dep in deps:
                if dep in dependents:
                    dependents[dep].append(key)
                else:
                    dependents[dep] = [key]
                if dep not in nodes:
                    stack.append(dep)
        for key, users in dependents.items():
            self.refs[key] = len(users)
        self.remaining = len(nodes)
        self.total = sum(1 for k in kind.values() if k != _DATA)
        self.events.total = self.total
        self._order()

    def _order(self) -> None:
        nodes = self.nodes
        users = [key for key, node in nodes.items() if node.dependencies]
        if not users:
            # Independent nodes: dask.order has nothing to decide, keep graph order.
            self.priority = {key: index for index, key in enumerate(nodes)}
            return
        if all(not nodes[dep].dependencies for key in users for dep in nodes[key].dependencies):
            # Two levels (calls or batches, and the nodes reading them, such as item
            # picks): every source is ready at once and every user right after its
            # sources, so dask.order (about 20 us a node) would only break ties.
            # Sources first, then users, each in graph order.
            sources = [key for key, node in nodes.items() if not node.dependencies]
            self.priority = {key: index for index, key in enumerate(sources + users)}
            # Chains differ only when a call reads another call's answer.
            if any(self.kind[key] in (_CALL, _BATCH) for key in users):
                self._rank_critical_path()
            return
        self._rank_critical_path()
        try:
            self.priority = dict(dask_order(nodes))  # type: ignore[arg-type]
        except RuntimeError as exc:
            if "Cycle" in str(exc):
                raise GraphError(f"the graph has a cycle: {exc}") from None
            raise

    def _rank_critical_path(self) -> None:
        """For each backend call, the length of the longest chain of calls through it.

        When admissions are scarce the limiter serves the calls on the longest chain
        first (the critical path), those with more calls still to come before others,
        so a chain next to hundreds of independent calls is not sent last. Two sweeps,
        from the outputs back and from the sources forward, linear in the graph.
        """
        kind = self.kind
        nodes = self.nodes
        is_call = {key: kind[key] in (_CALL, _BATCH) for key in nodes}
        if not any(is_call.values()):
            return  # no backend call: nothing to rank
        below: dict[Hashable, int] = {}
        pending = {key: len(self.dependents[key]) for key in nodes}
        ready = [key for key, count in pending.items() if count == 0]
        order: list[Hashable] = []
        while ready:
            key = ready.pop()
            order.append(key)
            longest = 0
            for user in self.dependents[key]:
                through = below[user] + is_call[user]
                if through > longest:
                    longest = through
            below[key] = longest
            for dep in nodes[key].dependencies:
                pending[dep] -= 1
                if pending[dep] == 0:
                    ready.append(dep)
        if len(order) != len(nodes):
            return  # a cycle: dask.order reports it
        above: dict[Hashable, int] = {}
        for key in reversed(order):  # sources first
            longest = 0
            for dep in nodes[key].dependencies:
                through = above[dep] + is_call[dep]
                if through > longest:
                    longest = through
            above[key] = longest
        chains = {
            key: above[key] + below[key] + below[key] / (len(nodes) + 1)
            for key in nodes
            if is_call[key]
        }
        if any(chains.values()):
            self.chain_priority = chains

    # -- running ----------------------------------------------------------------------

    async def run(self) -> Any:
        """Run the graph on the current loop; return the results shaped like ``keys``."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._finished = loop.create_future()
        self._build()
        self.progress = RunProgress.start(self.nodes)
        self.events.progress = self.progress
        self._context = contextvars.copy_context()
        # Requests are built ahead unless a result cache is on (see _prepare_lanes).
        self._prepares_calls = self._context.run(prepares_calls)
        try:
            await self._start()
            if not self._finished.done():
                await self._finished
        except BaseException as exc:
            self._close()
            await self._wind_down()
            if self.progress is not None:
                self.progress.stop(failed=True)
            if isinstance(exc, asyncio.CancelledError) or self._error is None:
                raise
            raise self._error from None
        if self._error is not None:
            await self._wind_down()
            if self.progress is not None:
                self.progress.stop(failed=True)
            raise self._error
        if self.progress is not None:
            self.progress.stop(failed=False)
        return _nest(self.keys, self._result)

    def _result(self, key: Hashable) -> Any:
        failure = self.failures.get(key)
        if failure is not None:
            return failure
        return self.values[key]

    async def _start(self) -> None:
        """Ready the nodes that need nothing, best first, in slices: the first requests
        leave after one slice is ready, while the rest of a large graph is readied."""
        ready = [key for key, count in self.waiting.items() if count == 0]
        if not ready and self.remaining:
            raise GraphError("the graph has no node ready to run (a cycle?)")
        chains = self.chain_priority
        priority = self.priority
        if chains:
            # The order the lanes serve calls in (see _queue_job), so that no slice
            # holds a call that should have left before those of an earlier slice.
            ready.sort(key=lambda key: (-chains.get(key, 0), priority[key]))
        else:
            ready.sort(key=priority.__getitem__)
        self._starting = True
        kinds = self.kind
        try:
            position = 0
            while position < len(ready):
                if position:
                    await asyncio.sleep(0)  # the requests started so far go out
                    if self._closed:
                        return
                self._pumping = True
                units = 0
                try:
                    while position < len(ready) and units < _START_SLICE:
                        key = ready[position]
                        position += 1
                        kind = kinds[key]
                        if kind == _DATA:
                            units += 1
                            self._finish(key, self.nodes[key].value)
                        else:
                            units += _CALL_UNITS if kind in _COSTLY_TO_READY else 1
                            self._ready(key)
                finally:
                    self._pumping = False
                if position < len(ready):
                    self._pump()
        finally:
            self._starting = False
        for group in self._unarmed:
            if self._groups.get(group.group_key) is group:
                if self.batch_window > 0:
                    self._arm(group)
                else:
                    self._flush_soon.append(group)
        self._unarmed = []
        self._pump()

    def _ready(self, key: Hashable) -> None:
        """``key`` has all its inputs: queue it where its kind runs."""
        kind = self.kind[key]
        if kind == _INLINE:
            self._inline.append(key)
            pick = _item_pick(self.nodes[key])
            if pick is not None:
                self._picks[key] = pick
        elif kind == _PYTHON:
            heapq.heappush(self._python, (self.priority[key], key))
        elif kind in (_CALL, _BATCH):
            try:
                self._ready_call(key, kind)
            except Exception as exc:  # its arguments could not be evaluated
                self._fail(key, exc)
        elif kind == _ASYNC:
            self._spawn(self._run_async(key))
        else:  # _DATA reached through a dependency edge
            self._inline.append(key)

    def _inputs(self, key: Hashable) -> dict[Hashable, Any]:
        values = self.values
        return {dep: values[dep] for dep in self.nodes[key].dependencies}

    def _pump(self) -> None:
        """Start whatever can start: inline nodes, Python chunks, backend calls."""
        if self._pumping or self._closed:
            return
        self._pumping = True
        try:
            inline = self._inline
            picks = self._picks
            while inline:
                key = inline.pop()
                node = self.nodes[key]
                try:
                    pick = picks.pop(key, None)
                    if pick is not None:
                        value = take_item(self.values[pick[0]], pick[1])
                    elif self.kind[key] != _DATA:
                        value = node(self._inputs(key))
                    else:
                        value = node.value
                except Exception as exc:
                    self._fail(key, exc)
                else:
                    self._finish(key, value)
                if self._closed:
                    return
            if self._python and not self._starting:
                # Python tasks are handed out once the start is done: the chunks are
                # then sized over all of them (see _submit_python).
                self._submit_python()
            if self._flush_soon:
                groups, self._flush_soon = self._flush_soon, []
                for group in groups:
                    self._flush_group(group)
            if self._lanes:
                to_prepare = False
                for lane in self._lanes.values():
                    if lane.heap and lane.has_room():
                        self._start_lane(lane)
                    if lane.to_prepare and lane.prepared < _PREPARE_AHEAD:
                        to_prepare = True
                # Not while the start readies its slices: its first requests go first.
                if to_prepare and not self._prepare_scheduled and not self._starting:
                    self._prepare_scheduled = True
                    assert self._loop is not None
                    self._loop.call_soon(self._prepare_lanes, context=self._context)
        except BaseException as exc:
            self._abort(exc)
            return
        finally:
            self._pumping = False
        if self.remaining == 0:
            self._complete()
        elif (
            not self._starting
            and not self.running
            and not self._inline
            and not self._python
            and not self._groups
            and not any(lane.heap for lane in self._lanes.values())
        ):
            stuck = [key for key in self.nodes if key not in self.settled][:5]
            self._abort(GraphError(f"the graph cannot make progress (a cycle?) at {stuck!r}"))

    def _complete(self) -> None:
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    # -- results: the one place a value lands, the one place a failure lands ----------

    def _finish(self, key: Hashable, value: Any) -> None:
        """``key`` finished with ``value``: store it, release inputs, ready dependents."""
        self.settled.add(key)
        self.remaining -= 1
        users = self.dependents[key]
        if self.refs[key] or key in self.outputs:
            self.values[key] = value
        self._release_inputs(key)
        waiting = self.waiting
        for user in users:
            left = waiting[user] - 1
            waiting[user] = left
            if left == 0 and user not in self.settled:
                self._ready(user)
        if self.kind[key] != _DATA:
            self.done += 1
            self.events.done(key, value)
        if self.on_output is not None and key in self.outputs:
            self.on_output(key, value)

    def _fail(self, key: Hashable, exc: BaseException) -> None:
        """``key`` failed: raise mode stops the run; return mode settles it and its
        dependents (see :mod:`feste.schedulers._policy`)."""
        if not self.return_failures:
            exc = annotate_task_error(exc, key)
            self.events.failed(key, exc)
            self._abort(exc)
            return
        failure = task_failure(key, exc)
        self._settle_failed(key, failure)
        stack = [(user, failure) for user in self.dependents[key]]
        while stack:
            user, upstream = stack.pop()
            if user in self.settled:
                continue
            if self.kind[user] == _BATCH:
                # A planned batch still goes out with its other items: the failed
                # input costs only its own item (see _ready_call).
                self.waiting[user] -= 1
                if self.waiting[user] == 0:
                    self._ready(user)
                continue
            same_error = passes_failure_on(self.nodes[user])
            failure = dependent_failure(user, upstream, same_error=same_error)
            self._settle_failed(user, failure)
            stack.extend((dependent, failure) for dependent in self.dependents[user])

    def _settle_failed(self, key: Hashable, failure: Failure) -> None:
        self.settled.add(key)
        self.remaining -= 1
        self.failed += 1
        if self.refs[key] or key in self.outputs:
            self.failures[key] = failure
        self._release_inputs(key)
        self.events.failed(key, failure.exception)
        if self.on_output is not None and key in self.outputs:
            self.on_output(key, failure)

    def _release_inputs(self, key: Hashable) -> None:
        refs = self.refs
        for dep in self.nodes[key].dependencies:
            left = refs[dep] - 1
            refs[dep] = left
            if left == 0 and dep not in self.outputs:
                self.values.pop(dep, None)

    def _abort(self, exc: BaseException) -> None:
        """Stop the run with ``exc`` (raise mode, or an internal error)."""
        if self._error is None:
            self._error = exc
        self._close()
        self._complete()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for group in self._groups.values():
            if group.timer is not None:
                group.timer.cancel()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    async def _wind_down(self) -> None:
        """Wait (briefly) for cancelled coroutines, so no request outlives the run."""
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current and not task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_GRACE)

    # -- coroutines on the loop -------------------------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        assert self._loop is not None
        assert self._context is not None
        # A copy each: a task that sets a context variable must not change the others'.
        task = self._loop.create_task(coroutine, context=self._context.copy())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.running += 1

    async def _run_async(self, key: Hashable) -> None:
        try:
            value = await self.nodes[key](self._inputs(key))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._completed_one(key, False, exc)
        else:
            self._completed_one(key, True, value)

    def _completed_one(self, key: Hashable, ok: bool, value: Any) -> None:
        self.running -= 1
        if self._closed:
            return
        try:
            if ok:
                self._finish(key, value)
            else:
                self._fail(key, value)
        except BaseException as exc:
            self._abort(exc)
            return
        self._pump()

    # -- backend calls ----------------------------------------------------------------

    def _lane(self, backend: Any, method: str, params: Mapping[str, Any]) -> _Lane:
        if batch_route(backend, method, params)[0]:
            # Calls for a provider Batch API job take no admission (a job is not a
            # connection): all of them start at once, so that they gather in few jobs.
            if self._batch_lane is None:
                self._batch_lane = _Lane(_UNCAPPED, _UNCAPPED, weakref.WeakMethod(self._pump))
                self._lanes[-1] = self._batch_lane
            return self._batch_lane
        lane = self._lanes.get(id(backend))
        if lane is None:
            limit = resolve_limits(backend).max_concurrency
            cap = max(64, 4 * int(limit)) if limit else _NO_LANE_CAP
            lane = _Lane(cap, int(limit) if limit else cap, weakref.WeakMethod(self._pump))
            self._lanes[id(backend)] = lane
        return lane

    def _ready_call(self, key: Hashable, kind: int) -> None:
        node = self.nodes[key]
        call = node.func
        values = self.values
        params = {name: _argument(arg, values) for name, arg in node.kwargs.items()}
        lane = self._lane(call.backend, call.method, params)
        priority = self.priority[key]
        if kind == _BATCH:
            job = self._batch_job(key, call, node.args[0], params)
            job.chain_priority = self.chain_priority.get(key, 0)
            self._queue_job(lane, priority, job)
            return
        item = _argument(node.args[0], values)
        group_key = self._batch_group(call, params) if len(node.args) == 1 else None
        if group_key is None:
            job = _Job(call.backend, call.method, [key], [item], params, False, call.pure)
            job.call_sites = [call.call_site]
            job.chain_priority = self.chain_priority.get(key, 0)
            self._queue_job(lane, priority, job)
            return
        group = self._groups.get(group_key)
        if group is None:
            group = _Group(group_key, call.backend, call.method, params, lane)
            self._groups[group_key] = group
            if self._starting:
                # The start readies all its calls in one moment (in slices): their
                # groups are not cut by the window before the last slice is readied.
                self._unarmed.append(group)
            elif self.batch_window > 0:
                self._arm(group)
            else:
                self._flush_soon.append(group)
        group.keys.append(key)
        group.items.append(item)
        group.call_sites.append(call.call_site)
        group.dedupe = group.dedupe and call.pure
        group.priority = min(group.priority, priority)
        group.chain_priority = max(group.chain_priority, self.chain_priority.get(key, 0))
        if len(group.keys) >= call.spec.batch_size:
            self._flush_group(group)

    def _batch_job(self, key: Hashable, call: BatchCall, items_arg: Any, params: Any) -> _Job:
        """The request of a planned batch, leaving out items whose input failed."""
        elements = list(items_arg.args) if isinstance(items_arg, List) else list(items_arg)
        failures: list[Failure | None] = []
        for element in elements:
            if isinstance(element, TaskRef):
                needs: Any = (element.key,)
            else:
                needs = getattr(element, "dependencies", ())
            failed = None
            for dep in needs:
                if dep in self.failures:
                    failed = self.failures[dep]
                    break
            failures.append(failed)
        job = _Job(call.backend, call.method, [key], [], params, True, not call.distinct)
        job.call_sites = list(call.call_sites)
        if any(failure is not None for failure in failures):
            kept_elements, job.merge = batch_without_failed_inputs(elements, failures)
            job.items = [_argument(element, self.values) for element in kept_elements]
            job.call_sites = [
                site for site, failure in zip(job.call_sites, failures) if failure is None
            ]
        else:
            job.items = [_argument(element, self.values) for element in elements]
        return job

    def _batch_group(self, call: BackendCall, params: Mapping[str, Any]) -> Hashable | None:
        if not call.spec.batchable:
            return None
        try:
            memo_key: Hashable = (id(call.backend), call.method, tuple(sorted(params.items())))
            hash(memo_key)
        except TypeError:
            return call.batch_group(params)
        group = self._group_keys.get(memo_key, False)
        if group is False:
            group = call.batch_group(params)
            self._group_keys[memo_key] = group
        return group

    def _arm(self, group: _Group) -> None:
        assert self._loop is not None
        group.timer = self._loop.call_later(
            self.batch_window, self._window_closed, group, context=self._context
        )

    def _window_closed(self, group: _Group) -> None:
        group.timer = None
        if self._groups.get(group.group_key) is group:
            self._flush_group(group)
            self._pump()

    def _flush_group(self, group: _Group) -> None:
        if self._groups.get(group.group_key) is not group:
            return  # already sent
        del self._groups[group.group_key]
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        job = _Job(
            group.backend, group.method, group.keys, group.items, group.params, False, group.dedupe
        )
        job.call_sites = group.call_sites
        job.chain_priority = group.chain_priority
        self._queue_job(group.lane, int(group.priority), job)

    def _queue_job(self, lane: _Lane, priority: int, job: _Job) -> None:
        self._sequence += 1
        heapq.heappush(lane.heap, (-job.chain_priority, priority, self._sequence, job))
        if self._prepares_calls and len(job.items) == 1 and not job.whole:
            lane.to_prepare.append(job)
        else:
            job.prepared = False

    def _prepare_lanes(self) -> None:
        """Build the requests of queued single calls before their turn to be sent.

        Scheduled by the pump, so the building happens in a turn of the loop of its own:
        while the loop would wait for answers (a wave of requests is out), not between
        an answer and the next request. Calls are built in the order they were queued,
        at most ``_PREPARE_AHEAD`` held per lane, and for at most ``_PREPARE_SECONDS``
        at a time (then the rest waits for the next turn), so answers that arrive
        meanwhile wait little.
        """
        self._prepare_scheduled = False
        if self._closed:
            return
        give_up_at = time.perf_counter() + _PREPARE_SECONDS
        tried = 0
        for lane in self._lanes.values():
            queue = lane.to_prepare
            while queue and lane.prepared < _PREPARE_AHEAD:
                job = queue.popleft()
                if job.prepared is not None:
                    continue  # started before its turn to be built
                prepared = prepare_call(job.backend, job.method, job.items[0], job.params)
                if prepared is None:
                    job.prepared = False  # built where it is sent, and fails there
                else:
                    job.prepared = prepared
                    lane.prepared += 1
                tried += 1
                if tried % 16 == 0 and time.perf_counter() > give_up_at:
                    self._prepare_scheduled = True
                    assert self._loop is not None
                    self._loop.call_soon(self._prepare_lanes, context=self._context)
                    return

    def _start_lane(self, lane: _Lane) -> None:
        heap = lane.heap
        while heap and lane.has_room():
            self._spawn(self._send(lane.take(), lane))

    async def _send(self, job: _Job, lane: _Lane) -> None:
        """The one place backend calls are made: await each request, settle its keys.

        The task goes on with the next job of its lane when its request is settled and
        the lane has room: the next request leaves at once, without waiting a loop
        iteration for a new task to start.
        """
        # The lane counts this call's waits between attempts (see _Lane).
        retry_waits.set(lane.waits)
        next_job: _Job | None = job
        while next_job is not None:
            job = next_job
            # Scarce admissions go first to calls with the longest chain waiting on them.
            call_priority.set(job.chain_priority)
            outcome: list[Any] | BaseException
            try:
                if len(job.items) == 1 and not job.whole:
                    prepared = job.prepared
                    values = [
                        await run_call(
                            job.backend,
                            job.method,
                            job.items[0],
                            job.params,
                            pure=job.dedupe,
                            prepared=prepared if isinstance(prepared, PreparedCall) else None,
                        )
                    ]
                elif job.items:
                    values = await run_batch(
                        job.backend, job.method, job.items, job.params, dedupe=job.dedupe
                    )
                else:
                    values = []  # a planned batch all of whose inputs failed
            except asyncio.CancelledError:
                lane.outstanding -= 1
                raise
            except Exception as exc:
                if job.merge is None:
                    outcome = exc
                else:
                    # The failed inputs keep their own cancellation; the sent items
                    # share exc.
                    outcome = describe_item_failures(
                        [ItemFailure(_copied(exc)) for _ in job.items], job.items, job.call_sites
                    )
            else:
                outcome = describe_item_failures(values, job.items, job.call_sites)
            next_job = self._sent(job, lane, outcome)

    def _sent(self, job: _Job, lane: _Lane, outcome: list[Any] | BaseException) -> _Job | None:
        """The request of ``job`` is over: return the lane's next job when the finishing
        task should send it, and settle ``job``'s keys.

        A job whose items all succeeded is settled a moment later, by one callback for
        every answer that arrived in the same turn of the loop: the bookkeeping of a
        value (storing it, readying its users, progress) then never holds back the next
        requests of the answers read with it. A failure is settled at once, before any
        next job is taken, so a run that stops at its first error sends nothing more.
        """
        lane.outstanding -= 1
        if self._closed:
            self.running -= 1
            return None
        if isinstance(outcome, BaseException) or _has_failure(outcome):
            settled_now = True
            self.running -= 1
            self._settle(job, outcome)
            if self._closed:
                return None
        else:
            settled_now = False
            self._unsettled.append((job, outcome))
            if len(self._unsettled) == 1:
                assert self._loop is not None
                self._loop.call_soon(self._settle_unsettled, context=self._context)
        if lane.heap and lane.has_room() and not self._pumping:
            self.running += 1
            next_job = lane.take()
            if not settled_now:
                return next_job  # nothing else changed: the pump would find nothing new
            self._pump()
            return next_job
        self._pump()
        return None

    def _settle_unsettled(self) -> None:
        """Settle the successful jobs :meth:`_sent` put off (see there)."""
        unsettled, self._unsettled = self._unsettled, []
        for job, outcome in unsettled:
            # Counted as running until settled: the run is not stuck meanwhile.
            self.running -= 1
            if not self._closed:
                self._settle(job, outcome)
        self._pump()

    def _settle(self, job: _Job, outcome: list[Any] | BaseException) -> None:
        """Settle the keys of ``job``: its values, or the error of its whole request."""
        try:
            if isinstance(outcome, BaseException):
                for index, key in enumerate(job.keys):
                    if key in self.settled:
                        continue
                    error = outcome if len(job.keys) == 1 else _copied(outcome)
                    if not job.whole:
                        describe_call(error, job.items[index], job.call_sites[index])
                    self._fail(key, error)
                    if self._closed:
                        return
            elif job.whole:
                values = job.merge(outcome) if job.merge is not None else outcome
                self._finish(job.keys[0], values)
            else:
                for key, value in zip(job.keys, outcome):
                    if isinstance(value, ItemFailure):
                        self._fail(key, value.error)
                    else:
                        self._finish(key, value)
                    if self._closed:
                        return
        except BaseException as error:
            self._abort(error)

    # -- Python tasks in the worker pool ----------------------------------------------

    def _chunk_size(self, ready: int) -> int:
        per_task = self._task_seconds
        if per_task is None:
            size = 1
        else:
            target = _CHUNK_SECONDS[self.executor_kind]
            size = max(1, min(_MAX_CHUNK, int(target / max(per_task, 1e-7))))
        spread = -(-ready // self.workers)
        return max(1, min(size, spread))

    def _submit_python(self) -> None:
        heap = self._python
        max_chunks = 2 * self.workers
        nodes = self.nodes
        while heap and self._chunks_in_flight < max_chunks:
            size = self._chunk_size(len(heap))
            chunk: Chunk = []
            for _ in range(min(size, len(heap))):
                _, key = heapq.heappop(heap)
                chunk.append((key, nodes[key], self._inputs(key)))
            self._chunks_in_flight += 1
            self.running += len(chunk)
            if self.executor_kind == "processes":
                submit_to_processes(self.workers, chunk, self._hand_back)
            else:
                assert self._context is not None
                if self._pool is None:
                    self._pool = thread_pool(self.workers)
                self._pool.submit(self._run_chunk, self._context.copy(), chunk)

    def _run_chunk(self, ctx: contextvars.Context, chunk: Chunk) -> None:
        """Worker thread: run a chunk in the caller's context, hand the results back."""
        started = time.perf_counter()
        results = ctx.run(run_chunk, chunk, self._is_closed)
        self._hand_back(results, time.perf_counter() - started, len(chunk))

    def _is_closed(self) -> bool:
        return self._closed

    def _hand_back(self, results: ChunkResults, seconds: float, count: int) -> None:
        """Any thread: queue finished results; wake the loop once for many of them."""
        self._completed.append((results, seconds, count))
        if not self._wake_pending:
            self._wake_pending = True
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._drain, context=self._context)
            except RuntimeError:  # the loop is closed: the run is over
                pass

    def _drain(self) -> None:
        """Loop thread: settle every result handed back since the last wake-up."""
        self._wake_pending = False
        completed = self._completed
        try:
            while completed:
                results, seconds, count = completed.popleft()
                self._chunks_in_flight -= 1
                self.running -= count
                if self._closed:
                    continue
                if count:
                    per_task = seconds / count
                    previous = self._task_seconds
                    self._task_seconds = (
                        per_task if previous is None else 0.7 * previous + 0.3 * per_task
                    )
                for key, ok, value in results:
                    if ok:
                        self._finish(key, value)
                    else:
                        self._fail(key, value)
                    if self._closed:
                        break
        except BaseException as exc:
            self._abort(exc)
            return
        self._pump()


async def run_graph(
    graph: Mapping[Hashable, Any],
    keys: Any,
    *,
    on_output: Callable[[Hashable, Any], None] | None = None,
) -> Any:
    """Run ``graph`` on the current event loop and return the values of ``keys``.

    The run is one computation for the limits: its context limits apply to its own
    calls only (:func:`feste.limits.run_scope`).
    """
    with run_scope():
        return await Engine(graph, keys, on_output=on_output).run()
