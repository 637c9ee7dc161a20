"""Provider Batch API jobs inside ordinary graphs: gather, submit, poll, hand back.

Design
------
A call routed to a Batch API (:func:`batch_route`: the call's or its backend's
``batch_api`` parameter, else the ``batch_api`` option, and only for methods that
accept it: OpenAI's chat, completions and embeddings) reaches the sender like any
other; :func:`feste._calls.send` hands its built :class:`Request` to the
computation's :class:`BatchJobs` instead of the online transport. Cache lookups and
writes stay in the sender, so hits never get here.

* **Gathering.** Requests wait in one queue per backend and endpoint until no new one
  came for ``batch_api_window`` seconds (at most 20 windows after the first), then
  are cut into jobs at the provider's limits (:attr:`BatchJobs.max_requests`,
  :attr:`~BatchJobs.max_bytes`, :attr:`~BatchJobs.max_job_tokens`), written as JSONL,
  uploaded (purpose ``"batch"``) and submitted. With a token limit (the provider's
  enqueued-token budget), the jobs of one model running at once stay within it: a job
  that does not fit waits for earlier ones to end. Calls that depend on batch results
  start when their inputs arrive; online calls are never held back (batch requests
  take no limiter admission: a job is not a connection).
* **Watching.** Each job has one watcher task that polls with back-off
  (``batch_api_poll``, growing by half up to 30 times), downloads the output and error
  files when the job ends and maps each line back to its request by ``custom_id``.
  Waiters share the watcher (shielded), so a cancelled caller cancels nothing; a
  watcher whose waiters are all gone stops polling (the job runs on at the provider,
  and a later run re-attaches to it).
* **Resume.** ``custom_id`` is the SHA-256 of the backend identity, endpoint and
  request body (plus an occurrence number for identical bodies), so it names the
  request by content. With a cache, each job is saved in the store's batch jobs
  table (:meth:`~feste.cache.base.CacheStore.save_batch_job`, under the run's name,
  ``""`` without one) as soon as it exists; a computation started again with the same
  cache and run name attaches its requests to the stored jobs holding their ids
  instead of submitting them again. Answers found in a job of an earlier process are
  used; its failures are sent again.
* **Faults.** A line of the error file (or an output line with an error status) fails
  its own request with the error the online endpoint would have raised
  (:func:`~feste.backend.transports.status_error`), so a bad item of a batched
  embedding request is isolated by the sender as usual; retryable statuses (429, 5xx)
  go into a later job, up to ``max_retries`` times. Requests an expired or cancelled
  job did not finish are resubmitted (``batch_api_on_expiry="resubmit"``, up to
  ``max_retries`` times) or sent online (``"online"``). A job that fails validation
  fails its requests with the provider's errors; an output line that is not JSON
  fails the requests left without an answer with an error naming the job and line.

A :class:`BatchJobs` lives for one computation on one event loop (found through the
computation's :func:`~feste.limits.run_limits` scope), so nothing leaks between runs.
Observers hear of each job's state through ``batch_job_changed`` (progress bars).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import random
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from feste import context
from feste.backend.base import Backend
from feste.backend.transports import BaseTransport, status_error
from feste.backend.types import Request, Response
from feste.cache._open import active_store
from feste.cache.base import CacheStore
from feste.cache.keys import ROUTING_PARAMS
from feste.errors import (
    BackendError,
    BadRequestError,
    MalformedResponseError,
    RetryableError,
    TransientError,
)
from feste.limits import RunLimits, run_limits

__all__ = [
    "BatchJobStatus",
    "BatchJobs",
    "SendOnline",
    "batch_jobs",
    "batch_route",
    "endpoint_of",
]

_TERMINAL = frozenset({"completed", "expired", "cancelled", "failed"})
_UNFINISHED_CODES = frozenset({"batch_expired", "batch_cancelled"})
_MAX_WINDOWS = 20
_MAX_POLL_GROWTH = 30.0


def batch_route(
    backend: Backend, method: str, params: Mapping[str, Any]
) -> tuple[bool, Mapping[str, Any]]:
    """Whether a call goes to a Batch API job, and its parameters without the routing
    ones (what is sent and what keys are made of)."""
    explicit = params.get("batch_api")
    if not ROUTING_PARAMS.isdisjoint(params):
        params = {name: value for name, value in params.items() if name not in ROUTING_PARAMS}
    if "batch_api" not in backend.spec(method).params:
        return False, params  # not eligible: Cohere, local models...
    wanted = explicit if explicit is not None else context.get("batch_api")
    return bool(wanted), params


def endpoint_of(backend: Backend, request: Request) -> str:
    """The Batch API ``url`` of ``request`` (``"/v1/embeddings"``): the base URL's path
    and the request's."""
    return urlsplit(backend.base_url).path.rstrip("/") + request.path


