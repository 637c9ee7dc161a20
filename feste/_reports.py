"""What the sender measures and tells its observers, and what it does with a cut answer.

Design
------
:func:`feste._calls.send` times each request with a :class:`RequestTiming` and, once
the request is over, tells the current observer a :class:`RequestReport`; calls the
result cache answered are told as :class:`CachedCalls`. Both are plain, picklable
data with wall-clock times, so a worker process can record them and send them back to
the caller (:mod:`feste.usage`), where usage records and traces read them as if the
requests had been made there.

:func:`apply_truncation_policy` is the ``on_truncation`` option: a chat answer cut at
its token limit warns (a :class:`~feste.errors.TruncatedOutputWarning`, once per
computation: once per limits scope, :mod:`feste.limits`; an eager call is a
computation of its own), raises :class:`~feste.errors.TruncatedOutputError`, or
passes.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from dataclasses import dataclass

from feste import context
from feste.backend.types import Parsed, Request, Usage
from feste.errors import TruncatedOutputError, TruncatedOutputWarning
from feste.limits import RunLimits

__all__ = ["CachedCalls", "RequestReport", "RequestTiming", "apply_truncation_policy"]


@dataclass(frozen=True)
class RequestReport:
    """How one request went, told once it is over (answered, or failed for good).

    Times are wall-clock seconds since the epoch (``time.time()``), so reports made in
    worker processes line up with the caller's: ``queued_at`` when the request
    reached the sender, ``started_at`` when its first attempt was admitted by the
    limiters (None when it never was), ``ended_at`` when it was over.
    ``retry_wait`` is the time spent between attempts (backoff and re-admission);
    ``batch`` says it went through a provider Batch API job (:mod:`feste._batch_jobs`);
    ``error`` the final error as ``"Type: message"`` (None when answered). Plain data:
    it pickles, so workers can send it back (:mod:`feste.usage`).
    """

    provider: str
    method: str
    model: str | None
    items: int
    queued_at: float
    started_at: float | None
    ended_at: float
    attempts: int
    retry_wait: float
    usage: Usage | None
    error: str | None
    pid: int
    thread: int
    #: Sent through a provider Batch API job (billed at batch prices).
    batch: bool = False

    @property
    def limiter_wait(self) -> float:
        """Seconds the first attempt waited for admission (concurrency, rate limits)."""
        end = self.started_at if self.started_at is not None else self.ended_at
        return max(0.0, end - self.queued_at)

    @property
    def retries(self) -> int:
        return max(0, self.attempts - 1)


@dataclass(frozen=True)
class CachedCalls:
    """Calls the result cache answered (no request sent), and what they would have
    cost: the usage recorded in their answers, or estimated from their inputs and
    answers (``Backend.estimated_usage``). Plain data, like :class:`RequestReport`."""

    provider: str
    method: str
    model: str | None
    calls: int
    usage: Usage


class RequestTiming:
    """What :func:`send` measures of one request for its :class:`RequestReport`."""

    __slots__ = ("attempts", "batch", "queued_at", "retry_wait", "started_at", "waiting_since")

    def __init__(self) -> None:
        self.batch = False
        self.queued_at = time.time()
        self.started_at: float | None = None
        self.attempts = 0
        self.retry_wait = 0.0
        self.waiting_since: float | None = None  # monotonic: a retry began to wait

    def admitted(self, attempt: int) -> None:
        self.attempts = attempt
        if self.started_at is None:
            self.started_at = time.time()
        if self.waiting_since is not None:
            self.retry_wait += time.monotonic() - self.waiting_since
            self.waiting_since = None

    def retrying(self) -> None:
        self.waiting_since = time.monotonic()

    def report(
        self, request: Request, usage: Usage | None, error: BaseException | None
    ) -> RequestReport:
        if self.waiting_since is not None:
            self.retry_wait += time.monotonic() - self.waiting_since
        return RequestReport(
            provider=request.provider,
            method=request.method,
            model=(usage.model if usage is not None and usage.model else request.model),
            items=request.items,
            queued_at=self.queued_at,
            started_at=self.started_at,
            ended_at=time.time(),
            attempts=max(1, self.attempts),
            retry_wait=self.retry_wait,
            usage=usage,
            error=None if error is None else f"{type(error).__name__}: {error}",
            pid=os.getpid(),
            thread=threading.get_ident(),
            batch=self.batch,
        )


# The computations (their limits scopes) that already warned about a truncated answer.
_warned_truncation: weakref.WeakSet[RunLimits] = weakref.WeakSet()
_warned_lock = threading.Lock()


def apply_truncation_policy(scope: RunLimits, request: Request, parsed: Parsed) -> None:
    """Apply the ``on_truncation`` option to an answer cut at its token limit."""
    policy = context.get("on_truncation")
    if policy == "ignore":
        return
    model = f" model={request.model}" if request.model else ""
    if policy == "raise":
        value = parsed.values[0] if parsed.values else None
        raise TruncatedOutputError(
            "the answer was cut at its token limit (finish_reason 'length'); raise "
            "max_tokens, or set on_truncation='warn' or 'ignore' to accept cut answers",
            text=value if isinstance(value, str) else None,
            backend=request.provider,
            method=request.method,
            model=request.model,
        )
    with _warned_lock:
        if scope in _warned_truncation:
            return
        _warned_truncation.add(scope)
    warnings.warn(
        f"an answer of {request.provider}.{request.method}{model} was cut at its token limit "
        "(finish_reason 'length'); raise max_tokens, or set on_truncation='raise' to fail "
        "such calls or 'ignore' to silence this (shown once per run)",
        TruncatedOutputWarning,
        stacklevel=2,
    )
