"""The ``sdk`` transport's adapter for the official ``cohere`` package (API v2).

``cohere`` and ``httpx`` are imported when the first client is built or the first
exception mapped, not with feste. Calls go through ``client.with_raw_response.<name>``
with ``request_options={"max_retries": 0}``; the result's ``response`` is the raw
``httpx`` answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from types import ModuleType
from typing import Any

from feste.backend.base import Backend
from feste.backend.transports._errors import httpx_error, not_json_error, status_error
from feste.backend.transports.base import Closer, SDKAdapter, key_reader
from feste.backend.types import Request
from feste.errors import BackendError

__all__ = ["CohereAdapter"]

# httpx's default pool holds 100 connections; the scheduler limits concurrency.
_KEEPALIVE_CONNECTIONS = 256


def _cohere() -> ModuleType:
    import cohere  # heavy: imported on first use only

    return cohere


def _api_error_type() -> type[Exception]:
    from cohere.core.api_error import ApiError

    return ApiError


class CohereAdapter(SDKAdapter):
    """``cohere.AsyncClientV2`` over an ``httpx.AsyncClient`` that feste owns and closes."""

    package = "cohere"

    def build_client(self, backend: Backend) -> tuple[Any, Closer]:
        import httpx  # cohere's HTTP library

        cohere = _cohere()
        http_client = httpx.AsyncClient(
            timeout=backend.timeout,
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=_KEEPALIVE_CONNECTIONS
            ),
            follow_redirects=True,
        )
        client = cohere.AsyncClientV2(
            api_key=key_reader(backend),  # called for every request: the key is read then
            base_url=backend.base_url,
            timeout=backend.timeout,
            max_retries=0,
            httpx_client=http_client,
            log_warning_experimental_features=False,
        )
        return client, http_client.aclose

    def configured_client(self, client: Any) -> Any:
        return client  # its retries are switched off per request, in call()

    def raw_method(self, client: Any, sdk_method: str) -> Callable[..., Awaitable[Any]]:
        method: Callable[..., Awaitable[Any]] = getattr(client.with_raw_response, sdk_method)
        return method

    async def call(
        self, method: Callable[..., Awaitable[Any]], payload: Mapping[str, Any]
    ) -> tuple[int, bytes, Mapping[str, str]]:
        raw = await method(**payload, request_options={"max_retries": 0})
        answer = raw.response
        return answer.status_code, answer.content, answer.headers

    def map_exception(
        self, backend: Backend, request: Request, exc: Exception, *, client_key: bool
    ) -> BackendError | None:
        if isinstance(exc, _api_error_type()):
            status = getattr(exc, "status_code", None) or 0
            body = getattr(exc, "body", None)
            if 200 <= status < 300:
                # cohere could not decode a 2xx body; it hands over the text.
                content = body if isinstance(body, bytes) else str(body).encode()
                return not_json_error(backend, request, content)
            headers = getattr(exc, "headers", None)
            return status_error(backend, request, status, headers, body, client_key=client_key)
        return httpx_error(backend, request, exc)
