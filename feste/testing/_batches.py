"""OpenAI's Files and Batch APIs, simulated: uploads, jobs, output and error files.

Design: ``BatchService`` holds the uploaded files and the jobs of one server and
answers their routes (``POST /v1/files``, ``GET /v1/files/{id}``,
``GET /v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches`` (every job,
newest first), ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``). It lives
on the server's event loop like the rest of ``ApiSimulator``'s state, so it needs no
locks.

A job's lines are answered when the job *finishes*, which happens lazily: the first
``GET`` of a job made ``batch_completion_delay`` seconds (as configured at that GET)
after its creation finds it
``completed``, with an output file (one line per answered request) and an error file
(one line per failed request). Each line is answered exactly as the online endpoint
would answer the same body (the same parsers and deterministic answers), and its
markers act per line: a ``[[status:NNN]]`` marker puts that line in the error file
with that status and the provider's message, ``[[malformed]]`` writes a line of the
output file that is not JSON; other markers are ignored (delays and hangs stand for
slow generations, which a batch job does not show). While a job is expiring
(``batch_expire_jobs`` counts down the jobs to expire) it ends ``expired`` with every
line in the error file under code ``batch_expired``. A cancelled job ends
``cancelled`` with no lines answered.

Statistics (``stats()["batches"]``): ``files_uploaded``, ``jobs_created``,
``jobs_cancelled``, ``jobs_expired``, ``lines_answered``, ``lines_failed``,
``downloads``, and ``billed`` (per model, what the answered lines billed). Answered
lines are billed in ``stats()["billed"]`` too, like online requests.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import BodyPartReader, web

from ._answers import RequestError, error_payload, json_bytes
from ._config import ServerConfig
from ._faults import MALFORMED_BODY
from ._parsing import Endpoint

__all__ = ["BATCH_ENDPOINTS", "BatchService"]

#: The endpoints a job may name, as in OpenAI's ``/v1/batches``.
BATCH_ENDPOINTS: Final = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")

_TERMINAL: Final = frozenset({"completed", "expired", "cancelled", "failed"})


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class _Job:
    id: str
    endpoint: str
    input_file_id: str
    lines: list[dict[str, Any]]
    created_at: int
    started: float
    expires: bool
    metadata: Mapping[str, Any] | None
    status: str = "in_progress"
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    ended_at: int | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        ended = self.ended_at
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.created_at,
            "expires_at": self.created_at + 86_400,
            "finalizing_at": ended,
            "completed_at": ended if self.status == "completed" else None,
            "failed_at": ended if self.status == "failed" else None,
            "expired_at": ended if self.status == "expired" else None,
            "cancelling_at": ended if self.status == "cancelled" else None,
            "cancelled_at": ended if self.status == "cancelled" else None,
            "request_counts": {
                "total": len(self.lines),
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": dict(self.metadata) if self.metadata else None,
        }


def _json_answer(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json_bytes(payload), content_type="application/json")


def _openai_error(status: int, message: str, param: str | None = None) -> web.Response:
    return _json_answer(error_payload("openai", RequestError(status, message, param=param)), status)


class BatchService:
    """The files and batch jobs of one simulated server (see the module docstring).

    ``endpoints`` maps a route to its online endpoint, whose parser answers the lines;
    ``bill(model, payload, endpoint)`` counts an answered line in the server's
    statistics.
    """

    def __init__(
        self,
        endpoints: Mapping[str, Endpoint],
        config: Callable[[], ServerConfig],
        bill: Callable[[Endpoint, str, dict[str, Any]], None],
    ) -> None:
        self._endpoints = endpoints
        self._config = config
        self._bill = bill
        self._files: dict[str, _File] = {}
        self._jobs: dict[str, _Job] = {}
        self._expire_left = 0
        self.counts: dict[str, int] = self.zero_counts()
        # Per model, what answered lines billed (they are in the server's "billed" too).
        self.billed: dict[str, dict[str, int]] = {}

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.counts,
            "billed": {model: dict(entry) for model, entry in self.billed.items()},
        }

    def reset(self) -> None:
        self.counts = self.zero_counts()
        self.billed = {}

    def expire_next(self, jobs: int) -> None:
        """The next ``jobs`` jobs created expire instead of completing."""
        self._expire_left = jobs

    @staticmethod
    def zero_counts() -> dict[str, int]:
        return dict.fromkeys(
            (
                "files_uploaded",
                "jobs_created",
                "jobs_cancelled",
                "jobs_expired",
                "lines_answered",
                "lines_failed",
                "downloads",
            ),
            0,
        )

    def add_routes(self, app: web.Application, wrap: Callable[[Any], Any]) -> None:
        """Add the routes; ``wrap(handler)`` applies the server's counting and auth."""
        app.router.add_post("/v1/files", wrap(self.upload))
        app.router.add_get("/v1/files/{file_id}", wrap(self.file_info))
        app.router.add_get("/v1/files/{file_id}/content", wrap(self.file_content))
        app.router.add_post("/v1/batches", wrap(self.create))
        app.router.add_get("/v1/batches", wrap(self.list_jobs))
        app.router.add_get("/v1/batches/{batch_id}", wrap(self.retrieve))
        app.router.add_post("/v1/batches/{batch_id}/cancel", wrap(self.cancel))

    # -- files ----------------------------------------------------------------------

    def _new_file(self, filename: str, purpose: str, content: bytes) -> _File:
        stored = _File(
            f"file-{secrets.token_hex(12)}", filename, purpose, content, int(time.time())
        )
        self._files[stored.id] = stored
        return stored

    async def upload(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return _openai_error(400, "upload a file as multipart/form-data", "file")
        reader = await request.multipart()
        purpose: str | None = None
        filename = "upload.jsonl"
        content: bytes | None = None
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                filename = part.filename or filename
                content = bytes(await part.read())
        if content is None:
            return _openai_error(400, "the 'file' field is missing", "file")
        if purpose != "batch":
            return _openai_error(400, f"purpose must be 'batch', got {purpose!r}", "purpose")
        stored = self._new_file(filename, purpose, content)
        self.counts["files_uploaded"] += 1
        return _json_answer(stored.describe())

    def _file(self, request: web.Request) -> _File | web.Response:
        file_id = request.match_info["file_id"]
        found = self._files.get(file_id)
        if found is None:
            return _openai_error(404, f"No such File object: {file_id}", "id")
        return found

    async def file_info(self, request: web.Request) -> web.Response:
        found = self._file(request)
        return found if isinstance(found, web.Response) else _json_answer(found.describe())

    async def file_content(self, request: web.Request) -> web.Response:
        found = self._file(request)
        if isinstance(found, web.Response):
            return found
        self.counts["downloads"] += 1
        return web.Response(body=found.content, content_type="application/octet-stream")

    # -- jobs -----------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _openai_error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return _openai_error(400, "the request body must be a JSON object")
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_ENDPOINTS:
            return _openai_error(
                400, f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}", "endpoint"
            )
        if body.get("completion_window") != "24h":
            return _openai_error(400, "completion_window must be '24h'", "completion_window")
        input_file = self._files.get(str(body.get("input_file_id")))
        if input_file is None:
            return _openai_error(
                400, f"No such File object: {body.get('input_file_id')}", "input_file_id"
            )
        lines, errors = _read_lines(input_file.content, endpoint)
        expires = self._expire_left > 0
        if expires:
            self._expire_left -= 1
        job = _Job(
            id=f"batch_{secrets.token_hex(12)}",
            endpoint=endpoint,
            input_file_id=input_file.id,
            lines=lines,
            created_at=int(time.time()),
            started=time.monotonic(),
            expires=expires,
            metadata=body.get("metadata") if isinstance(body.get("metadata"), dict) else None,
        )
        if errors:
            job.status = "failed"
            job.errors = errors
            job.ended_at = job.created_at
        self._jobs[job.id] = job
        self.counts["jobs_created"] += 1
        return _json_answer(job.describe())

    async def list_jobs(self, request: web.Request) -> web.Response:
        jobs = [job.describe() for job in reversed(self._jobs.values())]
        return _json_answer(
            {
                "object": "list",
                "data": jobs,
                "first_id": jobs[0]["id"] if jobs else None,
                "last_id": jobs[-1]["id"] if jobs else None,
                "has_more": False,
            }
        )

    def _job(self, request: web.Request) -> _Job | web.Response:
        batch_id = request.match_info["batch_id"]
        job = self._jobs.get(batch_id)
        if job is None:
            return _openai_error(404, f"No such Batch object: {batch_id}", "batch_id")
        return job

    async def retrieve(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if isinstance(job, web.Response):
            return job
        # The delay as configured now: a test can hold jobs, then let them finish.
        delay = self._config().batch_completion_delay
        if job.status == "in_progress" and time.monotonic() >= job.started + delay:
            self._finish(job)
        return _json_answer(job.describe())

    async def cancel(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if isinstance(job, web.Response):
            return job
        if job.status in _TERMINAL:
            return _openai_error(409, f"Cannot cancel a batch with status '{job.status}'")
        job.status = "cancelled"
        job.ended_at = int(time.time())
        self.counts["jobs_cancelled"] += 1
        return _json_answer(job.describe())

    def _bill_line(self, endpoint: Endpoint, model: str, payload: dict[str, Any]) -> None:
        if not model:
            return
        self._bill(endpoint, model, payload)
        prompt, completion, searches = endpoint.billed(payload)
        entry = self.billed.setdefault(
            model,
            {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "search_units": 0},
        )
        entry["requests"] += 1
        entry["prompt_tokens"] += prompt
        entry["completion_tokens"] += completion
        entry["search_units"] += searches

    def _finish(self, job: _Job) -> None:
        """Answer every line of ``job`` (or expire them) and write its files."""
        config = self._config()
        output: list[bytes] = []
        failures: list[bytes] = []
        endpoint = self._endpoints[job.endpoint]
        for number, line in enumerate(job.lines):
            custom_id = line["custom_id"]
            request_id = f"batch_req_{job.id}_{number}"
            if job.expires:
                failures.append(
                    _error_line(request_id, custom_id, "batch_expired", "This request expired")
                )
                continue
            outcome = _answer_line(endpoint, line["body"], config, request_id)
            if isinstance(outcome, RequestError):
                failures.append(_failed_line(request_id, custom_id, outcome))
            elif outcome is None:
                output.append(MALFORMED_BODY)
                job.completed += 1
            else:
                output.append(_output_line(request_id, custom_id, outcome))
                self._bill_line(endpoint, str(line["body"].get("model", "")), outcome)
                job.completed += 1
        job.failed = len(failures)
        self.counts["lines_answered"] += job.completed
        self.counts["lines_failed"] += job.failed
        if output:
            job.output_file_id = self._new_file(
                f"{job.id}_output.jsonl", "batch_output", b"\n".join(output) + b"\n"
            ).id
        if failures:
            job.error_file_id = self._new_file(
                f"{job.id}_error.jsonl", "batch_output", b"\n".join(failures) + b"\n"
            ).id
        job.status = "expired" if job.expires else "completed"
        if job.expires:
            self.counts["jobs_expired"] += 1
        job.ended_at = int(time.time())


def _read_lines(content: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The request lines of an input file, and the validation errors (OpenAI's shape)."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            errors.append(_validation(number, "invalid_json_line", "the line is not JSON"))
            continue
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            errors.append(_validation(number, "missing_custom_id", "a custom_id is required"))
            continue
        if line["custom_id"] in seen:
            errors.append(
                _validation(number, "duplicate_custom_id", f"custom_id {line['custom_id']!r}")
            )
            continue
        if line.get("method") != "POST" or line.get("url") != endpoint:
            errors.append(
                _validation(number, "mismatched_url", f"each line must POST to {endpoint}")
            )
            continue
        if not isinstance(line.get("body"), dict):
            errors.append(_validation(number, "missing_body", "a JSON object body is required"))
            continue
        model = line["body"].get("model")
        if lines and model != lines[0]["body"].get("model"):
            errors.append(
                _validation(number, "mismatched_model", "every request of a file uses one model")
            )
            continue
        seen.add(line["custom_id"])
        lines.append(line)
    if not lines and not errors:
        errors.append(_validation(None, "empty_file", "the input file has no requests"))
    return lines, errors


def _validation(line: int | None, code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def _answer_line(
    endpoint: Endpoint, body: dict[str, Any], config: ServerConfig, request_id: str
) -> dict[str, Any] | RequestError | None:
    """The online answer to ``body``, its error, or None for a ``[[malformed]]`` line."""
    try:
        parsed = endpoint.parse(body, config)
    except RequestError as error:
        return error
    trigger = parsed.trigger
    if trigger is not None and trigger.kind == "status":
        status = trigger.status or 500
        return RequestError(status, f"Injected error {status} triggered by {trigger.where}")
    if trigger is not None and trigger.kind == "malformed":
        return None
    return parsed.answer(request_id)


def _output_line(request_id: str, custom_id: str, body: dict[str, Any]) -> bytes:
    return json_bytes(
        {
            "id": request_id,
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body},
            "error": None,
        }
    )


def _failed_line(request_id: str, custom_id: str, error: RequestError) -> bytes:
    return json_bytes(
        {
            "id": request_id,
            "custom_id": custom_id,
            "response": {
                "status_code": error.status,
                "request_id": request_id,
                "body": error_payload("openai", error),
            },
            "error": None,
        }
    )


def _error_line(request_id: str, custom_id: str, code: str, message: str) -> bytes:
    return json_bytes(
        {
            "id": request_id,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    )
