"""The transport contract, and the lifetime of the connection pools transports open.

Design
------
A :class:`BaseTransport` sends the requests of one backend on one event loop:
``await prepare()`` gets it ready (opens the connection pool, builds the official
client) and is awaited by the sender before a request's deadline starts, so a short
timeout covers the request only; ``await send(request)`` returns a 2xx
:class:`~feste.backend.types.Response` or raises a :mod:`feste.errors` error;
``await aclose()`` releases the pool.

Provider Batch APIs (OpenAI's Files and Batch endpoints) are optional operations of a
transport: :meth:`BaseTransport.upload_file`, :meth:`~BaseTransport.create_batch`,
:meth:`~BaseTransport.get_batch`, :meth:`~BaseTransport.cancel_batch` and
:meth:`~BaseTransport.download_file`, used by :mod:`feste._batch_jobs`. A transport
that lacks them (``supports_batches`` False) raises a ``ConfigurationError`` naming the
provider and the fix. Each builds its own small :class:`~feste.backend.types.Request`
(:func:`batch_operation`) so its errors name the operation like any other request's.

A transport refers to its backend weakly, and the backend's table of transports is the
only strong reference to a transport, so a backend that is dropped takes its
transports with it, at once, without waiting for the cycle collector. A pool outlives
neither:

* the transport: when it is garbage-collected, its pool's close is started on the
  pool's loop (:func:`feste._loop.schedule_close`);
* the loop: every open pool is registered under its loop, and the loop's resources are
  closed when the loop shuts down (:mod:`feste._loop` explains when);
* ``aclose()``, which ``Backend.close()`` / ``await Backend.aclose()`` reach.

:class:`SDKAdapter` is the base of the per-provider adapters of the ``sdk`` transport
(one for ``openai``, one for ``cohere``): how to build and call that provider's official
client, and how its exceptions map onto feste's.
"""

from __future__ import annotations

import abc
import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

from feste._loop import on_loop_close, schedule_close, watch_loop_shutdown
from feste.backend.base import Backend
from feste.backend.types import Request, Response
from feste.errors import BackendError, ConfigurationError

__all__ = [
    "BaseTransport",
    "Closer",
    "SDKAdapter",
    "batch_create_body",
    "batch_operation",
    "key_reader",
]

#: A coroutine function that releases a pool (``session.close``, ``client.aclose``).
Closer = Callable[[], Awaitable[Any]]


class _Pool:
    """The connections one transport opened on one loop, and how to release them."""

    __slots__ = ("__weakref__", "_close", "loop", "owner")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, close: Closer, owner: BaseTransport
    ) -> None:
        self.loop = loop
        self._close: Closer | None = close
        # Weak: the pool must not keep its transport (nor so its backend) alive.
        self.owner = weakref.ref(owner)

    async def aclose(self) -> None:
        close, self._close = self._close, None
        _forget_pool(self)
        if close is not None:
            await close()

    def discard(self) -> None:
        """The transport was dropped: close the pool on its loop, from any thread."""
        if self._close is not None:
            schedule_close(self.loop, self.aclose)


_pools_lock = threading.Lock()
_open_pools: dict[asyncio.AbstractEventLoop, set[_Pool]] = {}


def _remember_pool(pool: _Pool) -> None:
    with _pools_lock:
        _open_pools.setdefault(pool.loop, set()).add(pool)


def _forget_pool(pool: _Pool) -> None:
    with _pools_lock:
        pools = _open_pools.get(pool.loop)
        if pools is not None:
            pools.discard(pool)
            if not pools:
                del _open_pools[pool.loop]


async def _close_pools_of(loop: asyncio.AbstractEventLoop) -> None:
    with _pools_lock:
        pools = _open_pools.pop(loop, set())
    for pool in pools:
        owner = pool.owner()
        if owner is not None:
            await owner.aclose()  # also drops it from its backend's table
        else:
            await pool.aclose()


on_loop_close(_close_pools_of)


def key_reader(backend: Backend) -> Callable[[], str]:
    """``backend.api_key`` as a function that does not keep the backend alive.

    Official clients built by a transport call it for every request (so a key from the
    environment is read where the call runs); a bound method would tie the backend, its
    transport and the client into a cycle only the cycle collector could free.
    """
    backend_ref = weakref.ref(backend)

    def read_key() -> str:
        owner = backend_ref()
        if owner is None:
            raise ConfigurationError("the backend of this client no longer exists")
        return owner.api_key()

    return read_key


def batch_operation(
    provider: str, operation: str, path: str, payload: Mapping[str, Any] | None = None
) -> Request:
    """The request of one Files/Batch API operation (``"batches.create"``, at ``path``
    relative to the base URL): ``operation`` is also its official client method."""
    return Request(
        provider=provider, method=operation, path=path, payload=payload or {}, sdk_method=operation
    )


def batch_create_body(
    input_file_id: str, endpoint: str, metadata: Mapping[str, str] | None
) -> dict[str, Any]:
    """The body of ``POST /batches``: a job over an uploaded file, within 24 hours."""
    body: dict[str, Any] = {
        "input_file_id": input_file_id,
        "endpoint": endpoint,
        "completion_window": "24h",
    }
    if metadata:
        body["metadata"] = dict(metadata)
    return body


