"""The ``sdk`` transport: a provider's official async client, its retries off.

Design
------
:class:`SDKTransport` is one generic transport; what differs per provider lives in an
:class:`~feste.backend.transports.base.SDKAdapter` (``_openai_sdk``, ``_cohere_sdk``),
chosen by the backend's ``sdk_package``. The adapter builds the client (in
:meth:`SDKTransport.prepare`, before any request's deadline: building one can take a
good fraction of a second), calls the typed methods through their raw-response
variants and hands back the raw HTTP body, which is decoded here, so both transports
give the backend the same JSON and ``parse_response`` is shared; and it maps the
client's exceptions, with the shared status table, onto :mod:`feste.errors`.

With ``client=`` the user's client is used: its key, base URL and HTTP settings apply,
its retries are switched off per request, and feste never closes it. It must be the
async client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from feste.backend.base import Backend
from feste.backend.transports._cohere_sdk import CohereAdapter
from feste.backend.transports._errors import decode_body, status_error, unexpected_error
from feste.backend.transports._openai_sdk import OpenAIAdapter
from feste.backend.transports.base import (
    BaseTransport,
    SDKAdapter,
    batch_create_body,
    batch_operation,
)
from feste.backend.types import Request, Response
from feste.errors import BackendError, ConfigurationError

__all__ = ["ADAPTERS", "SDKTransport"]

#: The adapter of each official client package, by ``Backend.sdk_package``.
ADAPTERS: Mapping[str, type[SDKAdapter]] = {
    OpenAIAdapter.package: OpenAIAdapter,
    CohereAdapter.package: CohereAdapter,
}


class SDKTransport(BaseTransport):
    """The official async client of ``backend.sdk_package``, retries off, raw JSON out."""

    def __init__(self, backend: Backend) -> None:
        adapter_type = ADAPTERS.get(backend.sdk_package)
        if adapter_type is None:
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
        super().__init__(backend)
        self.adapter = adapter_type()
        self._base_url = backend.base_url
        self._owns_client = backend._client is None
        self._client: Any = None
        self._methods: dict[str, Callable[..., Awaitable[Any]]] = {}

    def __repr__(self) -> str:
        return f"<SDKTransport {self.adapter.package} {self._base_url}>"

    async def prepare(self) -> None:
        if self._client is not None:
            return
        backend = self.backend
        if not self._owns_client:
            # The user's pool: used here, closed by its owner.
            self._client = self.adapter.configured_client(backend._client)
            self.loop = asyncio.get_running_loop()
            return
        failure: ConfigurationError | None = None
        try:
            client, close = self.adapter.build_client(backend)
        except Exception as exc:
            failure = ConfigurationError(
                f"could not build the {self.adapter.package} client: "
                f"{backend.scrub(f'{type(exc).__name__}: {exc}')}",
                backend=self.provider,
            )
        if failure is not None:
            raise failure  # outside the handler, as in send()
        self._client = client
        await self._hold_pool(close)

    def _method(self, sdk_method: str) -> Callable[..., Awaitable[Any]]:
        method = self._methods.get(sdk_method)
        if method is None:
            method = self.adapter.raw_method(self._client, sdk_method)
            self._methods[sdk_method] = method
        return method

    async def send(self, request: Request) -> Response:
        status, content, headers = await self._exchange(request, request.payload)
        return Response(status, decode_body(self.backend, request, content), headers)

    async def _exchange(
        self, request: Request, arguments: Mapping[str, Any]
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """Call ``request.sdk_method`` with ``arguments``: a 2xx answer's status, raw body
        and headers, or the mapped error."""
        if self._client is None:
            await self.prepare()
        backend = self.backend
        if self._owns_client:
            # A missing or unusable key is a ConfigurationError, not an SDK exception.
            self._api_key(backend, request)
        failure: BackendError | None = None
        try:
            method = self._method(request.sdk_method)
            status, content, headers = await self.adapter.call(method, arguments)
        except BackendError:
            raise
        except Exception as exc:
            failure = self.adapter.map_exception(
                backend, request, exc, client_key=not self._owns_client
            ) or unexpected_error(backend, request, f"the {self.adapter.package} client", exc)
        if failure is not None:
            # Raised outside the handler: the SDK's exception holds the HTTP request,
            # Authorization header included, and must not ride along as __context__.
            raise failure
        if not 200 <= status < 300:
            raise status_error(backend, request, status, headers, content)
        return status, content, headers

    # -- provider Batch APIs (client.files / client.batches) ----------------------------

    @property
    def supports_batches(self) -> bool:  # type: ignore[override]
        return self.adapter.batch_api

    async def _batch_call(self, request: Request, arguments: Mapping[str, Any]) -> Any:
        if not self.supports_batches:
            raise self._no_batches()
        _, content, _ = await self._exchange(request, arguments)
        return decode_body(self.backend, request, content)

    async def _object(self, request: Request, arguments: Mapping[str, Any]) -> Mapping[str, Any]:
        body = await self._batch_call(request, arguments)
        if not isinstance(body, Mapping):
            raise self.backend.malformed(request, f"expected a JSON object, got {body!r:.200}")
        return body

    async def upload_file(self, filename: str, content: bytes) -> Mapping[str, Any]:
        request = batch_operation(self.provider, "files.create", "/files")
        return await self._object(request, {"file": (filename, content), "purpose": "batch"})

    async def create_batch(
        self, input_file_id: str, endpoint: str, metadata: Mapping[str, str] | None = None
    ) -> Mapping[str, Any]:
        arguments = batch_create_body(input_file_id, endpoint, metadata)
        request = batch_operation(self.provider, "batches.create", "/batches", arguments)
        return await self._object(request, arguments)

    async def get_batch(self, batch_id: str) -> Mapping[str, Any]:
        request = batch_operation(self.provider, "batches.retrieve", f"/batches/{batch_id}")
        return await self._object(request, {"batch_id": batch_id})

    async def cancel_batch(self, batch_id: str) -> Mapping[str, Any]:
        request = batch_operation(self.provider, "batches.cancel", f"/batches/{batch_id}/cancel")
        return await self._object(request, {"batch_id": batch_id})

    async def download_file(self, file_id: str) -> bytes:
        if not self.supports_batches:
            raise self._no_batches()
        request = batch_operation(self.provider, "files.content", f"/files/{file_id}/content")
        _, content, _ = await self._exchange(request, {"file_id": file_id})
        return content

    async def aclose(self) -> None:
        self._client = None
        self._methods = {}
        await super().aclose()