@dataclass(frozen=True)
class BatchJobStatus:
    """What an observer is told about one job: its state and request counts."""

    job_id: str
    provider: str
    endpoint: str
    status: str
    total: int
    completed: int
    failed: int
    resumed: bool = False


class SendOnline(Exception):
    """The job expired or was cancelled and ``batch_api_on_expiry="online"``: the sender
    sends the request as an ordinary one."""


class _Unfinished:
    """An outcome: the job ended before answering this request."""

    def __init__(self, why: str) -> None:
        self.why = why


Outcome = Response | BaseException | _Unfinished


@dataclass
class _Entry:
    custom_id: str
    line: bytes
    tokens: int
    request: Request
    assigned: asyncio.Future[_Job]
    #: Its caller was cancelled before the job was submitted: it is left out.
    abandoned: bool = False


@dataclass
class _Job:
    """One job (made here, or found in the store) and its watcher."""

    job_id: str
    provider: str
    endpoint: str
    custom_ids: list[str]
    requests: dict[str, Request]
    tokens: int
    resumed: bool
    watcher: asyncio.Task[dict[str, Outcome]] | None = None
    waiters: int = 0
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Queue:
    backend: Backend
    transport: BaseTransport
    endpoint: str
    entries: list[_Entry] = field(default_factory=list)
    first_at: float = 0.0
    timer: asyncio.TimerHandle | None = None


#: (backend identity, credential fingerprint, endpoint, model): one queue, its jobs.
_QueueKey = tuple[str, str | None, str, str | None]


