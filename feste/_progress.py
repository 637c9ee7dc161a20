"""Progress display for the async engine: one rich progress bar per run.

Design
------
The engine keeps its own counters (tasks done, failed, running) and calls the per-task
callbacks (``on_task_done``, ``on_task_failed``, ``on_progress``) itself, at the moment a
task settles. What happens to requests (sent, retried, tokens used) is only known
inside :func:`feste._calls.send`, which reports it to the current
:class:`~feste._calls.RunObserver`: :class:`RunProgress` is that observer for the run,
forwarding every report to the observer that was current before, so cost accounting or
tracing observers keep working.

Nothing is drawn per task: a timer on the engine's loop reads the counters ten times a
second and updates the bar, so a 50,000-task graph pays no display cost per task.
The bar shows when the ``progress`` option is True, or when it is None (the default)
and stderr is a terminal; otherwise :meth:`RunProgress.start` returns None and the
engine runs without any of this.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from typing import Any

from feste import context
from feste._calls import CachedCalls, RequestReport, RunObserver, current_observer
from feste.backend.types import Request, Usage

__all__ = ["RunProgress", "should_show"]

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


class RunProgress(RunObserver):
    """Counts requests of one run and draws its progress bar (see the module docstring)."""

    def __init__(self, engine: Any, previous: RunObserver) -> None:
        self.engine = engine
        self.previous = previous
        self.requests = 0
        self.ended = 0  # attempts that came back: success, retried or failed
        self.retries = 0
        self.tokens = 0
        self._token: contextvars.Token[RunObserver] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._bar: Any = None
        self._task_id: Any = None

    @classmethod
    def start(cls, engine: Any) -> RunProgress | None:
        """Begin showing progress for ``engine`` if the options ask for it, else None.

        Must be called on the engine's loop, in the context its tasks will copy.
        """
        if not should_show():
            return None
        progress = cls(engine, current_observer.get())
        progress._token = current_observer.set(progress)
        progress._open()
        return progress

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
        self.previous.request_failed(request, error, attempt)

    def request_ended(self, request: Request, report: RequestReport) -> None:
        self.previous.request_ended(request, report)

    def calls_cached(self, cached: CachedCalls) -> None:
        self.previous.calls_cached(cached)

    # -- display ----------------------------------------------------------------------

    def details(self) -> str:
        engine = self.engine
        if self.requests:
            parts = [f"{self.requests - self.ended} in flight", f"{self.requests} requests"]
        else:
            parts = [f"{engine.running} running"]
        if self.retries:
            parts.append(f"{self.retries} retries")
        if engine.failed:
            parts.append(f"{engine.failed} failed")
        if self.tokens:
            parts.append(f"{self.tokens} tokens")
        return " · ".join(parts)

    def _open(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.table import Column

        # Counts and time never shrink; the details give way on a narrow terminal.
        self._bar = Progress(
            TextColumn("[bold]feste[/bold]"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            TextColumn(
                "{task.fields[details]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
            ),
            console=Console(stderr=True),
            refresh_per_second=10,
        )
        self._task_id = self._bar.add_task("feste", total=self.engine.total, details="")
        self._bar.start()
        self._schedule()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(_REFRESH_SECONDS, self._tick)

    def _tick(self) -> None:
        self._update()
        self._schedule()

    def _update(self) -> None:
        engine = self.engine
        self._bar.update(
            self._task_id, completed=engine.done + engine.failed, details=self.details()
        )

    def stop(self, *, failed: bool) -> None:
        """Draw the final state and restore the previous observer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
