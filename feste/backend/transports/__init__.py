"""Transports: how a :class:`~feste.backend.types.Request` reaches a provider and back.

Design
------
Transports are the I/O layer under the sender (:mod:`feste._calls`) and above the
backend declarations (:mod:`feste.backend.base`): a backend builds requests and parses
answers, a transport only moves them. :func:`feste._calls.transport_for` asks
:func:`make_transport` for one per backend and event loop, awaits its ``prepare()``
before a request's deadline starts, then ``send``\\ s. The contract is
:class:`~feste.backend.transports.base.BaseTransport`. There are two:

* :class:`HTTPTransport` (``transport="http"``, the default, :mod:`.http`): feste's
  own lean HTTP/1.1 client (:mod:`._wire`), one connection pool per backend per loop.
* :class:`SDKTransport` (``transport="sdk"``, or any ``client=``, :mod:`.sdk`): the
  official async clients, through one :class:`SDKAdapter` per provider
  (``_openai_sdk``, ``_cohere_sdk``), their own retries off.

and, for a model in this process rather than a provider,
:class:`LocalModelTransport` (:mod:`.local`), the ``transport_class`` of
:class:`~feste.backend.local.SentenceTransformers`.

Both map errors at one boundary onto one status table (:mod:`._errors`), so they raise
the same exception types with the same messages, and every exception leaving a
transport is a :class:`~feste.errors.BackendError` with backend and method set and no
key in it. A backend may name its own transport class (``Backend.transport_class``)
for a provider with another wire protocol.

Connection pools are closed with the backend (``close()``, ``aclose()``, ``with``, or
when it is garbage-collected) and with the event loop they were opened on, whichever
comes first (:mod:`.base`).
"""

from __future__ import annotations

from feste.backend.base import Backend
from feste.backend.transports._errors import (
    provider_message,
    retry_after_seconds,
    status_error,
)
from feste.backend.transports.base import BaseTransport, SDKAdapter
from feste.backend.transports.http import HTTPTransport
from feste.backend.transports.local import LocalModelTransport
from feste.backend.transports.sdk import SDKTransport

__all__ = [
    "BaseTransport",
    "HTTPTransport",
    "LocalModelTransport",
    "SDKAdapter",
    "SDKTransport",
    "make_transport",
    "provider_message",
    "retry_after_seconds",
    "status_error",
]


def make_transport(backend: Backend) -> BaseTransport:
    """A new transport for ``backend``: its ``transport_class`` if it names one, else the
    kind ``backend.transport`` names. It opens nothing until ``prepare()``."""
    custom = backend.transport_class
    if custom is not None:
        transport: BaseTransport = custom(backend)
        return transport
    if backend.transport == "sdk":
        return SDKTransport(backend)
    return HTTPTransport(backend)
