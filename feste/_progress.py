"""Progress display: one rich progress bar per run, on every scheduler.

Design
------
The bar counts what the user wrote: backend *calls* (each ``BackendCall`` node, and
each item picked out of a planned batch), not graph steps. A scheduler reports each
task that settles (:class:`feste.schedulers._policy.TaskEvents` forwards it to
:meth:`RunProgress.settled`); what happens to requests (sent, retried, failed,
tokens, and the state of provider Batch API jobs) is only known inside
:func:`feste._calls.send`, which reports it to the
current :class:`~feste._calls.RunObserver`: :class:`RunProgress` is that observer for
the run, forwarding every report to the observer that was current before, so usage,
cost or tracing observers keep working.

Nothing is drawn per task: a daemon thread redraws the bar ten times a second from
the counters, whichever scheduler runs the graph (the async engine's loop, dask's
threads, or the caller's thread with ``sync``). Requests made in worker processes are
not seen by this process's observer: there the bar counts calls only.

The bar shows when the ``progress`` option is True, or when it is None (the default)
and stderr is a terminal; otherwise :meth:`RunProgress.start` returns None and the run
has none of this.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Hashable, Mapping
from typing import Any

from dask.task_spec import Task, TaskRef
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column

from feste import context
from feste._batch_jobs import BatchJobStatus
from feste._calls import CachedCalls, RequestReport, RunObserver, current_observer
from feste._nodes import BackendCall, BatchCall, take_item
from feste.backend.types import Request, Usage

__all__ = ["RunProgress", "call_keys", "should_show"]

_REFRESH_SECONDS = 0.1


def should_show() -> bool:
    """The ``progress`` option, or whether stderr is a terminal when it is None."""
    show = context.get("progress")
    if show is None:
        try:
            return bool(sys.stderr.isatty())
        except (AttributeError, ValueError):
            return False
    return bool(show)


def call_keys(graph: Mapping[Hashable, Any]) -> set[Hashable]:
    """The keys of ``graph`` that stand for a backend call the user wrote: call nodes,
    and the picks of one item out of a batch the optimizer planned."""
    found: set[Hashable] = set()
    for key, node in graph.items():
        if type(node) is not Task:
            continue
        if type(node.func) is BackendCall:
            found.add(key)
        elif node.func is take_item and node.args and isinstance(node.args[0], TaskRef):
            source = graph.get(node.args[0].key)
            if type(source) is Task and type(source.func) is BatchCall:
                found.add(key)
    return found


class RunProgress(RunObserver):
    """Counts the calls and requests of one run and draws its bar (see the module doc)."""

    def __init__(self, calls: set[Hashable], previous: RunObserver) -> None:
        self.calls = calls
        self.previous = previous
        self.calls_done = 0
        self.calls_failed = 0
        self.requests = 0
        self.ended = 0  # attempts that came back: success, retried or failed
        self.retries = 0
        self.failed_requests = 0
        self.tokens = 0
        self.jobs: dict[str, BatchJobStatus] = {}
        self._token: contextvars.Token[RunObserver] | None = None
        self._bar: Any = None
        self._task_id: Any = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, graph: Mapping[Hashable, Any]) -> RunProgress | None:
        """Begin showing progress for a run of ``graph`` if the options ask for it.

        Installs the observer in the current context, which the run's tasks copy.
        """
        if not should_show():
            return None
        progress = cls(call_keys(graph), current_observer.get())
        progress._token = current_observer.set(progress)
        progress._open()
        return progress

    # -- what the scheduler reports ---------------------------------------------------

    def settled(self, key: Hashable, ok: bool) -> None:
        """Task ``key`` finished (``ok``) or failed; only calls count."""
        if key in self.calls:
            if ok:
                self.calls_done += 1
            else:
                self.calls_failed += 1

    # -- RunObserver ------------------------------------------------------------------

    def request_started(self, request: Request) -> None:
        self.requests += 1
        self.previous.request_started(request)

    def request_retried(self, request: Request, error: BaseException, attempt: int) -> None:
        self.retries += 1
        self.ended += 1
        self.previous.request_retried(request, error, attempt)

    def request_finished(self, request: Request, usage: Usage | None, seconds: float) -> None:
        self.ended += 1
        if usage is not None:
            self.tokens += usage.total_tokens
        self.previous.request_finished(request, usage, seconds)

    def request_failed(self, request: Request, error: BaseException, attempt: int) -> None:
        self.ended += 1
        self.failed_requests += 1
        self.previous.request_failed(request, error, attempt)

    def request_ended(self, request: Request, report: RequestReport) -> None:
        self.previous.request_ended(request, report)

    def calls_cached(self, cached: CachedCalls) -> None:
        self.previous.calls_cached(cached)

    def batch_job_changed(self, job: BatchJobStatus) -> None:
        self.jobs[job.job_id] = job
        self.previous.batch_job_changed(job)

    # -- display ----------------------------------------------------------------------

    def details(self) -> str:
        """The text after the bar: requests, retries, failures and tokens so far."""
        parts = []
        if self.requests:
            parts.append(f"{self.requests} requests")
            in_flight = self.requests - self.ended
            if in_flight:
                parts.append(f"{in_flight} in flight")
        if self.retries:
            parts.append(f"{self.retries} retries")
        if self.calls_failed:
            parts.append(f"{self.calls_failed} failed")
        if self.tokens:
            parts.append(f"{self.tokens} tokens")
        if self.jobs:
            parts.append(self.jobs_summary())
        return " · ".join(parts)

    def jobs_summary(self) -> str:
        """The Batch API jobs: each one's state and counts (or, for many, per state)."""
        jobs = list(self.jobs.values())
        if len(jobs) <= 2:
            return ", ".join(
                f"job {job.job_id} {job.status} {job.completed + job.failed}/{job.total}"
                + (f" ({job.failed} failed)" if job.failed else "")
                for job in jobs
            )
        states: dict[str, int] = {}
        for job in jobs:
            states[job.status] = states.get(job.status, 0) + 1
        finished = sum(job.completed + job.failed for job in jobs)
        total = sum(job.total for job in jobs)
        shown = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        return f"{len(jobs)} batch jobs ({shown}) {finished}/{total}"

    def _open(self) -> None:
        # Counts and time never shrink; the details give way on a narrow terminal.
        self._bar = Progress(
            TextColumn("[bold]feste[/bold]"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn("calls", table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            TextColumn(
                "{task.fields[details]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
            ),
            console=Console(stderr=True),
            auto_refresh=False,
        )
        self._task_id = self._bar.add_task("feste", total=len(self.calls), details="")
        self._bar.start()
        self._thread = threading.Thread(target=self._redraw, name="feste-progress", daemon=True)
        self._thread.start()

    def _redraw(self) -> None:
        while not self._stopped.wait(_REFRESH_SECONDS):
            self._update()

    def _update(self) -> None:
        bar = self._bar
        if bar is None:
            return
        completed = self.calls_done + self.calls_failed
        bar.update(self._task_id, completed=completed, details=self.details())
        bar.refresh()

    def stop(self, *, failed: bool) -> None:
        """Draw the final state and restore the previous observer."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None
        if self._bar is not None:
            self._update()
            self._bar.stop()
            self._bar = None
        if self._token is not None:
            try:
                current_observer.reset(self._token)
            except ValueError:  # stopped from another context: leave it to that context
                pass
            self._token = None
