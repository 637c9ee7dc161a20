"""Transports: how a :class:`~feste.backend.types.Request` reaches a provider and back.

Design
------
A transport sends the requests of one backend on one event loop
(:func:`feste._calls.transport_for` asks :func:`make_transport` for one per backend and
loop). Its contract is :class:`~feste.backend.base.BaseTransport`: ``send(request)``
returns a 2xx :class:`~feste.backend.types.Response` holding the decoded JSON body, or
raises a :mod:`feste.errors` error. There are two:

* :class:`HTTPTransport` (``transport="http"``, the default) is lean aiohttp: one
  ``ClientSession`` per backend per loop over an unlimited keep-alive connection pool
  (the scheduler limits concurrency, not the pool), bodies encoded and decoded by the
  stdlib ``json``, the ``Authorization`` header built from ``backend.api_key()`` at
  send time, so a key from the environment is read where the call runs.
* :class:`SDKTransport` (``transport="sdk"``, or any ``client=``) goes through the
  official async clients (``openai.AsyncOpenAI``, ``cohere.AsyncClientV2``) with their
  own retries switched off, feste's being the only retry policy. It calls the typed
  methods through their raw-response variants (``client.chat.completions
  .with_raw_response.create(...)``, ``client.with_raw_response.embed(...)``) and
  decodes the raw HTTP body itself, so both transports hand the backend the same JSON
  and ``parse_response`` is shared. The client packages are imported here, on first
  use, never when feste is imported.

Errors are mapped at one boundary per transport (``HTTPTransport.send`` and
``SDKTransport._error``) onto one status table (:func:`status_error`), so both
transports raise the same exception types with the same messages: 400/404/409/413/422
and other 4xx -> ``BadRequestError`` (with ``item_index`` when the provider blames
``input[i]``), 401/403 -> ``AuthenticationError``, 429 -> ``RateLimitError`` (with
``retry_after``), 408 and 5xx -> ``TransientError``, connection failures and timeouts ->
``TransientError``, a 2xx body that is not JSON -> ``MalformedResponseError``. Messages
pass through ``backend.scrub`` so no key is ever echoed.

Lifetime: every transport registers under its loop; a closer registered with
:func:`feste._loop.on_loop_close` closes them all before feste closes one of its own
loops. Code that runs backend calls on a loop it owns should
``await feste._loop.close_loop_resources(loop)`` before closing that loop.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from feste._loop import on_loop_close
from feste.backend.base import Backend
from feste.backend.types import Request, Response
from feste.errors import (
    AuthenticationError,
    BackendError,
    BadRequestError,
    ConfigurationError,
    MalformedResponseError,
    RateLimitError,
    TransientError,
)

__all__ = [
    "BaseTransport",
    "HTTPTransport",
    "SDKTransport",
    "make_transport",
    "provider_message",
    "retry_after_seconds",
    "status_error",
]

# One encoder for every request: json.dumps with options builds a new encoder per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

# Where a provider's message blames one input of a batch: "input[3]", "texts[0]"...
_ITEM_PATTERN = re.compile(r"\b(?:input|inputs|texts|prompt|documents)\[(\d+)\]")

_MAX_MESSAGE = 1000


class BaseTransport:
    """Sends requests for one backend on one event loop.

    ``send`` returns a 2xx :class:`Response` or raises a :mod:`feste.errors` error
    (mapped from HTTP statuses and from the client library's exceptions).
    """

    async def send(self, request: Request) -> Response:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release connections. Called before the event loop that used it closes."""


def make_transport(backend: Backend) -> BaseTransport:
    """A new transport of the kind ``backend.transport`` names, for the running loop.

    ``backend.transport`` is ``"http"``, ``"sdk"``, or a callable (a
    :class:`BaseTransport` subclass) that makes one from the backend.
    """
    if callable(backend.transport):
        transport: BaseTransport = backend.transport(backend)
        return transport
    if backend.transport == "sdk":
        return SDKTransport(backend)
    return HTTPTransport(backend)


# -- transports per loop, closed with the loop ---------------------------------------

_registry_lock = threading.Lock()
_open_transports: dict[asyncio.AbstractEventLoop, list[BaseTransport]] = {}


def _track(loop: asyncio.AbstractEventLoop, transport: BaseTransport) -> None:
    with _registry_lock:
        _open_transports.setdefault(loop, []).append(transport)


def _untrack(loop: asyncio.AbstractEventLoop | None, transport: BaseTransport) -> None:
    if loop is None:
        return
    with _registry_lock:
        transports = _open_transports.get(loop)
        if transports is not None and transport in transports:
            transports.remove(transport)
            if not transports:
                del _open_transports[loop]


async def _close_loop_transports(loop: asyncio.AbstractEventLoop) -> None:
    with _registry_lock:
        transports = _open_transports.pop(loop, [])
    for transport in transports:
        await transport.aclose()


on_loop_close(_close_loop_transports)


def _forget(backend: Backend, loop: asyncio.AbstractEventLoop | None, transport: Any) -> None:
    """Drop ``transport`` from the backend's per-loop table (a closed one is not reused)."""
    if loop is not None and backend._transports.get(loop) is transport:
        del backend._transports[loop]


# -- the shared status table ---------------------------------------------------------


def _shorten(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def provider_message(body: Any) -> str:
    """The human message of an error body (OpenAI ``{"error": {"message"}}``, Cohere
    ``{"message"}``), from raw bytes, text or decoded JSON."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body)
        except ValueError:
            return _shorten(bytes(body).decode("utf-8", "replace")) or "(empty body)"
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return _shorten(body) or "(empty body)"
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return _shorten(error["message"])
        if isinstance(error, str):
            return _shorten(error)
        if isinstance(body.get("message"), str):
            return _shorten(body["message"])
        return _shorten(json.dumps(body, default=str))
    if body is None:
        return "(empty body)"
    return _shorten(str(body))


def _header(headers: Mapping[str, Any] | None, name: str) -> str | None:
    """A header value, case-insensitively (plain dicts from some clients included)."""
    if not headers:
        return None
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                value = candidate
                break
    return None if value is None else str(value)


def retry_after_seconds(headers: Mapping[str, Any] | None) -> float | None:
    """The server's wait hint: ``retry-after-ms``, else ``Retry-After`` in seconds or as
    an HTTP date; None when absent or unreadable."""
    milliseconds = _header(headers, "retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000.0)
        except ValueError:
            pass
    value = _header(headers, "retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _item_index(message: str) -> int | None:
    match = _ITEM_PATTERN.search(message)
    return int(match.group(1)) if match else None


def status_error(
    backend: Backend,
    request: Request,
    status: int,
    headers: Mapping[str, Any] | None,
    body: Any,
    *,
    client_key: bool = False,
) -> BackendError:
    """The feste error for a non-2xx answer (``body``: raw bytes, text or decoded JSON)."""
    message = backend.scrub(provider_message(body))
    context: dict[str, Any] = {
        "backend": request.provider,
        "method": request.method,
        "model": request.model,
        "status": status,
    }
    text = f"HTTP {status}: {message}"
    if status in (401, 403, 498):
        where = (
            "the key of the configured client"
            if client_key
            else f"api_key= or the {backend.api_key_env} environment variable"
        )
        return AuthenticationError(f"{text} (check {where})", **context)
    if status == 429:
        return RateLimitError(text, retry_after=retry_after_seconds(headers), **context)
    if status in (408, 499) or status >= 500:
        return TransientError(text, **context)
    if 400 <= status < 500:
        return BadRequestError(text, item_index=_item_index(message), **context)
    return MalformedResponseError(f"unexpected HTTP status {status}: {message}", **context)


def decode_body(backend: Backend, request: Request, content: bytes) -> Any:
    """The JSON of a 2xx answer, or MalformedResponseError."""
    try:
        return json.loads(content)
    except ValueError:
        raise _not_json(backend, request, content) from None


def _not_json(backend: Backend, request: Request, content: bytes) -> BackendError:
    snippet = backend.scrub(content[:200].decode("utf-8", "replace"))
    return backend.malformed(request, f"the body is not JSON: {snippet!r}")


def _connection_error(backend: Backend, request: Request, exc: BaseException) -> BackendError:
    if isinstance(exc, TimeoutError):
        message = f"timed out talking to {backend.base_url} ({type(exc).__name__})"
    else:
        detail = backend.scrub(f"{type(exc).__name__}: {exc}")
        message = f"connection to {backend.base_url} failed: {detail}"
    return TransientError(
        message, backend=request.provider, method=request.method, model=request.model
    )


# -- HTTP ----------------------------------------------------------------------------


class HTTPTransport(BaseTransport):
    """aiohttp: one session per backend per loop, auth added at send time."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._base_url = backend.base_url
        self._static_headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            **backend.request_headers(),
        }
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The headers for the last key seen, rebuilt only when the key changes.
        self._key_seen: str | None = None
        self._headers: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<HTTPTransport {self.backend.provider} {self._base_url}>"

    def _open(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        # The request deadline is applied by feste._calls around send(); aiohttp only
        # bounds the connect phase, so a dead host fails fast.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.backend.timeout)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        self._loop = loop
        _track(loop, self)
        return self._session

    def _request_headers(self) -> dict[str, str]:
        key = self.backend.api_key()
        if key != self._key_seen:
            self._headers = {**self._static_headers, "Authorization": f"Bearer {key}"}
            self._key_seen = key
        return self._headers

    async def send(self, request: Request) -> Response:
        headers = self._request_headers()
        session = self._session or self._open()
        data = _ENCODER.encode(request.payload).encode()
        failure: BackendError | None = None
        try:
            async with session.post(
                self._base_url + request.path, data=data, headers=headers
            ) as answer:
                content = await answer.read()
                status = answer.status
                answer_headers = answer.headers
        except aiohttp.InvalidURL as exc:
            failure = ConfigurationError(
                f"invalid URL {self.backend.scrub(str(exc))!r}: check base_url",
                backend=request.provider,
                method=request.method,
                model=request.model,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = _connection_error(self.backend, request, exc)
        if failure is not None:
            # Raised outside the handler: the client's exception must not ride along as
            # __context__ (it may hold the request and its Authorization header).
            raise failure
        if 200 <= status < 300:
            return Response(status, decode_body(self.backend, request, content), answer_headers)
        raise status_error(self.backend, request, status, answer_headers, content)

    async def aclose(self) -> None:
        session, loop = self._session, self._loop
        self._session = None
        _untrack(loop, self)
        _forget(self.backend, loop, self)
        if session is not None and not session.closed:
            await session.close()


# -- official clients ----------------------------------------------------------------


class SDKTransport(BaseTransport):
    """The official async client of ``backend.sdk_package``, retries off, raw JSON out.

    With ``client=`` the user's client is used: its key, base URL and HTTP settings
    apply, and its retries are switched off per request (``with_options(max_retries=0)``
    for openai, ``request_options={"max_retries": 0}`` for cohere). It must be the
    async client; it is used on the event loop where it first sends and is not closed
    by feste.
    """

    def __init__(self, backend: Backend) -> None:
        if backend.sdk_package not in ("openai", "cohere"):
            raise ConfigurationError(
                f"{type(backend).__name__} has no official client for transport='sdk'; "
                "use transport='http'",
                backend=backend.provider,
            )
        if backend._client is None and getattr(backend, "_client_was_set", False):
            raise ConfigurationError(
                f"the client= given to {type(backend).__name__} does not travel to other "
                "processes (official clients hold sockets and locks); build the backend "
                "without client= (transport='sdk' makes feste build one from the backend's "
                "settings where the call runs)",
                backend=backend.provider,
            )
        self.backend = backend
        self.package = backend.sdk_package
        self._owns_client = backend._client is None
        self._client: Any = None
        self._closers: list[Callable[[], Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._methods: dict[str, Callable[..., Any]] = {}

    def __repr__(self) -> str:
        return f"<SDKTransport {self.package} {self.backend.base_url}>"

    # -- building the client --------------------------------------------------------

    def _build(self) -> Any:
        client = self._openai_client() if self.package == "openai" else self._cohere_client()
        self._loop = asyncio.get_running_loop()
        _track(self._loop, self)
        return client

    def _openai_client(self) -> Any:
        import openai

        if not self._owns_client:
            # A copy sharing the user's connection pool, with the SDK's retries off.
            return self.backend._client.with_options(max_retries=0)
        backend = self.backend

        async def current_key() -> str:
            return backend.api_key()

        client = openai.AsyncOpenAI(
            api_key=current_key,
            base_url=backend.base_url,
            organization=getattr(backend, "organization", None),
            timeout=backend.timeout,
            max_retries=0,
        )
        self._closers.append(client.close)
        return client

    def _cohere_client(self) -> Any:
        import cohere
        import httpx

        if not self._owns_client:
            return self.backend._client
        backend = self.backend
        # httpx's default pool holds 100 connections; the scheduler limits concurrency.
        http_client = httpx.AsyncClient(
            timeout=backend.timeout,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            follow_redirects=True,
        )
        self._closers.append(http_client.aclose)
        return cohere.AsyncClientV2(
            api_key=backend.api_key,  # called for every request: the key is read then
            base_url=backend.base_url,
            timeout=backend.timeout,
            max_retries=0,
            httpx_client=http_client,
            log_warning_experimental_features=False,
        )

    def _method(self, sdk_method: str) -> Callable[..., Any]:
        method = self._methods.get(sdk_method)
        if method is None:
            if self.package == "openai":
                # "chat.completions.create" -> client.chat.completions.with_raw_response.create
                *path, name = sdk_method.split(".")
                target = self._client
                for part in path:
                    target = getattr(target, part)
                method = getattr(target.with_raw_response, name)
            else:
                method = getattr(self._client.with_raw_response, sdk_method)
            self._methods[sdk_method] = method
        return method

    # -- sending --------------------------------------------------------------------

    async def send(self, request: Request) -> Response:
        if self._owns_client:
            self.backend.api_key()  # a missing key is a ConfigurationError, not an SDK one
        try:
            if self._client is None:
                self._client = self._build()
            method = self._method(request.sdk_method)
            if self.package == "openai":
                raw = await method(**request.payload)
                http = raw.http_response
            else:
                raw = await method(**request.payload, request_options={"max_retries": 0})
                http = raw.response
            status, content, headers = http.status_code, http.content, http.headers
        except BackendError:
            raise
        except Exception as exc:
            failure = self._error(request, exc)
            if failure is None:
                raise
        else:
            failure = None
        if failure is not None:
            # Raised outside the handler: the SDK's exception holds the HTTP request,
            # Authorization header included, and must not ride along as __context__.
            raise failure
        if not 200 <= status < 300:
            raise status_error(self.backend, request, status, headers, content)
        return Response(status, decode_body(self.backend, request, content), headers)

    def _error(self, request: Request, exc: Exception) -> BackendError | None:
        """The boundary: an openai/cohere/httpx exception as a feste error (None: a bug)."""
        backend = self.backend
        client_key = not self._owns_client
        if self.package == "openai":
            import openai

            if isinstance(exc, openai.APIStatusError):
                response = exc.response
                return status_error(
                    backend,
                    request,
                    exc.status_code,
                    response.headers,
                    response.content,
                    client_key=client_key,
                )
            if isinstance(exc, openai.APITimeoutError):
                return _connection_error(backend, request, TimeoutError(str(exc)))
            if isinstance(exc, openai.APIConnectionError):
                return _connection_error(backend, request, exc.__cause__ or exc)
            return None
        import httpx
        from cohere.core.api_error import ApiError

        if isinstance(exc, ApiError):
            status = exc.status_code or 0
            if 200 <= status < 300:
                # cohere could not decode a 2xx body; it hands over the text.
                body = exc.body
                content = body if isinstance(body, bytes) else str(body).encode()
                return _not_json(backend, request, content)
            return status_error(
                backend, request, status, exc.headers, exc.body, client_key=client_key
            )
        if isinstance(exc, httpx.TimeoutException):
            return _connection_error(backend, request, TimeoutError(str(exc)))
        if isinstance(exc, httpx.InvalidURL):
            return ConfigurationError(
                f"invalid URL: {backend.scrub(str(exc))}; check base_url",
                backend=request.provider,
                method=request.method,
                model=request.model,
            )
        if isinstance(exc, httpx.TransportError):
            return _connection_error(backend, request, exc)
        return None

    async def aclose(self) -> None:
        closers, loop = self._closers, self._loop
        self._closers = []
        self._client = None
        self._methods = {}
        _untrack(loop, self)
        _forget(self.backend, loop, self)
        for close in closers:
            await close()
