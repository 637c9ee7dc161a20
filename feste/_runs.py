"""Run history: what ``feste.compute(..., run="name")`` records in the cache.

Design
------
A named run is recorded in the active cache store (:mod:`feste.cache`): a record is
saved as ``unfinished`` before the graph runs (so a run killed part way still shows),
and replaced when it ends (``finished``, ``failed`` with the error, or
``interrupted``) with its times, a graph summary (nodes, depth, calls and planned
requests per method) and its counts:

* ``cache_hits`` / ``calls_sent``: backend calls answered by the cache / sent, counted
  by the sender (:mod:`feste.cache._session`);
* ``requests``, ``retries``, ``failed_requests``, ``prompt_tokens``,
  ``completion_tokens``: what the :class:`RunRecorder` observer saw leave
  :func:`feste._calls.send`, request by request.

Then each output (each lazy value given to ``compute``, found where it sat among the
arguments) is saved with its place (``"0"``, ``"1[3]"``, ``"2['summary']"``), its
graph key, a digest of its value and a text (a string output as it is, anything else
as JSON), which ``feste runs diff`` compares. A run name used again replaces the
earlier record: re-running a killed run resumes it and records the finished run.

Limits: counts are those of this process (the ``processes`` scheduler's workers send
their calls elsewhere); outputs that are not JSON-like are shown by ``repr``.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from dask.base import is_dask_collection
from dask.delayed import Delayed

from feste._calls import CachedCalls, RequestReport, RunObserver, current_observer
from feste.backend.types import Request, Usage
from feste.cache import CacheStore, RunOutput, active_store
from feste.cache._codec import encode
from feste.cache._session import CacheTally, RunScope, current_scope, current_tally
from feste.errors import Failure, OptionError
from feste.graph import FesteGraph

__all__ = ["RunRecorder", "record_run"]

# Texts longer than this are cut in the history (the digest covers the whole value).
_MAX_TEXT = 100_000


class RunRecorder(RunObserver):
    """Counts the requests of one run; passes every event on to the previous observer."""

    def __init__(self, previous: RunObserver) -> None:
        self.previous = previous
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.failed_requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def request_started(self, request: Request) -> None:
        with self._lock:
            self.requests += 1
        self.previous.request_started(request)

    def request_retried(self, request: Request, error: BaseException, attempt: int) -> None:
        with self._lock:
            self.retries += 1
        self.previous.request_retried(request, error, attempt)

    def request_finished(self, request: Request, usage: Usage | None, seconds: float) -> None:
        if usage is not None:
            with self._lock:
                self.prompt_tokens += usage.prompt_tokens
                self.completion_tokens += usage.completion_tokens
        self.previous.request_finished(request, usage, seconds)

    def request_failed(self, request: Request, error: BaseException, attempt: int) -> None:
        with self._lock:
            self.failed_requests += 1
        self.previous.request_failed(request, error, attempt)

    def request_ended(self, request: Request, report: RequestReport) -> None:
        self.previous.request_ended(request, report)

    def calls_cached(self, cached: CachedCalls) -> None:
        self.previous.calls_cached(cached)


def _scheduler_name(scheduler: Any) -> str:
    if scheduler is None:
        return "async"
    if isinstance(scheduler, str):
        return scheduler
    return type(scheduler).__name__


def _graph_summary(graph: Mapping[Any, Any]) -> dict[str, Any]:
    described = FesteGraph(dict(graph))
    calls, requests = described.backend_calls()
    return {
        "nodes": len(described),
        "depth": described.depth(),
        "calls": calls,
        "planned_requests": requests,
    }


def _describe_value(value: Any) -> tuple[str, str, bool]:
    """``(digest, text, failed)`` of one output."""
    if isinstance(value, Failure):
        text = f"Failure: {type(value.exception).__name__}: {value.exception}"
        return hashlib.sha256(text.encode()).hexdigest(), text, True
    if isinstance(value, str):
        full = value
    else:
        try:
            full = encode(value)
        except (TypeError, ValueError):
            full = repr(value)
    digest = hashlib.sha256(full.encode("utf-8", "surrogatepass")).hexdigest()
    return digest, full[:_MAX_TEXT], False


def _outputs(objs: tuple[Any, ...], values: tuple[Any, ...], traverse: bool) -> list[RunOutput]:
    """One :class:`RunOutput` per lazy value among ``objs``, with its computed value."""
    found: list[RunOutput] = []

    def visit(obj: Any, value: Any, path: str) -> None:
        if isinstance(obj, Delayed) or is_dask_collection(obj):
            key = obj.key if isinstance(obj, Delayed) else None
            digest, text, failed = _describe_value(value)
            found.append(RunOutput(len(found), path, str(key), digest, text, failed))
            return
        if not traverse:
            return
        if type(obj) in (list, tuple) and isinstance(value, list | tuple):
            for index, (item, item_value) in enumerate(zip(obj, value)):
                visit(item, item_value, f"{path}[{index}]")
        elif type(obj) is dict and isinstance(value, dict):
            for name, item in obj.items():
                visit(item, value.get(name), f"{path}[{name!r}]")

    for index, (obj, value) in enumerate(zip(objs, values)):
        visit(obj, value, str(index))
    return found


class _Recording:
    """Collects the outputs of a run being recorded (see :func:`record_run`)."""

    def __init__(self, objs: tuple[Any, ...], traverse: bool) -> None:
        self.objs = objs
        self.traverse = traverse
        self.outputs: list[RunOutput] = []

    def finished(self, values: tuple[Any, ...]) -> None:
        self.outputs = _outputs(self.objs, values, self.traverse)


def run_store(name: str) -> CacheStore:
    store = active_store()
    if store is None:
        raise OptionError(
            f"run={name!r} is recorded in the cache, and no cache is set: pass "
            "cache=PATH_OR_URL to feste.compute, set it with feste.context.set(cache=...), "
            "or set the FESTE_CACHE environment variable"
        )
    return store


@contextlib.contextmanager
def record_run(
    name: str,
    graph: Mapping[Any, Any],
    objs: tuple[Any, ...],
    *,
    scheduler: Any,
    traverse: bool,
) -> Iterator[_Recording]:
    """Record run ``name`` around the ``with`` block that computes ``graph``.

    The block calls ``recording.finished(values)`` with the computed values. Inside it,
    ``pure=False`` calls are numbered in a fresh run scope and counted.
    """
    store = run_store(name)
    started = time.time()
    record: dict[str, Any] = {
        "name": name,
        "status": "unfinished",
        "started": started,
        "ended": None,
        "scheduler": _scheduler_name(scheduler),
        "cache": store.location,
        "graph": _graph_summary(graph),
    }
    store.save_run(record)
    tally = CacheTally()
    recorder = RunRecorder(current_observer.get())
    recording = _Recording(objs, traverse)
    tokens = (
        current_tally.set(tally),
        current_scope.set(RunScope(name)),
        current_observer.set(recorder),
    )
    status, error = "finished", None
    try:
        yield recording
    except Exception as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    except BaseException as exc:
        status, error = "interrupted", type(exc).__name__
        raise
    finally:
        current_observer.reset(tokens[2])
        current_scope.reset(tokens[1])
        current_tally.reset(tokens[0])
        ended = time.time()
        failed_outputs = sum(1 for output in recording.outputs if output.failed)
        record.update(
            status=status,
            ended=ended,
            seconds=round(ended - started, 3),
            error=error,
            cache_hits=tally.hits,
            calls_sent=tally.sent,
            requests=recorder.requests,
            retries=recorder.retries,
            failed_requests=recorder.failed_requests,
            prompt_tokens=recorder.prompt_tokens,
            completion_tokens=recorder.completion_tokens,
            outputs=len(recording.outputs),
            failed_outputs=failed_outputs,
        )
        store.save_run_outputs(name, recording.outputs)
        store.save_run(record)