class BaseTransport(abc.ABC):
    """Sends the requests of one backend on one event loop.

    Subclasses implement :meth:`send` and, when they hold connections, open them in
    :meth:`prepare` and hand their closer to :meth:`_hold_pool`.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend_ref = weakref.ref(backend)
        self.provider = backend.provider
        #: The loop this transport's pool lives on (None until it opens one).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pool: _Pool | None = None

    @property
    def backend(self) -> Backend:
        backend = self._backend_ref()
        if backend is None:
            raise ConfigurationError(
                f"the {self.provider} backend of this transport no longer exists",
                backend=self.provider,
            )
        return backend

    @property
    def ready(self) -> bool:
        """True when :meth:`prepare` has nothing left to do (the sender then skips it)."""
        return False

    async def prepare(self) -> None:  # noqa: B027 (a transport without a pool needs nothing)
        """Get ready to send on the running loop; idempotent and cheap once done.

        The sender awaits it before a request's deadline starts: work that is slow the
        first time (opening a pool, building an official client) belongs here.
        """

    @abc.abstractmethod
    async def send(self, request: Request) -> Response:
        """A 2xx response to ``request``, or a :mod:`feste.errors` error."""

    # -- provider Batch APIs (optional) ------------------------------------------------

    #: Whether this transport speaks OpenAI's Files and Batch APIs for its backend.
    supports_batches: ClassVar[bool] = False

    def _no_batches(self) -> ConfigurationError:
        return ConfigurationError(
            f"{type(self).__name__} cannot send {self.provider} calls through a Batch API "
            "(feste sends Batch API jobs to OpenAI-compatible servers only); "
            "call with batch_api=False or leave the batch_api option off",
            backend=self.provider,
        )

    async def upload_file(self, filename: str, content: bytes) -> Mapping[str, Any]:
        """Upload ``content`` as a file of purpose ``"batch"``; the provider's file object."""
        raise self._no_batches()

    async def create_batch(
        self, input_file_id: str, endpoint: str, metadata: Mapping[str, str] | None = None
    ) -> Mapping[str, Any]:
        """Create a job for the uploaded file (``endpoint``: ``"/v1/embeddings"``...)."""
        raise self._no_batches()

    async def get_batch(self, batch_id: str) -> Mapping[str, Any]:
        """The provider's batch object (its status, counts and file ids)."""
        raise self._no_batches()

    async def cancel_batch(self, batch_id: str) -> Mapping[str, Any]:
        raise self._no_batches()

    async def download_file(self, file_id: str) -> bytes:
        """The content of a file (a job's output or error file, JSONL)."""
        raise self._no_batches()

    async def aclose(self) -> None:
        """Release the pool and leave the backend's table; a later call makes a new one."""
        pool, self._pool = self._pool, None
        backend = self._backend_ref()
        if backend is not None and backend._transports.get(self.loop) is self:
            del backend._transports[self.loop]
        if pool is not None:
            await pool.aclose()

    async def _hold_pool(self, close: Closer) -> None:
        """Record the pool just opened on the running loop; ``close()`` releases it.

        From now on it is closed by :meth:`aclose`, when this transport is dropped, or
        when the loop shuts down, whichever comes first.
        """
        loop = asyncio.get_running_loop()
        pool = _Pool(loop, close, self)
        self.loop = loop
        self._pool = pool
        _remember_pool(pool)
        finalizer = weakref.finalize(self, pool.discard)
        finalizer.atexit = False  # at exit the loops close, pools included
        await watch_loop_shutdown()

    def _api_key(self, backend: Backend, request: Request) -> str:
        """The key to send, or the backend's ConfigurationError naming this call."""
        try:
            return backend.api_key()
        except ConfigurationError as error:
            error.method = request.method
            error.model = request.model
            raise


class SDKAdapter(abc.ABC):
    """How the ``sdk`` transport drives one provider's official async client.

    The client package is imported by the adapter when a transport first needs it,
    never when feste is imported.
    """

    #: The ``sdk_package`` of the backends this adapter serves ("openai", "cohere").
    package: ClassVar[str] = ""
    #: Whether the client has ``files`` and ``batches`` (OpenAI's Batch API).
    batch_api: ClassVar[bool] = False

    @abc.abstractmethod
    def build_client(self, backend: Backend) -> tuple[Any, Closer]:
        """A new client from the backend's settings, its own retries off, and its closer."""

    @abc.abstractmethod
    def configured_client(self, client: Any) -> Any:
        """The user's ``client=`` as it should send (its retries off, its pool shared)."""

    @abc.abstractmethod
    def raw_method(self, client: Any, sdk_method: str) -> Callable[..., Awaitable[Any]]:
        """The raw-response variant of ``sdk_method`` (``"chat.completions.create"``)."""

    @abc.abstractmethod
    async def call(
        self, method: Callable[..., Awaitable[Any]], payload: Mapping[str, Any]
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """Send ``payload`` with ``method``: the answer's status, raw body and headers."""

    @abc.abstractmethod
    def map_exception(
        self, backend: Backend, request: Request, exc: Exception, *, client_key: bool
    ) -> BackendError | None:
        """The client's exception as a feste error; None when it is not the client's.

        ``client_key``: the key came with the user's client, not from feste's settings.
        """
