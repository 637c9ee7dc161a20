"""Traces of a run in the Chrome trace format, for ``ui.perfetto.dev`` or ``chrome://tracing``.

Design
------
:class:`TraceRecorder` is a :class:`~feste._calls.RunObserver`: it keeps the
:class:`~feste._reports.RequestReport` each request ends with (also those relayed from
worker processes, :mod:`feste.usage`) and passes every event on. :func:`record_trace`
installs one for a ``with`` block and writes the file when the block ends, also when
it ends with an error (the trace then shows what happened up to it);
``feste.compute(..., trace="run.json")`` is that block around one computation.

The file is a JSON object ``{"traceEvents": [...], "displayTimeUnit": "ms",
"otherData": {...}}``. Each request is one complete event (``"ph": "X"``, category
``"request"``) from the moment it reached the sender to its end, named
``"provider.method model"``, with two child spans: ``"waiting for admission"`` (the
limiters: concurrency, requests and tokens per minute) and ``"attempts"`` (the HTTP
attempts and the waits between them). Its ``args`` hold the batch size (``items``),
``attempts``, ``retries``, ``limiter_wait_ms``, ``retry_wait_ms``, the tokens and
searches reported, and the error when it failed. Times are microseconds from the
first request. Requests of one process are laid out on numbered lanes (``tid``) so
that spans on a lane never overlap: the number of lanes in use at a moment is the
number of requests in flight.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from feste._calls import CachedCalls, RequestReport, RunObserver, current_observer
from feste.backend.types import Request, Usage

__all__ = ["TraceRecorder", "record_trace"]

_MICROSECONDS = 1_000_000


class TraceRecorder(RunObserver):
    """Keeps a report per request; :meth:`trace` and :meth:`write` give the trace."""

    def __init__(self, previous: RunObserver) -> None:
        self.previous = previous
        self._reports: list[RequestReport] = []
        self._cached = 0
        self._lock = threading.Lock()

    # -- observer events --------------------------------------------------------------

    def request_started(self, request: Request) -> None:
        self.previous.request_started(request)

    def request_retried(self, request: Request, error: BaseException, attempt: int) -> None:
        self.previous.request_retried(request, error, attempt)

    def request_finished(self, request: Request, usage: Usage | None, seconds: float) -> None:
        self.previous.request_finished(request, usage, seconds)

    def request_failed(self, request: Request, error: BaseException, attempt: int) -> None:
        self.previous.request_failed(request, error, attempt)

    def request_ended(self, request: Request, report: RequestReport) -> None:
        with self._lock:
            self._reports.append(report)
        self.previous.request_ended(request, report)

    def calls_cached(self, cached: CachedCalls) -> None:
        with self._lock:
            self._cached += cached.calls
        self.previous.calls_cached(cached)

    # -- the trace --------------------------------------------------------------------

    @property
    def reports(self) -> list[RequestReport]:
        with self._lock:
            return list(self._reports)

    def trace(self) -> dict[str, Any]:
        """The trace as a JSON-ready object (see the module docstring)."""
        reports = sorted(self.reports, key=lambda report: (report.queued_at, report.ended_at))
        origin = reports[0].queued_at if reports else 0.0
        events: list[dict[str, Any]] = []
        lanes: dict[int, list[float]] = {}  # pid -> end time of each lane's last span
        for report in reports:
            ends = lanes.setdefault(report.pid, [])
            lane = next((i for i, end in enumerate(ends) if end <= report.queued_at), None)
            if lane is None:
                lane = len(ends)
                ends.append(report.ended_at)
            else:
                ends[lane] = report.ended_at
            events.extend(_request_events(report, origin, lane + 1))
        for pid, ends in lanes.items():
            events.append(
                _metadata("process_name", pid, 0, {"name": f"feste requests (pid {pid})"})
            )
            for lane in range(1, len(ends) + 1):
                events.append(_metadata("thread_name", pid, lane, {"name": f"lane {lane}"}))
        return {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {
                "generator": "feste",
                "requests": len(reports),
                "calls_answered_by_cache": self._cached,
            },
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the trace to ``path`` (JSON) and return the path."""
        target = Path(path)
        target.write_text(json.dumps(self.trace(), separators=(",", ":")))
        return target


def _microseconds(seconds: float) -> int:
    return round(seconds * _MICROSECONDS)


def _metadata(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


def _request_events(report: RequestReport, origin: float, lane: int) -> list[dict[str, Any]]:
    model = f" {report.model}" if report.model else ""
    usage = report.usage
    args: dict[str, Any] = {
        "provider": report.provider,
        "method": report.method,
        "model": report.model,
        "items": report.items,
        "attempts": report.attempts,
        "retries": report.retries,
        "limiter_wait_ms": round(report.limiter_wait * 1000, 3),
        "retry_wait_ms": round(report.retry_wait * 1000, 3),
        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
        "completion_tokens": usage.completion_tokens if usage is not None else None,
        "cached_tokens": usage.cached_tokens if usage is not None else None,
        "search_units": usage.search_units if usage is not None else None,
    }
    if report.error is not None:
        args["error"] = report.error
    start = _microseconds(report.queued_at - origin)
    end = _microseconds(report.ended_at - origin)
    common = {"pid": report.pid, "tid": lane}
    events = [
        {
            "name": f"{report.provider}.{report.method}{model}",
            "cat": "request",
            "ph": "X",
            "ts": start,
            "dur": max(0, end - start),
            "args": args,
            **common,
        }
    ]
    if report.started_at is not None:
        admitted = min(end, _microseconds(report.started_at - origin))
        events.append(
            {
                "name": "waiting for admission",
                "cat": "wait",
                "ph": "X",
                "ts": start,
                "dur": max(0, admitted - start),
                **common,
            }
        )
        events.append(
            {
                "name": "attempts",
                "cat": "attempt",
                "ph": "X",
                "ts": admitted,
                "dur": max(0, end - admitted),
                "args": {"attempts": report.attempts},
                **common,
            }
        )
    return events


@contextlib.contextmanager
def record_trace(path: str | os.PathLike[str]) -> Iterator[TraceRecorder]:
    """Trace every request sent inside the ``with`` block; write ``path`` at its end.

    >>> with feste.trace.record_trace("run.json"):    # doctest: +SKIP
    ...     feste.compute(answers)
    """
    recorder = TraceRecorder(current_observer.get())
    token = current_observer.set(recorder)
    try:
        yield recorder
    finally:
        current_observer.reset(token)
        recorder.write(path)
