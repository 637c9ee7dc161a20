"""Worker pools for the async engine's plain Python tasks.

The engine runs plain Python functions off its loop, in chunks: a list of
``(key, node, inputs)`` triples that one worker runs one after the other, so that
thousands of trivial tasks cost a few hand-offs. Each chunk comes back as a list of
``(key, ok, value or exception)`` triples; an exception is a result, never raised in
the worker.

* **Threads** (the default): :class:`ThreadWorkers` is a minimal pool, chunks from one
  queue and no futures. There is one pool per calling thread and size
  (:func:`thread_pool`): a task that itself calls ``feste.compute`` from a worker must
  not wait for chunks queued behind it in the same pool.
* **Processes** (the ``python_executor="processes"`` option): one
  ``ProcessPoolExecutor`` per size (:func:`process_pool`), started with ``spawn``
  (forking a process that runs threads and event loops is unsafe).
  :func:`submit_to_processes` pickles a chunk with ``cloudpickle``, together with the
  caller's options (callbacks stay behind), and :func:`run_chunk_in_process` runs it
  under those options. A result or exception that cannot be pickled back comes back
  as a ``TypeError`` for its own task, and a chunk that cannot be sent fails each of
  its tasks with a ``TypeError`` saying so. The reports of requests a chunk's tasks
  make come back with its results (:func:`feste.usage.run_relayed`) and are told to
  the observer that was current when the chunk was sent.
"""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import cloudpickle

from feste import context
from feste._calls import current_observer
from feste.schedulers._policy import portable_options
from feste.usage import Relayed, delivered, run_relayed

__all__ = [
    "Chunk",
    "ChunkResults",
    "ThreadWorkers",
    "process_pool",
    "run_chunk",
    "run_chunk_in_process",
    "submit_to_processes",
    "thread_pool",
]

#: ``(key, node, inputs)`` for each task of a chunk
Chunk = list[tuple[Hashable, Any, Any]]
#: ``(key, ok, value or exception)`` for each task run
ChunkResults = list[tuple[Hashable, bool, Any]]


def run_chunk(chunk: Chunk, stopped: Callable[[], bool]) -> ChunkResults:
    """Run the tasks of ``chunk`` in order, until ``stopped()`` says the run is over."""
    results: ChunkResults = []
    for key, node, data in chunk:
        if stopped():
            break
        try:
            value = node(data)
        except BaseException as exc:
            results.append((key, False, exc))
            continue
        results.append((key, True, value))
    return results


class ThreadWorkers:
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
_thread_pools: dict[tuple[int, int], tuple[threading.Thread, ThreadWorkers]] = {}
_process_pools: dict[int, ProcessPoolExecutor] = {}


def thread_pool(size: int) -> ThreadWorkers:
    """The calling thread's pool of ``size`` workers (pools of ended threads are shut)."""
    caller = threading.current_thread()
    with _pools_lock:
        entry = _thread_pools.get((caller.ident or 0, size))
        if entry is not None and entry[0] is caller:
            return entry[1]
        for key, (owner, pool) in list(_thread_pools.items()):
            if not owner.is_alive():
                pool.shutdown()
                del _thread_pools[key]
        pool = ThreadWorkers(size)
        _thread_pools[(caller.ident or 0, size)] = (caller, pool)
        return pool


def process_pool(size: int) -> ProcessPoolExecutor:
    """The process pool of ``size`` workers, started on first use."""
    with _pools_lock:
        pool = _process_pools.get(size)
        if pool is None:
            pool = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"))
            _process_pools[size] = pool
        return pool


def submit_to_processes(
    size: int,
    chunk: Chunk,
    hand_back: Callable[[ChunkResults, float, int], None],
) -> None:
    """Run ``chunk`` in the process pool; ``hand_back(results, seconds, count)`` after."""
    keys = [key for key, _, _ in chunk]
    try:
        payload = cloudpickle.dumps((chunk, portable_options()))
    except Exception as exc:
        error = TypeError(f"cannot send tasks to a worker process: {exc}")
        hand_back([(key, False, error) for key in keys], 0.0, len(chunk))
        return
    started = time.perf_counter()
    observer = current_observer.get()
    future = process_pool(size).submit(run_chunk_in_process, payload)

    def returned(future: Future[ChunkResults | Relayed]) -> None:
        elapsed = time.perf_counter() - started
        try:
            results = delivered(future.result(), observer)
        except BaseException as exc:
            results = [(key, False, exc) for key in keys]
        hand_back(results, elapsed, len(chunk))

    future.add_done_callback(returned)


def _never() -> bool:
    return False


def run_chunk_in_process(payload: bytes) -> ChunkResults | Relayed:
    """Worker-process side: run a pickled chunk under the caller's options; its results,
    with the reports of the requests its tasks made when they made any."""
    chunk, options = cloudpickle.loads(payload)
    with context.set(**options):
        relayed = run_relayed(run_chunk, chunk, _never)
    results = relayed.value if isinstance(relayed, Relayed) else relayed
    try:
        pickle.dumps(results)
    except Exception:
        # Something does not pickle: send it back as a clear error, per task.
        checked: ChunkResults = []
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
    if isinstance(relayed, Relayed):
        return Relayed(results, relayed.events)
    return results
