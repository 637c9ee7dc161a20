"""The ``http`` transport: lean aiohttp, the default.

Design
------
One ``aiohttp.ClientSession`` per backend per loop, opened by :meth:`HTTPTransport.prepare`,
over an unlimited keep-alive connection pool (the scheduler limits concurrency, not
the pool). Bodies are encoded and decoded by :data:`._json.CODEC` (``orjson`` where
installed, else the stdlib ``json``, with the same results); the ``Authorization``
header is built from ``backend.api_key()`` at send time, so a key from the environment
is read where the call runs; the headers are one dict built once per key. Every
failure is mapped at the one ``except`` in :meth:`HTTPTransport.send` (see
:mod:`._errors`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from feste.backend.base import Backend
from feste.backend.transports._errors import (
    connection_error,
    decode_body,
    invalid_url_error,
    status_error,
    unexpected_error,
)
from feste.backend.transports._json import CODEC
from feste.backend.transports.base import BaseTransport, batch_create_body, batch_operation
from feste.backend.types import Request, Response
from feste.errors import BackendError, BadRequestError

__all__ = ["HTTPTransport"]


class HTTPTransport(BaseTransport):
    """aiohttp: one session per backend per loop, auth added at send time."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self._base_url = backend.base_url
        self._connect_timeout = backend.timeout
        self._static_headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            **backend.request_headers(),
        }
        self._session: aiohttp.ClientSession | None = None
        # The headers for the last key seen, rebuilt only when the key changes.
        self._key_seen: str | None = None
        self._headers: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<HTTPTransport {self.provider} {self._base_url}>"

    @property
    def ready(self) -> bool:
        return self._pool is not None

    async def prepare(self) -> None:
        if self._pool is not None:
            return
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        # The request deadline is applied by feste._calls around send(); aiohttp only
        # bounds the connect phase, so a dead host fails fast.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout)
        session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        self._session = session
        await self._hold_pool(session.close)

    def _request_headers(self, backend: Backend, request: Request) -> dict[str, str]:
        key = self._api_key(backend, request)
        if key != self._key_seen:
            self._headers = {**self._static_headers, "Authorization": f"Bearer {key}"}
            self._key_seen = key
        return self._headers

    async def send(self, request: Request) -> Response:
        failure: BackendError | None = None
        try:
            data = CODEC.encode(request.payload)
        except (TypeError, ValueError) as exc:
            failure = BadRequestError(
                f"the request body cannot be encoded as JSON: {self.backend.scrub(str(exc))}",
                backend=request.provider,
                method=request.method,
                model=request.model,
            )
        if failure is not None:
            raise failure
        status, content, headers = await self._exchange(request, "POST", data)
        return Response(status, decode_body(self.backend, request, content), headers)

    async def _exchange(
        self, request: Request, http_method: str, data: Any = None, *, multipart: bool = False
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """One HTTP exchange at ``request.path``: a 2xx answer's status, raw body and
        headers, or the mapped error."""
        if self._pool is None:
            await self.prepare()
        session = self._session
        assert session is not None
        backend = self.backend
        headers = self._request_headers(backend, request)
        if multipart:
            # aiohttp writes the multipart Content-Type with its boundary.
            headers = {name: value for name, value in headers.items() if name != "Content-Type"}
        failure: BackendError | None = None
        try:
            async with session.request(
                http_method, self._base_url + request.path, data=data, headers=headers
            ) as answer:
                content = await answer.read()
                status = answer.status
                answer_headers = answer.headers
        except aiohttp.InvalidURL as exc:
            failure = invalid_url_error(backend, request, exc)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            failure = connection_error(backend, request, exc)
        except Exception as exc:
            failure = unexpected_error(backend, request, "aiohttp", exc)
        if failure is not None:
            # Raised outside the handler: the client's exception must not ride along as
            # __context__ (it may hold the request and its Authorization header).
            raise failure
        if 200 <= status < 300:
            return status, content, answer_headers
        raise status_error(backend, request, status, answer_headers, content)

    # -- provider Batch APIs ----------------------------------------------------------

    supports_batches = True

    async def _json_exchange(
        self, request: Request, http_method: str, data: Any = None, *, multipart: bool = False
    ) -> Mapping[str, Any]:
        _, content, _ = await self._exchange(request, http_method, data, multipart=multipart)
        body = decode_body(self.backend, request, content)
        if not isinstance(body, Mapping):
            raise self.backend.malformed(request, f"expected a JSON object, got {body!r:.200}")
        return body

    async def upload_file(self, filename: str, content: bytes) -> Mapping[str, Any]:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", content, filename=filename, content_type="application/jsonl")
        request = batch_operation(self.provider, "files.create", "/files")
        return await self._json_exchange(request, "POST", form, multipart=True)

    async def create_batch(
        self, input_file_id: str, endpoint: str, metadata: Mapping[str, str] | None = None
    ) -> Mapping[str, Any]:
        payload = batch_create_body(input_file_id, endpoint, metadata)
        request = batch_operation(self.provider, "batches.create", "/batches", payload)
        return await self._json_exchange(request, "POST", CODEC.encode(payload))

    async def get_batch(self, batch_id: str) -> Mapping[str, Any]:
        request = batch_operation(self.provider, "batches.retrieve", f"/batches/{batch_id}")
        return await self._json_exchange(request, "GET")

    async def cancel_batch(self, batch_id: str) -> Mapping[str, Any]:
        request = batch_operation(self.provider, "batches.cancel", f"/batches/{batch_id}/cancel")
        return await self._json_exchange(request, "POST")

    async def download_file(self, file_id: str) -> bytes:
        request = batch_operation(self.provider, "files.content", f"/files/{file_id}/content")
        _, content, _ = await self._exchange(request, "GET")
        return content

    async def aclose(self) -> None:
        self._session = None
        await super().aclose()
