"""The boundary where HTTP answers and client exceptions become :mod:`feste.errors`.

Design
------
One status table (:func:`status_error`) serves both transports, so they raise the same
types with the same messages: 400/404/409/413/422 and other 4xx -> ``BadRequestError``
(with ``item_index`` when the provider blames ``input[i]``), 401/403 ->
``AuthenticationError``, 429 -> ``RateLimitError`` (with ``retry_after``), 408 and 5xx
-> ``TransientError``. The other helpers map what happens around a status:
connection failures and timeouts -> ``TransientError``; a URL or header the client
refuses to send, and a server certificate that cannot be verified ->
``ConfigurationError`` (never retried: sending again cannot help);
a 2xx body that is not JSON, or nested too deeply to decode -> ``MalformedResponseError``;
:func:`httpx_error` maps the exceptions of ``httpx``, which both official clients use,
the way httpx's own ``map_httpcore_exceptions`` maps httpcore's; and
:func:`unexpected_error` wraps anything else a client library raises, so every
exception leaving a transport is a :class:`~feste.errors.BackendError` naming the
backend and method.

Messages built from provider answers or exception texts pass through
``backend.scrub``; transports raise these errors outside the ``except`` block that
caught the client's exception, so the original (which may hold the request and its
``Authorization`` header) never rides along as ``__context__``.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping
from typing import Any

from feste.backend.base import Backend
from feste.backend.transports._json import CODEC
from feste.backend.types import Request
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
    "connection_error",
    "decode_body",
    "httpx_error",
    "invalid_url_error",
    "not_json_error",
    "provider_message",
    "refused_locally",
    "retry_after_seconds",
    "status_error",
    "tls_verification_error",
    "unexpected_error",
]

# Where a provider's message blames one input of a batch: "input[3]", "texts[0]"...
_ITEM_PATTERN = re.compile(r"\b(?:input|inputs|texts|prompt|documents)\[(\d+)\]")

_MAX_MESSAGE = 1000


def _context(request: Request) -> dict[str, Any]:
    return {"backend": request.provider, "method": request.method, "model": request.model}


def _shorten(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def provider_message(body: Any) -> str:
    """The human message of an error body (OpenAI ``{"error": {"message"}}``, Cohere
    ``{"message"}``), from raw bytes, text or decoded JSON."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):
            return _shorten(bytes(body).decode("utf-8", "replace")) or "(empty body)"
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):
            return _shorten(body) or "(empty body)"
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return _shorten(error["message"])
        if isinstance(error, str):
            return _shorten(error)
        if isinstance(body.get("message"), str):
            return _shorten(body["message"])
        try:
            return _shorten(json.dumps(body, default=str))
        except (ValueError, RecursionError):
            return "(unreadable body)"
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
    context = {**_context(request), "status": status}
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
        return CODEC.decode(content)
    except ValueError:
        failure = not_json_error(backend, request, content)
    except RecursionError:
        failure = _too_deep(backend, request)
    # Outside the handler: the decoder's exception holds the whole body.
    raise failure


def not_json_error(backend: Backend, request: Request, content: bytes) -> BackendError:
    """A 2xx answer whose body is not JSON."""
    snippet = backend.scrub(content[:200].decode("utf-8", "replace"))
    return backend.malformed(request, f"the body is not JSON: {snippet!r}")


def _too_deep(backend: Backend, request: Request) -> BackendError:
    return backend.malformed(request, "the JSON body is nested too deeply to decode")


def connection_error(backend: Backend, request: Request, exc: BaseException) -> BackendError:
    """A failed connection or a client-side timeout: worth trying again."""
    if isinstance(exc, TimeoutError):
        message = f"timed out talking to {backend.base_url} ({type(exc).__name__})"
    else:
        detail = backend.scrub(f"{type(exc).__name__}: {exc}")
        message = f"connection to {backend.base_url} failed: {detail}"
    return TransientError(message, **_context(request))


def tls_verification_error(backend: Backend, request: Request, exc: BaseException) -> BackendError:
    """The server's TLS certificate could not be verified: trying again cannot help."""
    reason = getattr(exc, "verify_message", None) or str(exc)
    return ConfigurationError(
        f"the TLS certificate of {backend.base_url} could not be verified "
        f"({backend.scrub(str(reason))}); check base_url, or the certificates this "
        "machine trusts (the SSL_CERT_FILE environment variable names a bundle)",
        **_context(request),
    )


def invalid_url_error(backend: Backend, request: Request, exc: BaseException) -> BackendError:
    """A URL the client refuses: a configuration problem, never retried."""
    detail = backend.scrub(str(exc))
    return ConfigurationError(
        f"invalid URL ({detail}); check base_url={backend.base_url!r}", **_context(request)
    )


def refused_locally(backend: Backend, request: Request, exc: BaseException) -> BackendError:
    """The client would not put the request on the wire (an illegal header value).

    The exception's text is not quoted: it holds the header value, which may be a key
    that ``scrub`` does not know (one inside a configured client).
    """
    return ConfigurationError(
        f"the request could not be sent ({type(exc).__name__}: the client refused a "
        "header value); check the API key and the headers this backend sends",
        **_context(request),
    )


def httpx_error(backend: Backend, request: Request, exc: BaseException) -> BackendError | None:
    """An ``httpx`` exception as a feste error; None for anything else."""
    import httpx  # the official clients' HTTP library, imported with them, not with feste

    if isinstance(exc, httpx.TimeoutException):
        return connection_error(backend, request, TimeoutError(str(exc)))
    if isinstance(exc, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
        return invalid_url_error(backend, request, exc)
    if isinstance(exc, httpx.LocalProtocolError):
        return refused_locally(backend, request, exc)
    if isinstance(exc, httpx.TransportError):
        return connection_error(backend, request, exc)
    return None


def unexpected_error(
    backend: Backend, request: Request, library: str, exc: BaseException
) -> BackendError:
    """Whatever else ``library`` raised, as a feste error that keeps no secret.

    Text that cannot be encoded for HTTP (a non-ASCII header value) is a configuration
    problem; its exception is not quoted, as it holds the whole header value.
    """
    if isinstance(exc, RecursionError):
        return _too_deep(backend, request)
    if isinstance(exc, UnicodeError):
        return ConfigurationError(
            f"{library} could not encode the request ({type(exc).__name__}): a header "
            "value such as the API key, or the URL, has characters HTTP cannot carry",
            **_context(request),
        )
    detail = backend.scrub(f"{type(exc).__name__}: {exc}")
    return BackendError(f"{library} failed unexpectedly: {detail}", **_context(request))
