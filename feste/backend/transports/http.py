"""The ``http`` transport: feste's own lean HTTP/1.1 client, the default.

Design
------
One :class:`~._wire.ConnectionPool` per backend per loop, opened by
:meth:`HTTPTransport.prepare`: unlimited keep-alive connections to the backend's origin
(the scheduler limits concurrency, not the pool). The request head (request line and
headers, ``Authorization`` included) is built once per path and key and kept as bytes,
so sending a call is encoding its body and one write; the key comes from
``backend.api_key()`` at send time, so a key from the environment is read where the call
runs. Bodies are encoded and decoded by :data:`._json.CODEC` (``orjson`` where installed,
else the stdlib ``json``, with the same results). Every failure is mapped at the one
``except`` in :meth:`HTTPTransport._exchange` (see :mod:`._errors`).

Uploads for provider Batch APIs go through the same pool as ``multipart/form-data``
bodies built here.
"""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from feste.backend.base import Backend
from feste.backend.transports._errors import (
    connection_error,
    decode_body,
    invalid_url_error,
    refused_locally,
    status_error,
    tls_verification_error,
    unexpected_error,
)
from feste.backend.transports._json import CODEC
from feste.backend.transports._wire import ConnectionPool, WireError, encode_head
from feste.backend.transports.base import BaseTransport, batch_create_body, batch_operation
from feste.backend.types import Request, Response
from feste.errors import BackendError, BadRequestError

__all__ = ["HTTPTransport"]

_JSON = "application/json"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _segment(value: str) -> str:
    """An id from a provider's answer as one path segment (escaped: never a new path)."""
    return quote(value, safe="")


