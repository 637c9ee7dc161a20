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
* **Plain Python tasks** run in a pool of worker threads (``num_workers``, default
  ``max(4, cores)``), or of processes when the ``python_executor`` option says
  ``"processes"``. Ready tasks are sent in chunks sized from their measured run time
  (about 2 ms of work per chunk for threads, 50 ms for processes), so that thousands of
  trivial tasks cost a few hand-offs, and long tasks still spread over all workers.
  Workers hand results back in bulk with one loop wake-up.

Every node runs inside the ``contextvars`` context captured where the computation
started, so options and callbacks set with ``feste.context.set`` apply in worker
threads and coroutines alike.

Task-selection policy
---------------------
Priorities come from ``dask.order.order`` (critical path first, memory-friendly).
Ready Python tasks leave a priority heap while fewer than two chunks per worker are
queued; ready backend calls leave one priority heap per backend object while its
outstanding calls are under a cap (four times its ``max_concurrency`` and at least 64,
else 1024), so that a call on the critical path that becomes ready late overtakes the
bulk. Inline nodes run as soon as they are ready. The backend's limiter
(:mod:`feste.limits`) then decides when a started call is actually sent.

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
With ``errors="raise"`` the first failure, annotated with its task key, stops the run:
in-flight requests are cancelled and awaited (no orphan request keeps running) and the
error is raised. With ``errors="return"`` the failed key settles to a
:class:`~feste.errors.Failure`, its dependents to cancelled failures (an item pick of a
failed batch, or an alias of a failed key, fails with the same error instead), and
everything independent finishes. Every result lands in :meth:`Engine._finish` and
every failure in :meth:`Engine._fail`: caches and traces hook in there.

