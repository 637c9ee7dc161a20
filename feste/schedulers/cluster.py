"""The Dask cluster scheduler: ``feste.compute(..., scheduler=client)``.

Design
------
A distributed scheduler spends about a millisecond per task, and a worker thread that
runs one backend call per task waits a whole request doing nothing. So the optimized
graph is cut into a few **blocks** (:func:`partition`), and each block is one Dask task
that runs its part of the graph with feste's async engine
(:func:`feste.schedulers._engine.run_graph`) on the worker: many requests in flight per
worker, batching and runtime coalescing inside each block, a handful of Dask tasks per
run. (The other design, one Dask task per call run by an async executor given to
workers by a plugin, pays the scheduler per call and is capped by the worker's thread
count; measured in ``docs/cluster.md``.) A block task *secedes* from the worker's
thread pool (``distributed.secede``): it only waits on its event loop, so a worker with
one thread runs all the blocks it is given at once.

Cutting
-------
Literal data nodes are copied into every block that reads them. The other nodes are
grouped by connected component (a node reading more than :data:`FAN_IN` others does not
glue them together: it is a join), components are packed in graph order into about
``blocks_per_worker`` blocks per worker, and then, in topological order, a node joins
the block of its inputs when they all sit in one block, and a *join block* (one per set
of input blocks) otherwise. Blocks therefore depend on each other without cycles; a
block reads the values it needs from the blocks before it (its Dask dependencies).

What travels
------------
* to the workers: the caller's feste options (``context.set`` and the compute
  keywords, :func:`~feste.schedulers._policy.portable_options`), without callbacks;
* back with each block's result: its exported values (outputs and values other blocks
  read), and, when the caller wants them, the settle events of its tasks (callbacks,
  progress) and the request events of its sender (usage records, the progress bar's
  request counts), replayed on the client as each block finishes.

Failures follow :mod:`feste.schedulers._policy`: with ``errors="return"`` a failed
input of a block arrives as a node that fails with the same error, so its dependents
are cancelled exactly as in one engine; with ``errors="raise"`` the first error stops
the run and the client cancels the other blocks. A block whose Dask task is cancelled
or forgotten (the client cancelled it or went away) cancels its in-flight requests.

Limits: each run registers :class:`~feste.schedulers._leases.LeaseBoard` on the
scheduler; workers lease concurrency and rate budgets from it in bulk
(:mod:`feste.schedulers._leases`), so the limits hold for the whole cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import uuid
from collections.abc import AsyncIterator, Hashable, Mapping
from typing import Any

from dask._task_spec import DataNode, GraphNode, Task, TaskRef, convert_legacy_graph

from feste import context
from feste._calls import CachedCalls, RequestReport, RunObserver, current_observer
from feste._loop import run_sync
from feste._nodes import flatten_keys
from feste._progress import RunProgress
from feste.backend.types import Request, Usage
from feste.errors import CancelledError, Failure, SchedulerError
from feste.schedulers._engine import inline_function, run_graph
from feste.schedulers._leases import LeaseBoard, worker_quotas
from feste.schedulers._policy import (
    TaskEvents,
    portable_options,
    split_keywords,
)

__all__ = [
    "BLOCKS_PER_WORKER",
    "Block",
    "BlockResult",
    "ClusterScheduler",
    "FAN_IN",
    "partition",
    "run_block",
]

#: A node reading more than this many others is a join: it does not glue them into one
#: component (a reduce over every call would otherwise make the whole graph one block).
FAN_IN = 16
#: Blocks per worker the components are packed into (balance, fault granularity and
#: progress steps against a millisecond of scheduler time each).
BLOCKS_PER_WORKER = 4
# How often a running block checks that its Dask task is still wanted.
_WATCH_SECONDS = 0.2
# Options that stay with the caller: callbacks, the scheduler itself, the progress bar.
_CLIENT_ONLY = ("on_task_done", "on_task_failed", "on_progress", "scheduler", "progress")


# -- cutting the graph ----------------------------------------------------------------


@dataclasses.dataclass
class Block:
    """One Dask task of a run: part of the graph, run by feste's engine on a worker."""

    key: str
    #: The nodes this block computes.
    nodes: dict[Hashable, GraphNode]
    #: Literal nodes it reads (copied into every block that reads them).
    literals: dict[Hashable, GraphNode]
    #: Keys computed by other blocks that it reads, by the block that computes them.
    imports: dict[Hashable, str]
    #: Keys whose values leave the block (outputs, or read by other blocks).
    exports: list[Hashable]
    #: Blocks it depends on, in creation order.
    depends_on: list[str]