class BatchJobs:
    """The Batch API jobs of one computation on one event loop (module docstring).

    The provider's limits are class attributes: a job holds at most
    :attr:`max_requests` requests, :attr:`max_bytes` of JSONL and
    :attr:`max_job_tokens` estimated tokens (OpenAI's enqueued-token budget; None: no
    cap). The ``batch_api_job_limits`` option lowers them (``requests``, ``bytes``,
    ``tokens``) for one computation.
    """

    max_requests: ClassVar[int] = 50_000
    max_bytes: ClassVar[int] = 200 * 1024 * 1024
    max_job_tokens: ClassVar[int | None] = None

    def __init__(self, store: CacheStore | None, run: str) -> None:
        self.store = store
        self.run = run
        self.window = float(context.get("batch_api_window"))
        self.poll = float(context.get("batch_api_poll"))
        self.max_retries = int(context.get("max_retries"))
        self.on_expiry = str(context.get("batch_api_on_expiry"))
        lowered = context.get("batch_api_job_limits") or {}
        self.job_requests = min(self.max_requests, lowered.get("requests", self.max_requests))
        self.job_bytes = min(self.max_bytes, lowered.get("bytes", self.max_bytes))
        token_caps = [cap for cap in (self.max_job_tokens, lowered.get("tokens")) if cap]
        self.job_tokens: int | None = min(token_caps) if token_caps else None
        self._queues: dict[_QueueKey, _Queue] = {}
        self._occurrences: dict[str, int] = {}
        self._stored: dict[str, _Job] | None = None
        self._loading: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # The estimated tokens of this computation's running jobs, per model: with a
        # token limit, a job waits until it fits (the provider's enqueued-token budget).
        self._enqueued: dict[str | None, int] = {}
        self._budget = asyncio.Condition()

    # -- the sender's entry -----------------------------------------------------------

    async def send(
        self,
        backend: Backend,
        transport: BaseTransport,
        request: Request,
        changed: Callable[[BatchJobStatus], None],
    ) -> Response:
        """The provider's answer to ``request``, through a job; raises its error,
        or :class:`SendOnline`."""
        if not transport.supports_batches:
            raise transport._no_batches()
        endpoint = endpoint_of(backend, request)
        custom_id = self._custom_id(backend, endpoint, request)
        await self._load_stored()
        stored = self._stored.get(custom_id) if self._stored is not None else None
        if stored is not None:
            # Sent by an earlier process: its answer is used; a failure is sent again.
            outcome = await self._outcome(stored, backend, transport, custom_id, changed)
            if isinstance(outcome, Response):
                return outcome
        retries = 0
        resubmits = 0
        while True:
            job = await self._enqueue(backend, transport, endpoint, custom_id, request, changed)
            outcome = await self._outcome(job, backend, transport, custom_id, changed)
            if isinstance(outcome, Response):
                return outcome
            if isinstance(outcome, _Unfinished):
                if self.on_expiry == "online":
                    raise SendOnline(outcome.why)
                resubmits += 1
                if resubmits > self.max_retries:
                    raise TransientError(
                        f"batch job {job.job_id} {outcome.why}, and the request was "
                        f"resubmitted {self.max_retries} times (raise max_retries, or set "
                        "batch_api_on_expiry='online')",
                        backend=request.provider,
                        method=request.method,
                        model=request.model,
                    )
                continue
            if isinstance(outcome, RetryableError) and retries < self.max_retries:
                retries += 1
                continue
            error = copy.copy(outcome)
            if isinstance(error, BackendError):
                error.attempts = retries + resubmits + 1
            raise error

    # -- ids, the store ----------------------------------------------------------------

    def _custom_id(self, backend: Backend, endpoint: str, request: Request) -> str:
        body = json.dumps(request.payload, sort_keys=True, separators=(",", ":"), default=str)
        text = f"{backend.identity()}\n{endpoint}\n{body}"
        digest = hashlib.sha256(text.encode()).hexdigest()[:40]
        occurrence = self._occurrences.get(digest, 0)
        self._occurrences[digest] = occurrence + 1
        return f"feste-{digest}-{occurrence}"

    async def _load_stored(self) -> None:
        """Read the jobs stored for this run, once (in a thread: it is database work)."""
        if self._stored is not None:
            return
        if self._loading is not None:
            await asyncio.shield(self._loading)
            return
        loop = asyncio.get_running_loop()
        self._loading = loop.create_future()
        stored: dict[str, _Job] = {}
        try:
            if self.store is not None:
                records = await asyncio.to_thread(self.store.batch_jobs, self.run)
                for record in records:
                    job = _Job(
                        job_id=str(record["job_id"]),
                        provider=str(record.get("provider", "")),
                        endpoint=str(record.get("endpoint", "")),
                        custom_ids=list(record.get("custom_ids", [])),
                        requests={},
                        tokens=0,
                        resumed=True,
                        record=dict(record),
                    )
                    for custom_id in job.custom_ids:
                        stored[custom_id] = job
        finally:
            self._stored = stored
            self._loading.set_result(None)

    async def _save(self, job: _Job, **changes: Any) -> None:
        if self.store is None:
            return
        job.record.update(changes)
        await asyncio.to_thread(self.store.save_batch_job, self.run, job.job_id, job.record)

    # -- gathering and submitting -------------------------------------------------------

    async def _enqueue(
        self,
        backend: Backend,
        transport: BaseTransport,
        endpoint: str,
        custom_id: str,
        request: Request,
        changed: Callable[[BatchJobStatus], None],
    ) -> _Job:
        loop = asyncio.get_running_loop()
        # A job holds the requests of one model (OpenAI's rule for an input file).
        key = (backend.identity(), backend.credential_fingerprint(), endpoint, request.model)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(backend, transport, endpoint)
        line = json.dumps(
            {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": request.payload},
            separators=(",", ":"),
            ensure_ascii=False,
            default=str,
        ).encode()
        entry = _Entry(custom_id, line, request.estimated_tokens, request, loop.create_future())
        now = loop.time()
        if not queue.entries:
            queue.first_at = now
        queue.entries.append(entry)
        if queue.timer is not None:
            queue.timer.cancel()
        due = min(now + self.window, queue.first_at + self.window * _MAX_WINDOWS)
        queue.timer = loop.call_at(due, self._flush, key, changed)
        try:
            return await asyncio.shield(entry.assigned)
        except asyncio.CancelledError:
            entry.abandoned = True
            raise

    def _flush(self, key: _QueueKey, changed: Callable[[BatchJobStatus], None]) -> None:
        queue = self._queues[key]
        entries = [entry for entry in queue.entries if not entry.abandoned]
        queue.entries = []
        queue.timer = None
        for part in self._split(entries):
            task = asyncio.get_running_loop().create_task(
                self._submit(queue.backend, queue.transport, queue.endpoint, part, changed)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _split(self, entries: list[_Entry]) -> list[list[_Entry]]:
        """``entries`` cut into jobs within the provider's limits, in order."""
        parts: list[list[_Entry]] = []
        current: list[_Entry] = []
        size = tokens = 0
        for entry in entries:
            over = (
                len(current) >= self.job_requests
                or size + len(entry.line) + 1 > self.job_bytes
                or (self.job_tokens is not None and tokens + entry.tokens > self.job_tokens)
            )
            if current and over:
                parts.append(current)
                current, size, tokens = [], 0, 0
            current.append(entry)
            size += len(entry.line) + 1
            tokens += entry.tokens
        if current:
            parts.append(current)
        return parts

    async def _submit(
        self,
        backend: Backend,
        transport: BaseTransport,
        endpoint: str,
        entries: list[_Entry],
        changed: Callable[[BatchJobStatus], None],
    ) -> None:
        """Upload and create one job, save it, start its watcher, tell its requests."""
        model = entries[0].request.model
        tokens = sum(entry.tokens for entry in entries)
        reserved = False
        try:
            await self._reserve(model, tokens)
            reserved = True
            content = b"\n".join(entry.line for entry in entries) + b"\n"
            uploaded = await self._patiently(
                lambda: transport.upload_file(f"feste-{self.run or 'batch'}.jsonl", content)
            )
            file_id = _id_of(backend, uploaded, "files.create")
            created = await self._patiently(
                lambda: transport.create_batch(
                    file_id, endpoint, {"feste_run": self.run or "(unnamed)"}
                )
            )
            job_id = _id_of(backend, created, "batches.create")
            job = _Job(
                job_id=job_id,
                provider=backend.provider,
                endpoint=endpoint,
                custom_ids=[entry.custom_id for entry in entries],
                requests={entry.custom_id: entry.request for entry in entries},
                tokens=tokens,
                resumed=False,
                record={
                    "job_id": job_id,
                    "provider": backend.provider,
                    "backend": backend.identity(),
                    "endpoint": endpoint,
                    "model": model,
                    "custom_ids": [entry.custom_id for entry in entries],
                    "input_file_id": file_id,
                    "status": str(created.get("status", "validating")),
                },
            )
            await self._save(job)
            changed(_status(job, created))
        except BaseException as error:
            if reserved:
                await self._release(model, tokens)
            for entry in entries:
                if not entry.assigned.done():
                    entry.assigned.set_exception(copy.copy(error))
            if not isinstance(error, Exception):
                raise
            return
        job.watcher = asyncio.get_running_loop().create_task(
            self._watch_holding(job, backend, transport, changed, model, tokens)
        )
        for entry in entries:
            if not entry.assigned.done():
                entry.assigned.set_result(job)

    async def _reserve(self, model: str | None, tokens: int) -> None:
        """Wait until a job of ``tokens`` fits the token limit among the running jobs
        of ``model`` (a job alone always fits: it was cut to the limit)."""
        limit = self.job_tokens
        if limit is None:
            return
        async with self._budget:
            await self._budget.wait_for(
                lambda: not self._enqueued.get(model) or self._enqueued[model] + tokens <= limit
            )
            self._enqueued[model] = self._enqueued.get(model, 0) + tokens

    async def _watch_holding(
        self,
        job: _Job,
        backend: Backend,
        transport: BaseTransport,
        changed: Callable[[BatchJobStatus], None],
        model: str | None,
        tokens: int,
    ) -> dict[str, Outcome]:
        """:meth:`_watch` a job made here, which holds its tokens until it ends."""
        try:
            return await self._watch(job, backend, transport, changed)
        finally:
            await self._release(model, tokens)

    async def _release(self, model: str | None, tokens: int) -> None:
        if self.job_tokens is None:
            return
        async with self._budget:
            self._enqueued[model] = self._enqueued.get(model, 0) - tokens
            self._budget.notify_all()

    async def _patiently(self, operation: Callable[[], Any]) -> Any:
        """``operation()`` retried on transient errors (full jitter), ``max_retries`` times."""
        failures = 0
        while True:
            try:
                return await operation()
            except RetryableError:
                failures += 1
                if failures > self.max_retries:
                    raise
                backoff = float(context.get("retry_backoff"))
                await asyncio.sleep(random.uniform(0.0, min(20.0, backoff * 2 ** (failures - 1))))

    # -- watching -----------------------------------------------------------------------

    async def _outcome(
        self,
        job: _Job,
        backend: Backend,
        transport: BaseTransport,
        custom_id: str,
        changed: Callable[[BatchJobStatus], None],
    ) -> Outcome:
        if job.watcher is None:  # a stored job (or one left unwatched): watched from now on
            job.watcher = asyncio.get_running_loop().create_task(
                self._watch(job, backend, transport, changed)
            )
        job.waiters += 1
        try:
            outcomes = await asyncio.shield(job.watcher)
        except Exception as error:  # the job could not be watched: each caller's own copy
            return copy.copy(error)
        finally:
            job.waiters -= 1
        return outcomes.get(custom_id, _Unfinished("ended without answering it"))

    async def _watch(
        self,
        job: _Job,
        backend: Backend,
        transport: BaseTransport,
        changed: Callable[[BatchJobStatus], None],
    ) -> dict[str, Outcome]:
        """Poll ``job`` until it ends; its outcome per custom id."""
        delay = self.poll
        failures = 0
        while True:
            try:
                batch = await transport.get_batch(job.job_id)
            except RetryableError as error:
                failures += 1
                if failures > self.max_retries:
                    # Not retryable: sending the requests again would make a second job.
                    raise BackendError(
                        f"lost track of batch job {job.job_id} after {failures} failed polls "
                        f"({error}); it may still be running: run again with the same cache "
                        "and run name to re-attach to it",
                        backend=job.provider,
                    ) from None
                batch = None
            if batch is not None:
                failures = 0
                status = str(batch.get("status", ""))
                changed(_status(job, batch))
                if status in _TERMINAL:
                    break
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, self.poll * _MAX_POLL_GROWTH)
            if job.waiters == 0:
                # Nobody waits any more: the job runs on at the provider. A caller that
                # comes for it later starts a new watcher; a later run re-attaches.
                job.watcher = None
                return {}
        outcomes = await self._outcomes(job, backend, transport, batch)
        await self._save(job, status=status)
        return outcomes

    async def _outcomes(
        self, job: _Job, backend: Backend, transport: BaseTransport, batch: Mapping[str, Any]
    ) -> dict[str, Outcome]:
        status = str(batch.get("status"))
        outcomes: dict[str, Outcome] = {}
        if status == "failed":
            errors = (batch.get("errors") or {}).get("data") or []
            detail = "; ".join(
                f"{error.get('code')}: {error.get('message')} (line {error.get('line')})"
                for error in errors
                if isinstance(error, Mapping)
            )
            for custom_id in job.custom_ids:
                outcomes[custom_id] = BadRequestError(
                    f"batch job {job.job_id} failed validation: {detail or 'no reason given'}",
                    backend=job.provider,
                    method=self._request_of(job, custom_id).method,
                    model=self._request_of(job, custom_id).model,
                )
            return outcomes
        broken: MalformedResponseError | None = None
        for kind in ("output_file_id", "error_file_id"):
            file_id = batch.get(kind)
            if not file_id:
                continue
            content = await self._download(transport, str(file_id))
            for number, raw in enumerate(content.splitlines(), start=1):
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                    custom_id = line["custom_id"]
                    outcome = self._line_outcome(job, backend, line)
                except (ValueError, KeyError, TypeError) as error:
                    where = "output" if kind == "output_file_id" else "error"
                    broken = broken or MalformedResponseError(
                        f"batch job {job.job_id}: line {number} of its {where} file "
                        f"({file_id}) is not a batch result ({type(error).__name__}: "
                        f"{backend.scrub(raw[:200].decode('utf-8', 'replace'))!r})",
                        backend=job.provider,
                    )
                    continue
                outcomes[custom_id] = outcome
        why = {
            "expired": "expired before answering it",
            "cancelled": "was cancelled before answering it",
        }.get(status, "ended without answering it")
        for custom_id in job.custom_ids:
            if custom_id not in outcomes:
                outcomes[custom_id] = broken if broken is not None else _Unfinished(why)
        return outcomes

    async def _download(self, transport: BaseTransport, file_id: str) -> bytes:
        content: bytes = await self._patiently(lambda: transport.download_file(file_id))
        return content

    def _request_of(self, job: _Job, custom_id: str) -> Request:
        found = job.requests.get(custom_id)
        if found is not None:
            return found
        return Request(provider=job.provider, method="batch", path=job.endpoint, payload={})

    def _line_outcome(self, job: _Job, backend: Backend, line: Mapping[str, Any]) -> Outcome:
        request = self._request_of(job, str(line["custom_id"]))
        response = line.get("response")
        error = line.get("error")
        if isinstance(response, Mapping) and response.get("status_code") is not None:
            status = int(response["status_code"])
            body = response.get("body")
            if 200 <= status < 300:
                return Response(status, body, {})
            return status_error(backend, request, status, {}, body)
        if isinstance(error, Mapping):
            code = str(error.get("code"))
            if code in _UNFINISHED_CODES:
                return _Unfinished(f"ended ({code}) before answering it")
            message = backend.scrub(str(error.get("message")))
            return BadRequestError(
                f"batch job {job.job_id}: {code}: {message}",
                backend=request.provider,
                method=request.method,
                model=request.model,
            )
        raise ValueError("neither a response nor an error")


def _id_of(backend: Backend, body: Mapping[str, Any], operation: str) -> str:
    """The ``id`` of a file or batch object the provider answered ``operation`` with."""
    found = body.get("id")
    if not isinstance(found, str) or not found:
        raise MalformedResponseError(
            f"unexpected response body to {operation}: no id in {backend.scrub(repr(body))[:200]}",
            backend=backend.provider,
            method=operation,
        )
    return found


def _status(job: _Job, batch: Mapping[str, Any]) -> BatchJobStatus:
    counts = batch.get("request_counts") or {}
    return BatchJobStatus(
        job_id=job.job_id,
        provider=job.provider,
        endpoint=job.endpoint,
        status=str(batch.get("status", "")),
        total=int(counts.get("total") or len(job.custom_ids)),
        completed=int(counts.get("completed") or 0),
        failed=int(counts.get("failed") or 0),
        resumed=job.resumed,
    )


_managers: weakref.WeakKeyDictionary[RunLimits, dict[asyncio.AbstractEventLoop, BatchJobs]] = (
    weakref.WeakKeyDictionary()
)


def batch_jobs() -> BatchJobs:
    """The current computation's jobs on the running loop (made on first use)."""
    scope = run_limits()
    loop = asyncio.get_running_loop()
    per_loop = _managers.get(scope)
    if per_loop is None:
        per_loop = _managers[scope] = {}
    jobs = per_loop.get(loop)
    if jobs is None:
        name = context.get("run")
        jobs = per_loop[loop] = BatchJobs(active_store(), name or "")
    return jobs