Streaming
---------
:class:`GraphStream` (behind ``feste.as_completed``) runs an engine with an
``on_output`` hook and hands each output over as it settles, to a ``for`` loop (the
engine then runs on feste's helper loop thread) or an ``async for`` loop (on the
caller's loop); leaving the loop early cancels the run.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import heapq
import math
import operator
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from dask._task_spec import (
    Alias,
    DataNode,
    GraphNode,
    NestedContainer,
    Task,
    TaskRef,
    convert_legacy_graph,
)
from dask._task_spec import identity as _dask_identity

from feste import context
from feste._calls import run_batch, run_call
from feste.backend.base import BackendCall, BatchCall, backend_option, take_item
from feste.backend.types import ItemFailure
from feste.errors import CancelledError, Failure, GraphError, SchedulerError, annotate_task_error

__all__ = ["Engine", "option_keywords", "run_graph"]

# How a node runs.
_DATA = 0  # a literal value
_INLINE = 1  # cheap: computed on the loop, no task
_PYTHON = 2  # a plain function: worker pool
_ASYNC = 3  # an async def function: awaited on the loop
_CALL = 4  # BackendCall: one request (or coalesced with others of its batch group)
_BATCH = 5  # BatchCall: one batched request made by the optimizer

# Functions cheap enough to run on the loop.
_INLINE_FUNCTIONS: set[Any] = {take_item, operator.getitem, _dask_identity}

_CHUNK_SECONDS = {"threads": 0.002, "processes": 0.05}
_MAX_CHUNK = 256
_CANCEL_GRACE = 5.0  # seconds to wait for cancelled work to wind down
_NO_LANE_CAP = 1024


def inline_function(func: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``func`` as cheap: nodes calling it run on the engine's loop."""
    _INLINE_FUNCTIONS.add(func)
    return func


def option_keywords(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler keywords that are feste options; anything else is refused."""
    unknown = sorted(name for name in kwargs if name not in context.OPTIONS)
    if unknown:
        raise SchedulerError(
            f"unknown keyword{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} for the 'async' scheduler; it accepts feste "
            f"options: {', '.join(sorted(context.OPTIONS))}"
        )
    return dict(kwargs)


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


def _argument(arg: Any, values: Mapping[Hashable, Any]) -> Any:
    """The value of one argument of a node (a literal, a reference or a nested node)."""
    if isinstance(arg, TaskRef):
        return values[arg.key]
    if isinstance(arg, GraphNode):
        return arg({dep: values[dep] for dep in arg.dependencies})
    return arg


def _nest(keys: Any, lookup: Callable[[Hashable], Any]) -> Any:
    """Results in the shape of ``keys`` (lists become tuples, as in dask's schedulers)."""
    if isinstance(keys, list):
        return tuple(_nest(item, lookup) for item in keys)
    return lookup(keys)


def _flat_keys(keys: Any, into: list[Hashable]) -> list[Hashable]:
    if isinstance(keys, list):
        for item in keys:
            _flat_keys(item, into)
    else:
        into.append(keys)
    return into


# -- worker pools ---------------------------------------------------------------------


class _ThreadWorkers:
    """A minimal thread pool: chunks of work from one queue, no futures."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"feste-worker-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, function: Callable[..., None], *args: Any) -> None:
        self._queue.put((function, args))

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            function, args = job
            try:
                function(*args)
            except BaseException:  # the function reports its own errors; keep the worker
                pass


_pools_lock = threading.Lock()
_thread_pools: dict[tuple[int, int], tuple[threading.Thread, _ThreadWorkers]] = {}
_process_pools: dict[int, ProcessPoolExecutor] = {}


def _thread_pool(size: int) -> _ThreadWorkers:
    # One pool per calling thread: a task that itself calls feste.compute from a worker
    # must not wait for chunks queued behind it in the same pool.
    caller = threading.current_thread()
    with _pools_lock:
        entry = _thread_pools.get((caller.ident or 0, size))
        if entry is not None and entry[0] is caller:
            return entry[1]
        for key, (owner, pool) in list(_thread_pools.items()):
            if not owner.is_alive():
                pool.shutdown()
                del _thread_pools[key]
        pool = _ThreadWorkers(size)
        _thread_pools[(caller.ident or 0, size)] = (caller, pool)
        return pool


def _process_pool(size: int) -> ProcessPoolExecutor:
    import multiprocessing

    with _pools_lock:
        pool = _process_pools.get(size)
        if pool is None:
            # spawn: forking a process that runs threads and event loops is unsafe.
            pool = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"))
            _process_pools[size] = pool
        return pool


def _run_chunk_in_process(payload: bytes) -> list[tuple[Hashable, bool, Any]]:
    """Worker-process side: run a pickled chunk under the caller's options."""
    import pickle

    import cloudpickle

    chunk, options = cloudpickle.loads(payload)
    results: list[tuple[Hashable, bool, Any]] = []
    with context.set(**options):
        for key, node, data in chunk:
            try:
                value = node(data)
            except BaseException as exc:
                results.append((key, False, exc))
                continue
            results.append((key, True, value))
    try:
        pickle.dumps(results)
    except Exception:
        # Something does not pickle: send it back as a clear error, per task.
        checked: list[tuple[Hashable, bool, Any]] = []
        for key, ok, value in results:
            try:
                pickle.dumps(value)
                checked.append((key, ok, value))
            except Exception as exc:
                kind = "result" if ok else "exception"
                checked.append(
                    (key, False, TypeError(f"the {kind} of task {key!r} cannot be pickled: {exc}"))
                )
        results = checked
    return results


# -- the engine -----------------------------------------------------------------------


class _Lane:
    """Ready backend calls of one backend object, and how many of them are started."""

    __slots__ = ("cap", "heap", "outstanding")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.heap: list[tuple[int, int, _Job]] = []
        self.outstanding = 0


class _Job:
    """One request to start: a single call, a coalesced batch, or an optimizer batch."""

    __slots__ = ("backend", "dedupe", "items", "keys", "method", "params", "whole")

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


class _Group:
    """Calls of one batch group gathering during the batch window."""

    __slots__ = (
        "backend",
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
        self.output_list = _flat_keys(keys, [])
        self.outputs = set(self.output_list)
        self.on_output = on_output

        self.errors = context.get("errors")
        self.on_task_done = context.get("on_task_done")
        self.on_task_failed = context.get("on_task_failed")
        self.on_progress = context.get("on_progress")
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
        self.values: dict[Hashable, Any] = {}
        self.failures: dict[Hashable, Failure] = {}
        self.settled: set[Hashable] = set()

        self.total = 0  # tasks to run (literals excluded)
        self.remaining = 0  # nodes not settled yet, literals included
        self.done = 0
        self.failed = 0
        self.running = 0

        self._inline: list[Hashable] = []
        self._python: list[tuple[int, Hashable]] = []
        self._lanes: dict[int, _Lane] = {}
        self._groups: dict[Hashable, _Group] = {}
        self._group_keys: dict[Hashable, Hashable] = {}
        self._flush_soon: list[_Group] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sequence = 0

        self._pool: _ThreadWorkers | None = None
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
            return
        from dask.order import order

        try:
            self.priority = dict(order(nodes))  # type: ignore[arg-type]
        except RuntimeError as exc:
            if "Cycle" in str(exc):
                raise GraphError(f"the graph has a cycle: {exc}") from None
            raise

    # -- running ----------------------------------------------------------------------

    async def run(self) -> Any:
        """Run the graph on the current loop; return the results shaped like ``keys``."""
        from feste._progress import RunProgress

        loop = asyncio.get_running_loop()
        self._loop = loop
        self._finished = loop.create_future()
        self._build()
        self.progress = RunProgress.start(self)
        self._context = contextvars.copy_context()
        try:
            self._start()
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

    def _start(self) -> None:
        ready = [key for key, count in self.waiting.items() if count == 0]
        if not ready and self.remaining:
            raise GraphError("the graph has no node ready to run (a cycle?)")
        self._pumping = True
        try:
            for key in sorted(ready, key=self.priority.__getitem__):
                if self.kind[key] == _DATA:
                    self._finish(key, self.nodes[key].value)
                else:
                    self._ready(key)
        finally:
            self._pumping = False
        self._pump()

    def _ready(self, key: Hashable) -> None:
        """``key`` has all its inputs: queue it where its kind runs."""
        kind = self.kind[key]
        if kind == _INLINE:
            self._inline.append(key)
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
            while inline:
                key = inline.pop()
                node = self.nodes[key]
                try:
                    value = node(self._inputs(key)) if self.kind[key] != _DATA else node.value
                except Exception as exc:
                    self._fail(key, exc)
                else:
                    self._finish(key, value)
                if self._closed:
                    return
            if self._python:
                self._submit_python()
            if self._flush_soon:
                groups, self._flush_soon = self._flush_soon, []
                for group in groups:
                    self._flush_group(group)
            if self._lanes:
                for lane in self._lanes.values():
                    if lane.heap and lane.outstanding < lane.cap:
                        self._start_lane(lane)
        except BaseException as exc:
            self._abort(exc)
            return
        finally:
            self._pumping = False
        if self.remaining == 0:
            self._complete()
        elif (
            not self.running
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
            if self.on_task_done is not None:
                self.on_task_done(key, value)
            if self.on_progress is not None:
                self.on_progress(self.done + self.failed, self.total)
        if self.on_output is not None and key in self.outputs:
            self.on_output(key, value)

    def _fail(self, key: Hashable, exc: BaseException) -> None:
        """``key`` failed: raise mode stops the run; return mode settles it and cancels
        its dependents."""
        exc = annotate_task_error(exc, key)
        if self.on_task_failed is not None:
            self.on_task_failed(key, exc)
        if self.errors == "raise":
            self._abort(exc)
            return
        attempts = getattr(exc, "attempts", None) or 1
        self._settle_failed(key, Failure(exc, key, attempts))
        cause = exc
        stack = list(self.dependents[key])
        while stack:
            user = stack.pop()
            if user in self.settled:
                continue
            node = self.nodes[user]
            if type(node) is Alias or (type(node) is Task and node.func is take_item):
                # Another name for the failed value, or an item of a failed batch: it
                # fails with the same error rather than as "cancelled".
                failure = Failure(cause, user, attempts)
                if self.on_task_failed is not None:
                    self.on_task_failed(user, cause)
            else:
                error = CancelledError(
                    f"task {user!r} was not run because task {key!r} failed: "
                    f"{type(cause).__name__}: {cause}"
                )
                failure = Failure(error, user, 0, cancelled=True)
                if self.on_task_failed is not None:
                    self.on_task_failed(user, error)
            self._settle_failed(user, failure)
            stack.extend(self.dependents[user])

    def _settle_failed(self, key: Hashable, failure: Failure) -> None:
        self.settled.add(key)
        self.remaining -= 1
        self.failed += 1
        if self.refs[key] or key in self.outputs:
            self.failures[key] = failure
        self._release_inputs(key)
        if self.on_progress is not None:
            self.on_progress(self.done + self.failed, self.total)
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
            await asyncio.wait(tasks, timeout=_CANCEL_GRACE)

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

    def _lane(self, backend: Any) -> _Lane:
        lane = self._lanes.get(id(backend))
        if lane is None:
            limit = backend_option(backend, "max_concurrency")
            cap = max(64, 4 * int(limit)) if limit else _NO_LANE_CAP
            lane = _Lane(cap)
            self._lanes[id(backend)] = lane
        return lane

    def _ready_call(self, key: Hashable, kind: int) -> None:
        node = self.nodes[key]
        call = node.func
        values = self.values
        params = {name: _argument(arg, values) for name, arg in node.kwargs.items()}
        lane = self._lane(call.backend)
        priority = self.priority[key]
        if kind == _BATCH:
            items = list(_argument(node.args[0], values))
            job = _Job(call.backend, call.method, [key], items, params, True, not call.distinct)
            self._queue_job(lane, priority, job)
            return
        item = _argument(node.args[0], values)
        group_key = self._batch_group(call, params) if len(node.args) == 1 else None
        if group_key is None:
            job = _Job(call.backend, call.method, [key], [item], params, False, call.pure)
            self._queue_job(lane, priority, job)
            return
        group = self._groups.get(group_key)
        if group is None:
            group = _Group(group_key, call.backend, call.method, params, lane)
            self._groups[group_key] = group
            if self.batch_window > 0:
                assert self._loop is not None
                group.timer = self._loop.call_later(
                    self.batch_window, self._window_closed, group, context=self._context
                )
            else:
                self._flush_soon.append(group)
        group.keys.append(key)
        group.items.append(item)
        group.dedupe = group.dedupe and call.pure
        group.priority = min(group.priority, priority)
        if len(group.keys) >= call.spec.batch_size:
            self._flush_group(group)

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
        self._queue_job(group.lane, int(group.priority), job)

    def _queue_job(self, lane: _Lane, priority: int, job: _Job) -> None:
        self._sequence += 1
        heapq.heappush(lane.heap, (priority, self._sequence, job))

    def _start_lane(self, lane: _Lane) -> None:
        heap = lane.heap
        while heap and lane.outstanding < lane.cap:
            _, _, job = heapq.heappop(heap)
            lane.outstanding += 1
            self._spawn(self._send(job, lane))

    async def _send(self, job: _Job, lane: _Lane) -> None:
        """The one place a backend call is made: await the request, settle its keys."""
        try:
            if len(job.items) == 1 and not job.whole:
                values = [
                    await run_call(
                        job.backend, job.method, job.items[0], job.params, pure=job.dedupe
                    )
                ]
            else:
                values = await run_batch(
                    job.backend, job.method, job.items, job.params, dedupe=job.dedupe
                )
        except asyncio.CancelledError:
            lane.outstanding -= 1
            raise
        except Exception as exc:
            lane.outstanding -= 1
            self.running -= 1
            if self._closed:
                return
            try:
                for key in job.keys:
                    if key not in self.settled:
                        self._fail(key, exc)
                    if self._closed:
                        return
            except BaseException as error:
                self._abort(error)
                return
            self._pump()
            return
        lane.outstanding -= 1
        self.running -= 1
        if self._closed:
            return
        try:
            if job.whole:
                self._finish(job.keys[0], values)
            else:
                for key, value in zip(job.keys, values):
                    if isinstance(value, ItemFailure):
                        self._fail(key, value.error)
                    else:
                        self._finish(key, value)
                    if self._closed:
                        return
        except BaseException as error:
            self._abort(error)
            return
        self._pump()

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
            chunk = []
            for _ in range(min(size, len(heap))):
                _, key = heapq.heappop(heap)
                chunk.append((key, nodes[key], self._inputs(key)))
            self._chunks_in_flight += 1
            self.running += len(chunk)
            if self.executor_kind == "processes":
                self._submit_to_processes(chunk)
            else:
                assert self._context is not None
                if self._pool is None:
                    self._pool = _thread_pool(self.workers)
                self._pool.submit(self._run_chunk, self._context.copy(), chunk)

    def _run_chunk(self, ctx: contextvars.Context, chunk: list[tuple[Hashable, Any, Any]]) -> None:
        """Worker thread: run a chunk in the caller's context, hand the results back."""
        ctx.run(self._run_chunk_here, chunk)

    def _run_chunk_here(self, chunk: list[tuple[Hashable, Any, Any]]) -> None:
        results: list[tuple[Hashable, bool, Any]] = []
        clock = time.perf_counter
        started = clock()
        for key, node, data in chunk:
            if self._closed:
                break
            try:
                value = node(data)
            except BaseException as exc:
                results.append((key, False, exc))
                continue
            results.append((key, True, value))
        self._hand_back(results, clock() - started, len(chunk))

    def _submit_to_processes(self, chunk: list[tuple[Hashable, Any, Any]]) -> None:
        import cloudpickle

        from feste.schedulers._local import portable_options

        keys = [key for key, _, _ in chunk]
        try:
            payload = cloudpickle.dumps((chunk, portable_options()))
        except Exception as exc:
            error = TypeError(f"cannot send tasks to a worker process: {exc}")
            self._hand_back([(key, False, error) for key in keys], 0.0, len(chunk))
            return
        started = time.perf_counter()
        future = _process_pool(self.workers).submit(_run_chunk_in_process, payload)

        def returned(future: ConcurrentFuture[Any]) -> None:
            elapsed = time.perf_counter() - started
            try:
                results = future.result()
            except BaseException as exc:
                results = [(key, False, exc) for key in keys]
            self._hand_back(results, elapsed, len(chunk))

        future.add_done_callback(returned)

    def _hand_back(self, results: list[Any], seconds: float, count: int) -> None:
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
    """Run ``graph`` on the current event loop and return the values of ``keys``."""
    return await Engine(graph, keys, on_output=on_output).run()


# -- streaming results ----------------------------------------------------------------


class _Release:
    """Lets ``(index, value)`` pairs out at once, or in index order when ``in_order``."""

    def __init__(self, in_order: bool) -> None:
        self.in_order = in_order
        self.pending: dict[int, Any] = {}
        self.next_index = 0

    def add(self, index: int, value: Any) -> list[tuple[int, Any]]:
        if not self.in_order:
            return [(index, value)]
        self.pending[index] = value
        released = []
        while self.next_index in self.pending:
            released.append((self.next_index, self.pending.pop(self.next_index)))
            self.next_index += 1
        return released


class GraphStream:
    """Runs a graph and yields ``(index, value)`` as each output settles.

    ``outputs`` maps each output key to the indexes it answers (one key may answer
    several indexes); ``ready`` holds indexes whose values are known before running.
    Iterating with ``for`` runs the engine on feste's helper loop thread and hands
    results over through a thread-safe queue; ``async for`` runs it on the caller's
    loop. Either way, leaving the loop early (``break``, an exception, ``close()``)
    cancels the run and waits for its in-flight requests to end. With
    ``preserve_order`` results come in index order, each as soon as it and all the
    earlier ones are known.
    """

    def __init__(
        self,
        graph: Mapping[Hashable, Any],
        outputs: Mapping[Hashable, list[int]],
        ready: Mapping[int, Any],
        *,
        options: Mapping[str, Any],
        preserve_order: bool = False,
    ) -> None:
        self.graph = graph
        self.outputs = dict(outputs)
        self.ready = dict(ready)
        self.options = dict(options)
        self.preserve_order = preserve_order
        self.count = len(self.ready) + sum(len(indexes) for indexes in self.outputs.values())
        self._started = False
        self._generator: Any = None

    async def _run(self, on_output: Callable[[Hashable, Any], None]) -> None:
        if not self.outputs:
            return
        with context.set(**self.options):
            await run_graph(self.graph, list(self.outputs), on_output=on_output)

    def _claim(self) -> None:
        if self._started:
            raise RuntimeError("as_completed results can be iterated only once")
        self._started = True

    def __len__(self) -> int:
        return self.count

    # -- synchronous iteration ----------------------------------------------------------

    def __iter__(self) -> Any:
        self._claim()
        generator = self._iterate()
        # A weak reference: the generator refers to self, and breaking out of a ``for``
        # loop must leave it unreferenced so that it is closed (and the run cancelled)
        # at once.
        self._generator = weakref.ref(generator)
        return generator

    def close(self) -> None:
        """Stop the run (if iteration began and has not finished)."""
        generator = self._generator() if self._generator is not None else None
        if generator is not None:
            generator.close()

    def __enter__(self) -> GraphStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _iterate(self) -> Any:
        from feste._loop import _start_helper

        results: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        loop = _start_helper()
        ctx = contextvars.copy_context()
        started: list[asyncio.Task[None]] = []

        def start() -> None:
            task = ctx.run(
                loop.create_task, self._run(lambda key, value: results.put(("item", key, value)))
            )
            started.append(task)
            task.add_done_callback(lambda task: results.put(("end", task, None)))

        loop.call_soon_threadsafe(start)
        ended = False
        release = _Release(self.preserve_order)
        try:
            for index in sorted(self.ready):
                yield from release.add(index, self.ready[index])
            while True:
                kind, key, value = results.get()
                if kind == "end":
                    ended = True
                    task = key
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()
                    return
                for index in self.outputs[key]:
                    yield from release.add(index, value)
        finally:
            if not ended:

                def cancel() -> None:
                    for task in started:
                        task.cancel()

                loop.call_soon_threadsafe(cancel)
                deadline = time.monotonic() + _CANCEL_GRACE * 2
                while time.monotonic() < deadline:
                    try:
                        kind, _, _ = results.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if kind == "end":
                        break

    # -- asynchronous iteration ---------------------------------------------------------

    def __aiter__(self) -> Any:
        self._claim()
        generator = self._aiterate()
        self._generator = weakref.ref(generator)
        return generator

    async def aclose(self) -> None:
        """Stop the run (if ``async for`` began and has not finished)."""
        generator = self._generator() if self._generator is not None else None
        if generator is not None:
            await generator.aclose()

    async def __aenter__(self) -> GraphStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _aiterate(self) -> Any:
        results: asyncio.Queue[tuple[Hashable, Any] | None] = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(
            self._run(lambda key, value: results.put_nowait((key, value)))
        )
        task.add_done_callback(lambda _: results.put_nowait(None))
        release = _Release(self.preserve_order)
        try:
            for index in sorted(self.ready):
                for pair in release.add(index, self.ready[index]):
                    yield pair
            while True:
                item = await results.get()
                if item is None:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                    return
                key, value = item
                for index in self.outputs[key]:
                    for pair in release.add(index, value):
                        yield pair
        finally:
            if not task.done():
                task.cancel()
                # Wait for the run to wind down without raising its CancelledError here.
                await asyncio.wait({task})
