"""The ``sdk`` transport's adapter for the official ``openai`` package.

``openai`` is imported when the first client is built or the first exception mapped,
not with feste. Calls go through ``client.<path>.with_raw_response.<name>(...)``, whose
result holds the undecoded HTTP answer; the Batch API's operations too
(``client.files.create``, ``client.batches.create`` / ``retrieve`` / ``cancel``,
``client.files.content``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from types import ModuleType
from typing import Any

from feste.backend.base import Backend
from feste.backend.transports._errors import connection_error, httpx_error, status_error
from feste.backend.transports.base import Closer, SDKAdapter, key_reader
from feste.backend.types import Request
from feste.errors import BackendError

__all__ = ["OpenAIAdapter"]


def _openai() -> ModuleType:
    import openai  # heavy: imported on first use only

    return openai


class OpenAIAdapter(SDKAdapter):
    """``openai.AsyncOpenAI`` (and its subclasses such as ``AsyncAzureOpenAI``)."""

    package = "openai"
    batch_api = True

    def build_client(self, backend: Backend) -> tuple[Any, Closer]:
        openai = _openai()
        read_key = key_reader(backend)

        async def current_key() -> str:
            return read_key()

        client = openai.AsyncOpenAI(
            api_key=current_key,
            base_url=backend.base_url,
            organization=getattr(backend, "organization", None),
            timeout=backend.timeout,
            max_retries=0,
        )
        return client, client.close

    def configured_client(self, client: Any) -> Any:
        # A copy sharing the user's connection pool, with the SDK's retries off.
        return client.with_options(max_retries=0)

    def raw_method(self, client: Any, sdk_method: str) -> Callable[..., Awaitable[Any]]:
        # "chat.completions.create" -> client.chat.completions.with_raw_response.create
        *path, name = sdk_method.split(".")
        target = client
        for part in path:
            target = getattr(target, part)
        method: Callable[..., Awaitable[Any]] = getattr(target.with_raw_response, name)
        return method

    async def call(
        self, method: Callable[..., Awaitable[Any]], payload: Mapping[str, Any]
    ) -> tuple[int, bytes, Mapping[str, str]]:
        raw = await method(**payload)
        answer = raw.http_response
        return answer.status_code, answer.content, answer.headers

    def map_exception(
        self, backend: Backend, request: Request, exc: Exception, *, client_key: bool
    ) -> BackendError | None:
        openai = _openai()
        if isinstance(exc, openai.APIStatusError):
            answer = exc.response
            return status_error(
                backend,
                request,
                exc.status_code,
                answer.headers,
                answer.content,
                client_key=client_key,
            )
        if isinstance(exc, openai.APITimeoutError):
            return connection_error(backend, request, TimeoutError(str(exc)))
        if isinstance(exc, openai.APIConnectionError):
            # openai wraps httpx's exception; the cause says what went wrong.
            cause = exc.__cause__
            mapped = httpx_error(backend, request, cause) if cause is not None else None
            return mapped or connection_error(backend, request, cause or exc)
        return httpx_error(backend, request, exc)
