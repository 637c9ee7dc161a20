"""Token usage and dollars, as the providers report them, request by request.

Design
------
Every request leaves feste through ``feste._calls.send``, which tells the current
:class:`~feste._calls.RunObserver` what happened and, once a request is over, gives a
:class:`~feste._reports.RequestReport` (timings and usage). :func:`record_usage` puts
a :class:`UsageRecorder` in front of the current observer for the code inside its
``with`` block (the observer lives in a ``ContextVar``, so the schedulers carry it into
their worker threads and the async engine chains its progress bar in front of it).
The recorder keeps one :class:`UsageRecord` per answered request: provider, method,
model, how many calls the request served (a batch serves many), the tokens (and
searches) the provider reported, and their price in dollars at the price table in
effect (:mod:`feste.backend.prices`; ``None`` for a model that is not priced; a
request sent through a provider Batch API job is marked ``batch`` and priced at batch
prices). Calls
the result cache answered are kept apart as :class:`CachedRecord` entries: what they
would have cost (the usage stored with whole answers, else estimated from the inputs
and answers), the dollars the cache saved.

Worker processes
----------------
Requests made in another process reach the caller's recorder through a *relay*: the
worker runs each task with :func:`run_relayed`, which records the reports of the
requests the task made and returns them with its value (a :class:`Relayed`); the
caller hands whatever comes back to :func:`delivered`, which tells the reports to the
current observer (usage records, traces) and returns the plain value. Reports are
plain picklable data with wall-clock times. The async engine does this for plain
tasks run in worker processes (the ``processes`` scheduler; its backend calls are
made in the calling process anyway). On a Dask cluster each block's request reports
come back with its results and are replayed to the current observer in the client;
recorders also :meth:`UsageRecorder.merge` records made elsewhere. A task that
raises loses the reports of its requests unless the error can carry them (they ride
on the exception, ``delivered_error``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from feste._batch_jobs import BatchJobStatus
from feste._calls import CachedCalls, RequestReport, RunObserver, current_observer
from feste.backend.prices import price_table
from feste.backend.types import Request, Usage

__all__ = [
    "CachedRecord",
    "Relayed",
    "UsageRecord",
    "UsageRecorder",
    "delivered",
    "delivered_error",
    "record_usage",
    "run_relayed",
]


@dataclass(frozen=True)
class UsageRecord:
    """One answered request: the tokens its provider reported and their price.

    ``seconds`` runs from the request's first attempt to its answer (retries
    included); ``cost`` is in dollars, None when the model is not in the price table.
    """

    provider: str
    method: str
    model: str | None
    items: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    cached_tokens: int = 0
    search_units: int = 0
    cost: float | None = None
    #: Sent through a provider Batch API job (``cost`` is at batch prices).
    batch: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def usage(self) -> Usage:
        return Usage(
            self.model,
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.search_units,
        )


@dataclass(frozen=True)
class CachedRecord:
    """Calls the result cache answered: what they would have cost had they been sent."""

    provider: str
    method: str
    model: str | None
    calls: int
    usage: Usage
    cost: float | None


def _record(report: RequestReport) -> UsageRecord:
    usage = report.usage if report.usage is not None else Usage(report.model)
    start = report.started_at if report.started_at is not None else report.queued_at
    return UsageRecord(
        provider=report.provider,
        method=report.method,
        model=report.model,
        items=report.items,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        seconds=max(0.0, report.ended_at - start),
        cached_tokens=usage.cached_tokens,
        search_units=usage.search_units,
        cost=price_table().cost(
            report.provider, Usage(report.model, *_counts(usage)), batch=report.batch
        ),
        batch=report.batch,
    )


def _counts(usage: Usage) -> tuple[int, int, int, int]:
    return (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.search_units)


class UsageRecorder(RunObserver):
    """Collects a :class:`UsageRecord` per answered request and a :class:`CachedRecord`
    per group of calls the cache answered; passes every event on."""

    def __init__(self, previous: RunObserver) -> None:
        self.previous = previous
        self._records: list[UsageRecord] = []
        self._cached: list[CachedRecord] = []
        self._lock = threading.Lock()

    # -- observer events --------------------------------------------------------------

    def request_started(self, request: Request) -> None:
        self.previous.request_started(request)

    def request_retried(self, request: Request, error: BaseException, attempt: int) -> None:
        self.previous.request_retried(request, error, attempt)

    def request_failed(self, request: Request, error: BaseException, attempt: int) -> None:
        self.previous.request_failed(request, error, attempt)

    def request_finished(self, request: Request, usage: Usage | None, seconds: float) -> None:
        self.previous.request_finished(request, usage, seconds)

    def request_ended(self, request: Request, report: RequestReport) -> None:
        if report.error is None:
            record = _record(report)
            with self._lock:
                self._records.append(record)
        self.previous.request_ended(request, report)

    def batch_job_changed(self, job: BatchJobStatus) -> None:
        self.previous.batch_job_changed(job)

    def calls_cached(self, cached: CachedCalls) -> None:
        entry = CachedRecord(
            cached.provider,
            cached.method,
            cached.model,
            cached.calls,
            cached.usage,
            price_table().cost(cached.provider, Usage(cached.model, *_counts(cached.usage))),
        )
        with self._lock:
            self._cached.append(entry)
        self.previous.calls_cached(cached)

    def merge(self, records: Iterable[UsageRecord | CachedRecord]) -> None:
        """Add records made elsewhere (another recorder's ``records`` and ``cached``)."""
        for record in records:
            with self._lock:
                if isinstance(record, CachedRecord):
                    self._cached.append(record)
                else:
                    self._records.append(record)

    # -- reading ----------------------------------------------------------------------

    @property
    def records(self) -> list[UsageRecord]:
        """Every request recorded so far, in the order they finished."""
        with self._lock:
            return list(self._records)

    @property
    def cached(self) -> list[CachedRecord]:
        """The calls the cache answered, group by group."""
        with self._lock:
            return list(self._cached)

    @property
    def requests(self) -> int:
        with self._lock:
            return len(self._records)

    @property
    def total(self) -> Usage:
        """All tokens, summed (``model`` is set when a single model answered)."""
        return _summed([record.usage for record in self.records])

    def by_model(self) -> dict[tuple[str, str | None], Usage]:
        """Tokens per ``(provider, model)``."""
        groups: dict[tuple[str, str | None], list[Usage]] = {}
        for record in self.records:
            groups.setdefault((record.provider, record.model), []).append(record.usage)
        return {group: _summed(usages) for group, usages in groups.items()}

    @property
    def cost(self) -> float:
        """Dollars of every priced request (see :attr:`unpriced` for the others)."""
        return _dollars(record.cost for record in self.records)

    def cost_by_model(self) -> dict[tuple[str, str | None], float | None]:
        """Dollars per ``(provider, model)``; None for a model without a price."""
        costs: dict[tuple[str, str | None], float | None] = {}
        for record in self.records:
            group = (record.provider, record.model)
            if record.cost is None or (group in costs and costs[group] is None):
                costs[group] = None
            else:
                costs[group] = _rounded((costs.get(group) or 0.0) + record.cost)
        return costs

    @property
    def unpriced(self) -> list[tuple[str, str | None]]:
        """``(provider, model)`` of requests the price table has no price for."""
        return sorted(
            {(r.provider, r.model) for r in self.records if r.cost is None},
            key=lambda group: (group[0], group[1] or ""),
        )

    @property
    def cached_calls(self) -> int:
        """Calls the result cache answered instead of a request."""
        return sum(entry.calls for entry in self.cached)

    @property
    def saved(self) -> Usage:
        """What the calls the cache answered would have used."""
        return _summed([entry.usage for entry in self.cached])

    @property
    def saved_cost(self) -> float:
        """Dollars the cache saved (priced calls only)."""
        return _dollars(entry.cost for entry in self.cached)

    def summary(self) -> str:
        """A table: requests, tokens and dollars per model, the total, the cache's saving."""
        lines = ["provider  model  requests  prompt  completion  dollars"]
        counts: dict[tuple[str, str | None], int] = {}
        for record in self.records:
            group = (record.provider, record.model)
            counts[group] = counts.get(group, 0) + 1
        costs = self.cost_by_model()
        for (provider, model), usage in sorted(
            self.by_model().items(), key=lambda item: (item[0][0], item[0][1] or "")
        ):
            dollars = costs.get((provider, model))
            shown = "unpriced" if dollars is None else f"${dollars:.6f}"
            lines.append(
                f"{provider}  {model}  {counts[(provider, model)]}  {usage.prompt_tokens}  "
                f"{usage.completion_tokens}  {shown}"
            )
        total = self.total
        lines.append(
            f"total  {self.requests} requests  {total.prompt_tokens} prompt + "
            f"{total.completion_tokens} completion tokens  ${self.cost:.6f}"
            + (" (some models unpriced)" if self.unpriced else "")
        )
        if self.cached_calls:
            lines.append(
                f"cache: {self.cached_calls} calls answered, about "
                f"{self.saved.total_tokens} tokens and ${self.saved_cost:.6f} saved"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        total = self.total
        return (
            f"UsageRecorder({self.requests} requests, {total.prompt_tokens} prompt + "
            f"{total.completion_tokens} completion tokens)"
        )


def _summed(usages: list[Usage]) -> Usage:
    models = {usage.model for usage in usages}
    return Usage(
        models.pop() if len(models) == 1 else None,
        sum(usage.prompt_tokens for usage in usages),
        sum(usage.completion_tokens for usage in usages),
        sum(usage.cached_tokens for usage in usages),
        sum(usage.search_units for usage in usages),
    )


def _rounded(dollars: float) -> float:
    return round(dollars, 12)


def _dollars(amounts: Iterable[float | None]) -> float:
    return _rounded(sum(amount for amount in amounts if amount is not None))


@contextlib.contextmanager
def record_usage() -> Iterator[UsageRecorder]:
    """Record the usage and dollars of every request sent inside the ``with`` block.

    >>> with feste.record_usage() as usage:          # doctest: +SKIP
    ...     feste.compute(answers)
    >>> usage.total.prompt_tokens, usage.cost        # doctest: +SKIP
    >>> print(usage.summary())                       # doctest: +SKIP
    """
    recorder = UsageRecorder(current_observer.get())
    token = current_observer.set(recorder)
    try:
        yield recorder
    finally:
        current_observer.reset(token)


# -- relaying reports from worker processes ---------------------------------------------


class _Relay(RunObserver):
    """In a worker: keeps what ends (requests, cached calls) to send back with a value."""

    def __init__(self) -> None:
        self.events: list[RequestReport | CachedCalls] = []
        self._lock = threading.Lock()

    def request_ended(self, request: Request, report: RequestReport) -> None:
        with self._lock:
            self.events.append(report)

    def calls_cached(self, cached: CachedCalls) -> None:
        with self._lock:
            self.events.append(cached)


@dataclass(frozen=True)
class Relayed:
    """A task's value and the reports of what its requests did, sent back by a worker."""

    value: Any
    events: tuple[RequestReport | CachedCalls, ...]


_EVENTS_ATTRIBUTE = "_feste_relayed_events"


def run_relayed(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Worker side: ``func(*args, **kwargs)``, as a :class:`Relayed` when it made requests.

    An exception that leaves ``func`` carries the reports as an attribute (read by
    :func:`delivered_error`). Inside another relayed call it only calls ``func``.
    """
    if isinstance(current_observer.get(), _Relay):
        return func(*args, **kwargs)
    relay = _Relay()
    token = current_observer.set(relay)
    try:
        value = func(*args, **kwargs)
    except BaseException as error:
        if relay.events:
            with contextlib.suppress(AttributeError):
                setattr(error, _EVENTS_ATTRIBUTE, tuple(relay.events))
        raise
    finally:
        current_observer.reset(token)
    return Relayed(value, tuple(relay.events)) if relay.events else value


def _deliver(events: Iterable[RequestReport | CachedCalls], observer: RunObserver) -> None:
    for event in events:
        if isinstance(event, CachedCalls):
            observer.calls_cached(event)
        else:
            request = Request(
                provider=event.provider,
                method=event.method,
                path="",
                payload={},
                model=event.model,
                items=event.items,
            )
            observer.request_ended(request, event)


def delivered(value: Any, observer: RunObserver | None = None) -> Any:
    """Caller side: tell the reports a worker sent back (``observer``, else the current
    one) and return the task's plain value; any other value is returned as it is."""
    if not isinstance(value, Relayed):
        return value
    _deliver(value.events, observer if observer is not None else current_observer.get())
    return value.value


def delivered_error(error: BaseException, observer: RunObserver | None = None) -> BaseException:
    """Caller side: tell the reports an exception from a worker carries; return it."""
    events = getattr(error, _EVENTS_ATTRIBUTE, None)
    if events:
        with contextlib.suppress(AttributeError):
            delattr(error, _EVENTS_ATTRIBUTE)
        _deliver(events, observer if observer is not None else current_observer.get())
    return error