class HTTPTransport(BaseTransport):
    """feste's HTTP/1.1 client: one pool per backend per loop, auth added at send time."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self._base_url = backend.base_url
        self._connect_timeout = backend.timeout
        self._static_headers = [
            ("Accept", _JSON),
            ("Accept-Encoding", "gzip, deflate"),
            ("User-Agent", "feste"),
            *backend.request_headers().items(),
        ]
        self._connections: ConnectionPool | None = None
        # The origin and path prefix of the base URL, or why it cannot be used (the
        # scheme was checked when the backend was built; a bad host or port shows on
        # the first request, as a ConfigurationError naming base_url).
        self._url_problem: str | None = None
        try:
            parts = urlsplit(self._base_url)
            self._port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except (ValueError, KeyError) as exc:
            self._url_problem = str(exc)
        else:
            self._scheme = parts.scheme
            self._hostname = parts.hostname or ""
            self._path_prefix = parts.path.rstrip("/")
            self._host_header = parts.netloc.rpartition("@")[2]
            if not self._hostname:
                self._url_problem = "the URL has no host"
        # Request heads for the last key seen, by (HTTP method, path, content type);
        # dropped when the key changes.
        self._key_seen: str | None = None
        self._heads: dict[tuple[str, str, str], bytes] = {}

    def __repr__(self) -> str:
        return f"<HTTPTransport {self.provider} {self._base_url}>"

    @property
    def ready(self) -> bool:
        return self._pool is not None

    async def prepare(self) -> None:
        if self._pool is not None:
            return
        if self._url_problem is not None:
            return  # refused with the request, in _exchange
        connections = ConnectionPool(
            self._scheme, self._hostname, self._port, connect_timeout=self._connect_timeout
        )
        self._connections = connections
        await self._hold_pool(connections.aclose)

    def _head(
        self, backend: Backend, request: Request, http_method: str, content_type: str
    ) -> bytes:
        key = self._api_key(backend, request)
        if key != self._key_seen:
            self._heads = {}
            self._key_seen = key
        slot = (http_method, request.path, content_type)
        head = self._heads.get(slot)
        if head is None:
            headers = [*self._static_headers, ("Authorization", f"Bearer {key}")]
            if content_type:
                headers.append(("Content-Type", content_type))
            head = encode_head(
                http_method, self._path_prefix + request.path, self._host_header, headers
            )
            if len(self._heads) < 64:  # Batch API paths hold ids: keep only the common ones
                self._heads[slot] = head
        return head

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
        status, content, headers = await self._exchange(request, "POST", data, _JSON)
        return Response(status, decode_body(self.backend, request, content), headers)

    async def _exchange(
        self, request: Request, http_method: str, data: bytes | None = None, content_type: str = ""
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """One HTTP exchange at ``request.path``: a 2xx answer's status, raw body and
        headers, or the mapped error."""
        backend = self.backend
        if self._url_problem is not None:
            raise invalid_url_error(backend, request, ValueError(self._url_problem))
        if self._pool is None:
            await self.prepare()
        connections = self._connections
        assert connections is not None
        failure: BackendError | None = None
        try:
            head = self._head(backend, request, http_method, content_type)
        except BackendError:
            raise  # an unusable key, refused by the backend with its own message
        except UnicodeError as exc:
            failure = unexpected_error(backend, request, "feste's HTTP client", exc)
        except ValueError as exc:
            failure = refused_locally(backend, request, exc)
        if failure is not None:
            raise failure
        try:
            status, answer_headers, content = await connections.request(
                head, data, head_request=http_method == "HEAD"
            )
        except ssl.SSLCertVerificationError as exc:
            failure = tls_verification_error(backend, request, exc)
        except (WireError, TimeoutError, OSError) as exc:
            failure = connection_error(backend, request, exc)
        except BackendError:
            raise
        except Exception as exc:
            failure = unexpected_error(backend, request, "feste's HTTP client", exc)
        if failure is not None:
            # Raised outside the handler: the exception must not ride along as
            # __context__ (it may hold the request and its Authorization header).
            raise failure
        if 200 <= status < 300:
            return status, content, answer_headers
        raise status_error(backend, request, status, answer_headers, content)

    # -- provider Batch APIs ----------------------------------------------------------

    supports_batches = True

    async def _json_exchange(
        self, request: Request, http_method: str, data: bytes | None = None, content_type: str = ""
    ) -> Mapping[str, Any]:
        _, content, _ = await self._exchange(request, http_method, data, content_type)
        body = decode_body(self.backend, request, content)
        if not isinstance(body, Mapping):
            raise self.backend.malformed(request, f"expected a JSON object, got {body!r:.200}")
        return body

    async def upload_file(self, filename: str, content: bytes) -> Mapping[str, Any]:
        boundary = secrets.token_hex(16)
        body = multipart_body(boundary, {"purpose": b"batch"}, ("file", filename, content))
        request = batch_operation(self.provider, "files.create", "/files")
        content_type = f"multipart/form-data; boundary={boundary}"
        return await self._json_exchange(request, "POST", body, content_type)

    async def create_batch(
        self, input_file_id: str, endpoint: str, metadata: Mapping[str, str] | None = None
    ) -> Mapping[str, Any]:
        payload = batch_create_body(input_file_id, endpoint, metadata)
        request = batch_operation(self.provider, "batches.create", "/batches", payload)
        return await self._json_exchange(request, "POST", CODEC.encode(payload), _JSON)

    async def get_batch(self, batch_id: str) -> Mapping[str, Any]:
        request = batch_operation(
            self.provider, "batches.retrieve", f"/batches/{_segment(batch_id)}"
        )
        return await self._json_exchange(request, "GET")

    async def cancel_batch(self, batch_id: str) -> Mapping[str, Any]:
        request = batch_operation(
            self.provider, "batches.cancel", f"/batches/{_segment(batch_id)}/cancel"
        )
        return await self._json_exchange(request, "POST", b"")

    async def download_file(self, file_id: str) -> bytes:
        request = batch_operation(
            self.provider, "files.content", f"/files/{_segment(file_id)}/content"
        )
        _, content, _ = await self._exchange(request, "GET")
        return content

    async def aclose(self) -> None:
        self._connections = None
        await super().aclose()


def multipart_body(
    boundary: str, fields: Mapping[str, bytes], file: tuple[str, str, bytes]
) -> bytes:
    """A ``multipart/form-data`` body: plain ``fields``, then one ``(name, filename,
    content)`` file part of JSON Lines."""
    dash = f"--{boundary}".encode()
    parts: list[bytes] = []
    for name, value in fields.items():
        parts += [
            dash,
            f'\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode(),
            value,
            b"\r\n",
        ]
    name, filename, content = file
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "")
    parts += [
        dash,
        f'\r\nContent-Disposition: form-data; name="{name}"; filename="{quoted}"\r\n'.encode(),
        b"Content-Type: application/jsonl\r\n\r\n",
        content,
        b"\r\n",
        dash,
        b"--\r\n",
    ]
    return b"".join(parts)
