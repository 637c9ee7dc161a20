"""Token usage as the providers report it, request by request.

Design
------
Every request leaves feste through ``feste._calls.send``, which tells the current
:class:`~feste._calls.RunObserver` what happened. :func:`record_usage` puts a
:class:`UsageRecorder` in front of the current observer for the code inside its
``with`` block (the observer lives in a ``ContextVar``, so the schedulers carry it into
their worker threads and the async engine chains its progress bar in front of it).
The recorder keeps one :class:`UsageRecord` per successful request: provider, method,
model, how many calls the request served (a batch serves many), and the tokens the
provider reported. Nothing here estimates: a provider that reports no usage (Cohere's
rerank) gives a record with zero tokens.

Requests sent on a Dask cluster are reported back to the client with each block's
results and replayed to the current observer there, so a recorder sees them; those
sent by the ``processes`` scheduler's worker processes are not seen.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from feste._calls import RunObserver, current_observer
from feste.backend.types import Request, Usage

__all__ = ["UsageRecord", "UsageRecorder", "record_usage"]


@dataclass(frozen=True)
class UsageRecord:
    """One successful request and the tokens its provider reported."""

    provider: str
    method: str
    model: str | None
    items: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageRecorder(RunObserver):
    """Collects a :class:`UsageRecord` per request; passes every event on."""

    def __init__(self, previous: RunObserver) -> None:
        self.previous = previous
        self._records: list[UsageRecord] = []
        self._lock = threading.Lock()

    # -- observer events --------------------------------------------------------------

    def request_started(self, request: Request) -> None:
        self.previous.request_started(request)

    def request_retried(self, request: Request, error: BaseException, attempt: int) -> None:
        self.previous.request_retried(request, error, attempt)

    def request_failed(self, request: Request, error: BaseException, attempt: int) -> None:
        self.previous.request_failed(request, error, attempt)

    def request_finished(self, request: Request, usage: Usage | None, seconds: float) -> None:
        record = UsageRecord(
            provider=request.provider,
            method=request.method,
            # The model the provider says answered, else the one asked for.
            model=(usage.model if usage is not None and usage.model else request.model),
            items=request.items,
            prompt_tokens=usage.prompt_tokens if usage is not None else 0,
            completion_tokens=usage.completion_tokens if usage is not None else 0,
            seconds=seconds,
        )
        with self._lock:
            self._records.append(record)
        self.previous.request_finished(request, usage, seconds)

    # -- reading ----------------------------------------------------------------------

    @property
    def records(self) -> list[UsageRecord]:
        """Every request recorded so far, in the order they finished."""
        with self._lock:
            return list(self._records)

    @property
    def requests(self) -> int:
        with self._lock:
            return len(self._records)

    @property
    def total(self) -> Usage:
        """All tokens, summed (``model`` is set when a single model answered)."""
        return _summed(self.records)

    def by_model(self) -> dict[tuple[str, str | None], Usage]:
        """Tokens per ``(provider, model)``."""
        groups: dict[tuple[str, str | None], list[UsageRecord]] = {}
        for record in self.records:
            groups.setdefault((record.provider, record.model), []).append(record)
        return {group: _summed(records) for group, records in groups.items()}

    def __repr__(self) -> str:
        total = self.total
        return (
            f"UsageRecorder({self.requests} requests, {total.prompt_tokens} prompt + "
            f"{total.completion_tokens} completion tokens)"
        )


def _summed(records: list[UsageRecord]) -> Usage:
    models = {record.model for record in records}
    return Usage(
        models.pop() if len(models) == 1 else None,
        sum(record.prompt_tokens for record in records),
        sum(record.completion_tokens for record in records),
    )


@contextlib.contextmanager
def record_usage() -> Iterator[UsageRecorder]:
    """Record the token usage of every request sent inside the ``with`` block.

    >>> with feste.record_usage() as usage:          # doctest: +SKIP
    ...     feste.compute(answers)
    >>> usage.total.prompt_tokens, usage.by_model()  # doctest: +SKIP
    """
    recorder = UsageRecorder(current_observer.get())
    token = current_observer.set(recorder)
    try:
        yield recorder
    finally:
        current_observer.reset(token)