def _topological(nodes: Mapping[Hashable, GraphNode]) -> list[Hashable]:
    users: dict[Hashable, list[Hashable]] = {key: [] for key in nodes}
    waiting: dict[Hashable, int] = {}
    for key, node in nodes.items():
        deps = [dep for dep in node.dependencies if dep in nodes]
        waiting[key] = len(deps)
        for dep in deps:
            users[dep].append(key)
    ready = [key for key, count in waiting.items() if count == 0]
    ready.reverse()
    order: list[Hashable] = []
    while ready:
        key = ready.pop()
        order.append(key)
        for user in users[key]:
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    if len(order) != len(nodes):
        stuck = [key for key in nodes if waiting[key]][:5]
        raise SchedulerError(f"the graph has a cycle (at {stuck!r})")
    return order


def _needed(graph: Mapping[Hashable, GraphNode], outputs: list[Hashable]) -> dict[Hashable, Any]:
    needed: dict[Hashable, GraphNode] = {}
    stack = list(outputs)
    while stack:
        key = stack.pop()
        if key in needed:
            continue
        try:
            node = graph[key]
        except (KeyError, TypeError):
            raise SchedulerError(f"the graph has no node for key {key!r}") from None
        needed[key] = node
        stack.extend(node.dependencies)
    # Graph order, so that packing keeps neighbours together.
    return {key: needed[key] for key in graph if key in needed}


class _Components:
    """Union-find over node keys."""

    def __init__(self) -> None:
        self.parent: dict[Hashable, Hashable] = {}

    def find(self, key: Hashable) -> Hashable:
        parent = self.parent
        root = key
        while parent.get(root, root) != root:
            root = parent[root]
        while key != root:
            key, parent[key] = parent[key], root
        return root

    def union(self, first: Hashable, second: Hashable) -> None:
        a, b = self.find(first), self.find(second)
        if a != b:
            self.parent[b] = a


def partition(
    graph: Mapping[Hashable, Any], outputs: list[Hashable], target_blocks: int, run_id: str
) -> list[Block]:
    """Cut ``graph`` (the part ``outputs`` need) into blocks; see the module docstring."""
    if not all(isinstance(node, GraphNode) for node in graph.values()):
        graph = convert_legacy_graph(dict(graph))
    needed = _needed(graph, outputs)
    literals = {key: node for key, node in needed.items() if type(node) is DataNode}
    computed = {key: node for key, node in needed.items() if key not in literals}
    if not computed:
        return []
    components = _Components()
    for key, node in computed.items():
        deps = [dep for dep in node.dependencies if dep in computed]
        if len(deps) <= FAN_IN:
            for dep in deps:
                components.union(key, dep)
    sizes: dict[Hashable, int] = {}
    for key in computed:
        root = components.find(key)
        sizes[root] = sizes.get(root, 0) + 1
    # Pack whole components, in graph order, into bins of about the target size.
    target_size = max(1, -(-len(computed) // max(1, target_blocks)))
    bin_of_root: dict[Hashable, int] = {}
    bins = 0
    filled = target_size
    for root, size in sizes.items():
        if filled + size > target_size and filled > 0:
            bins += 1
            filled = 0
        bin_of_root[root] = bins - 1
        filled += size

    block_of: dict[Hashable, int] = {}
    members: list[list[Hashable]] = [[] for _ in range(bins)]
    block_deps: list[list[int]] = [[] for _ in range(bins)]
    joins: dict[frozenset[int], int] = {}
    for key in _topological(computed):
        node = computed[key]
        dep_blocks = {block_of[dep] for dep in node.dependencies if dep in computed}
        cut = sum(1 for dep in node.dependencies if dep in computed) > FAN_IN
        if not dep_blocks:
            block = bin_of_root[components.find(key)]
        elif len(dep_blocks) == 1 and not cut:
            (block,) = dep_blocks
        else:
            group = frozenset(dep_blocks)
            block = joins.get(group, -1)
            if block < 0:
                block = joins[group] = len(members)
                members.append([])
                block_deps.append(sorted(group))
        block_of[key] = block
        members[block].append(key)

    output_set = set(outputs)
    read_elsewhere: set[Hashable] = set()
    imports: list[dict[Hashable, int]] = [{} for _ in members]
    for index, keys in enumerate(members):
        for key in keys:
            for dep in computed[key].dependencies:
                if dep in computed and block_of[dep] != index:
                    imports[index][dep] = block_of[dep]
                    read_elsewhere.add(dep)
    names = {index: f"feste-block-{run_id}-{index}" for index in range(len(members))}
    blocks: list[Block] = []
    for index, keys in enumerate(members):
        if not keys:
            continue
        reads = {dep for key in keys for dep in computed[key].dependencies}
        blocks.append(
            Block(
                key=names[index],
                nodes={key: computed[key] for key in keys},
                literals={key: literals[key] for key in reads if key in literals},
                imports={key: names[owner] for key, owner in imports[index].items()},
                exports=[key for key in keys if key in output_set or key in read_elsewhere],
                depends_on=sorted(
                    {names[owner] for owner in imports[index].values()},
                    key=lambda name: int(name.rsplit("-", 1)[1]),
                ),
            )
        )
    return blocks


# -- running a block on a worker ------------------------------------------------------


@dataclasses.dataclass
class BlockResult:
    """What a block sends back to the client."""

    #: Exported key -> value (or :class:`Failure` with ``errors="return"``).
    values: dict[Hashable, Any]
    #: ``(key, ok, value or exception)`` per settled task of the block, in order.
    task_events: list[tuple[Hashable, bool, Any]]
    #: ``(event, request, arguments)`` per sender report, in order.
    request_events: list[tuple[str, Request, tuple[Any, ...]]]
    #: The error that stopped the block (``errors="raise"``), else None.
    error: BaseException | None = None
    #: True when an input block had failed, so this one did not run.
    skipped: bool = False
    #: The groups of calls the result cache answered on the worker, in order.
    cached_events: list[CachedCalls] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _BlockSpec:
    block: Block
    options: dict[str, Any]
    #: Send settle events back: "values" (on_task_done is set), "keys", or "" for none.
    task_events: str
    request_events: bool
    run_id: str
    #: Fingerprints credentials alike on every worker (see feste.schedulers._leases).
    salt: bytes


@inline_function
def _refail(failure: Failure) -> Any:
    """Stands for an input that failed in another block: fail the same way here."""
    error = failure.exception
    if failure.cancelled:
        cancelled = CancelledError(str(error))
        cancelled.failed_key = failure.extra.get("failed_key", failure.key)  # type: ignore[attr-defined]
        cancelled.cause = failure.extra.get("cause", error)  # type: ignore[attr-defined]
        raise cancelled
    raise error


class _RequestLog(RunObserver):
    """Records the sender's reports of a block (request bodies left out)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Request, tuple[Any, ...]]] = []
        self.cached: list[CachedCalls] = []
        self._lock = threading.Lock()

    def _add(self, event: str, request: Request, *arguments: Any) -> None:
        light = dataclasses.replace(request, payload={})
        with self._lock:
            self.events.append((event, light, arguments))

    def request_started(self, request: Request) -> None:
        self._add("request_started", request)

    def request_retried(self, request: Request, error: BaseException, attempt: int) -> None:
        self._add("request_retried", request, error, attempt)

    def request_finished(self, request: Request, usage: Usage | None, seconds: float) -> None:
        self._add("request_finished", request, usage, seconds)

    def request_failed(self, request: Request, error: BaseException, attempt: int) -> None:
        self._add("request_failed", request, error, attempt)

    def request_ended(self, request: Request, report: RequestReport) -> None:
        self._add("request_ended", request, report)

    def calls_cached(self, cached: CachedCalls) -> None:
        with self._lock:
            self.cached.append(cached)


def _block_graph(block: Block, upstream: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
    graph: dict[Hashable, Any] = dict(block.literals)
    for key in block.imports:
        value = upstream[key]
        if isinstance(value, Failure):
            graph[key] = Task(key, _refail, DataNode(None, value))
        else:
            graph[key] = DataNode(key, value)
    graph.update(block.nodes)
    return graph


def _still_wanted(key: str) -> bool:
    """Whether this worker still means to run task ``key`` (not cancelled or released)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:
        return True
    task = worker.state.tasks.get(key)
    return task is not None and task.state not in ("cancelled", "released", "forgotten")


async def _run_watched(graph: dict[Hashable, Any], keys: list[Hashable], block_key: str) -> Any:
    """Run the engine; cancel it when the block's Dask task is no longer wanted."""
    run = asyncio.ensure_future(run_graph(graph, keys))
    while True:
        done, _ = await asyncio.wait({run}, timeout=_WATCH_SECONDS)
        if done:
            return run.result()
        if not _still_wanted(block_key):
            run.cancel()
            with contextlib.suppress(BaseException):
                await run
            raise CancelledError(f"block {block_key!r} was cancelled on the cluster")


def _secede() -> None:
    """Leave the worker's thread pool: the block waits on its loop, it does not compute."""
    try:
        from distributed import secede
    except ImportError:  # pragma: no cover - distributed is what calls us
        return
    try:
        secede()
    except (ValueError, AttributeError, KeyError):
        pass  # not in a worker's task thread


def run_block(spec: _BlockSpec, *upstream: BlockResult) -> BlockResult:
    """The Dask task of one block (runs on a worker)."""
    block = spec.block
    if any(result.error is not None or result.skipped for result in upstream):
        return BlockResult({}, [], [], skipped=True)
    _secede()
    imported: dict[Hashable, Any] = {}
    for result in upstream:
        imported.update(result.values)
    graph = _block_graph(block, imported)
    own = set(block.nodes)
    task_events: list[tuple[Hashable, bool, Any]] = []
    keep_values = spec.task_events == "values"

    def done(key: Hashable, value: Any) -> None:
        if key in own:
            task_events.append((key, True, value if keep_values else None))

    def failed(key: Hashable, error: BaseException) -> None:
        if key in own:
            task_events.append((key, False, error))

    callbacks: dict[str, Any] = {}
    if spec.task_events:
        callbacks = {"on_task_done": done, "on_task_failed": failed}
    log = _RequestLog() if spec.request_events else None
    token = current_observer.set(log) if log is not None else None
    try:
        with (
            context.set(**spec.options, progress=False, **callbacks),
            worker_quotas(spec.salt, spec.run_id),
        ):
            values = run_sync(_run_watched(graph, block.exports, block.key))
    except Exception as error:
        return BlockResult(
            {},
            task_events,
            log.events if log is not None else [],
            error=error,
            cached_events=log.cached if log is not None else [],
        )
    finally:
        if token is not None:
            current_observer.reset(token)
    return BlockResult(
        dict(zip(block.exports, values)),
        task_events,
        log.events if log is not None else [],
        cached_events=log.cached if log is not None else [],
    )


# -- the client side -------------------------------------------------------------------


def _nest(keys: Any, lookup: Any) -> Any:
    if isinstance(keys, list):
        return tuple(_nest(item, lookup) for item in keys)
    return lookup(keys)


class ClusterScheduler:
    """``get(graph, keys, **options)`` on a ``distributed.Client`` (see the module
    docstring). Keywords are feste options for this computation; anything else is
    refused, as on every feste scheduler."""

    def __init__(self, client: Any, blocks_per_worker: int = BLOCKS_PER_WORKER) -> None:
        self.client = client
        self.blocks_per_worker = blocks_per_worker

    def __call__(self, graph: Mapping[Hashable, Any], keys: Any, **kwargs: Any) -> Any:
        options, _ = split_keywords(kwargs, scheduler="distributed")
        with context.set(**options):
            return run_sync(self._run(graph, keys))

    def _workers(self) -> int:
        try:
            info = self.client.scheduler_info()
            return max(1, len(info.get("workers", {})))
        except Exception:
            return 1

    async def _run(self, graph: Mapping[Hashable, Any], keys: Any) -> Any:
        outputs = flatten_keys(keys, [])
        run_id = uuid.uuid4().hex[:16]
        if not all(isinstance(node, GraphNode) for node in graph.values()):
            graph = convert_legacy_graph(dict(graph))
        workers = await asyncio.to_thread(self._workers)
        blocks = partition(graph, outputs, workers * self.blocks_per_worker, run_id)
        total = sum(1 for block in blocks for _ in block.nodes)
        progress = RunProgress.start(graph)
        events = TaskEvents(total, progress)
        # The progress bar (the current observer when shown) or another observer.
        wants_requests = type(current_observer.get()) is not RunObserver
        shipped = {
            name: value for name, value in portable_options().items() if name not in _CLIENT_ONLY
        }
        if events.on_task_done is not None:
            task_events = "values"
        elif events.wanted:
            task_events = "keys"
        else:
            task_events = ""
        salt = await asyncio.to_thread(LeaseBoard.register, self.client)
        dsk: dict[str, Task] = {}
        for block in blocks:
            spec = _BlockSpec(block, shipped, task_events, wants_requests, run_id, salt)
            dsk[block.key] = Task(
                block.key, run_block, spec, *(TaskRef(dep) for dep in block.depends_on)
            )
        literal_values = {key: graph[key].value for key in outputs if type(graph[key]) is DataNode}
        values: dict[Hashable, Any] = dict(literal_values)
        failed = True
        try:
            async with _submitted(self.client, dsk) as finished:
                for _ in range(len(dsk)):
                    result: BlockResult = await finished.get()
                    self._replay(result, events)
                    if result.error is not None:
                        raise result.error
                    values.update(result.values)
            failed = False
        finally:
            if progress is not None:
                progress.stop(failed=failed)
            await asyncio.to_thread(LeaseBoard.forget_run, self.client, run_id)
        return _nest(keys, values.__getitem__)

    @staticmethod
    def _replay(result: BlockResult, events: TaskEvents) -> None:
        observer = current_observer.get()
        for event, request, arguments in result.request_events:
            getattr(observer, event)(request, *arguments)
        for cached in result.cached_events:
            observer.calls_cached(cached)
        for key, ok, value in result.task_events:
            if ok:
                events.done(key, value)
            else:
                events.failed(key, value)


class _Finished:
    """Block results in the order the blocks finish, fetched from the cluster."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    async def get(self) -> BlockResult:
        future = await self.queue.get()
        result: BlockResult = await asyncio.to_thread(future.result)
        return result


@contextlib.asynccontextmanager
async def _submitted(client: Any, dsk: dict[str, Task]) -> AsyncIterator[_Finished]:
    """Submit the blocks; yield their results as they finish; cancel what is left."""
    loop = asyncio.get_running_loop()
    finished = _Finished()
    futures = await asyncio.to_thread(client.get, dsk, list(dsk), sync=False)

    def on_done(future: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the run is over: its loop is closed
            loop.call_soon_threadsafe(finished.queue.put_nowait, future)

    for future in futures:
        future.add_done_callback(on_done)
    try:
        yield finished
    finally:
        pending = [future for future in futures if not future.done()]
        if pending:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(client.cancel, pending)
        del futures
