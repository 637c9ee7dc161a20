"""Graph nodes that call backends: the functions inside a graph's ``Task`` nodes.

Design
------
A backend call in a graph is a ``dask.task_spec.Task`` whose function is a
:class:`BackendCall` (one item) or a :class:`BatchCall` (a list of items, made by the
batching pass); :func:`take_item` picks one item's value out of a batch. These are the
only objects every scheduler must understand:

* called directly (the ``sync``, ``threads`` and ``processes`` schedulers, a Dask
  worker, eager mode) they send through :mod:`feste._calls` on this thread's event
  loop (:func:`feste._loop.run_sync`);
* the async engine recognizes them and awaits :func:`feste._calls.run_call` /
  :func:`~feste._calls.run_batch` itself, coalescing calls of one batch group.

The batched item is always a call's first positional argument and every other
argument a keyword parameter; two calls may share a request only when
:meth:`BackendCall.batch_group` is equal: backend identity, credential fingerprint,
method and every parameter. The same fingerprint is part of a call's token, so calls
made with different keys are never one node either.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from dask.base import tokenize

from feste._calls import run_batch, run_call
from feste._loop import run_sync
from feste.backend.base import Backend
from feste.backend.spec import MethodSpec
from feste.backend.types import ItemFailure
from feste.errors import BackendError, describe_call

__all__ = [
    "BackendCall",
    "BatchCall",
    "call_now",
    "describe_item_failures",
    "flatten_keys",
    "take_item",
]


def call_now(
    backend: Backend, method: str, item: Any, params: Mapping[str, Any], pure: bool = True
) -> Any:
    """Send one call on this thread's event loop and return its value (eager mode)."""
    return run_sync(run_call(backend, method, item, params, pure=pure))


class BackendCall:
    """The function of a graph node that calls ``backend.method(item, **params)``."""

    # Weakly referable: feste.task shares one BackendCall between the calls of one line
    # through a weak reference kept on the backend (a strong one would be a cycle).
    __slots__ = ("__weakref__", "backend", "call_site", "method", "pure")

    def __init__(
        self, backend: Backend, method: str, pure: bool = True, call_site: str | None = None
    ) -> None:
        self.backend = backend
        self.method = method
        # False for calls made with pure=False: never merged with an identical call.
        self.pure = pure
        # Where the user's code made the call ("app.py:12 in summarize"), for errors;
        # not part of the call's identity.
        self.call_site = call_site

    @property
    def __name__(self) -> str:  # used by dask's funcname() in reprs and keys
        return f"{self.backend.provider}-{self.method}"

    @property
    def spec(self) -> MethodSpec:
        return self.backend.spec(self.method)

    def batch_group(self, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Calls with equal groups may share one request; None if not batchable."""
        if not self.spec.batchable:
            return None
        return (
            self.backend.identity(),
            self.backend.credential_fingerprint(),
            self.method,
            tokenize(sorted(params.items())),
        )

    def __call__(self, item: Any, **params: Any) -> Any:
        try:
            return call_now(self.backend, self.method, item, params, self.pure)
        except BackendError as error:
            raise describe_call(error, item, self.call_site) from None

    def __dask_tokenize__(self) -> Any:
        return (
            "feste.BackendCall",
            self.backend.identity(),
            self.backend.credential_fingerprint(),
            self.method,
        )

    def __repr__(self) -> str:
        return f"<{self.backend.provider}.{self.method}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (BackendCall, (self.backend, self.method, self.pure, self.call_site))


class BatchCall:
    """The function of a batched node: ``backend.method`` over a list of items.

    Returns one entry per item: its value, or an :class:`ItemFailure` when the provider
    rejected that item alone (the batch is split to find it).
    """

    __slots__ = ("backend", "call_sites", "distinct", "method")

    def __init__(
        self,
        backend: Backend,
        method: str,
        distinct: bool = False,
        call_sites: tuple[str | None, ...] = (),
    ) -> None:
        self.backend = backend
        self.method = method
        # True when some items come from pure=False calls: identical items are then
        # all sent, each asking for its own answer.
        self.distinct = distinct
        # Where the user made each item's call, in item order, for error messages.
        self.call_sites = call_sites

    @property
    def __name__(self) -> str:
        return f"{self.backend.provider}-{self.method}-batch"

    def __call__(self, items: list[Any], **params: Any) -> list[Any]:
        items = list(items)
        batch = run_batch(self.backend, self.method, items, params, dedupe=not self.distinct)
        return describe_item_failures(run_sync(batch), items, self.call_sites)

    def __dask_tokenize__(self) -> Any:
        return (
            "feste.BatchCall",
            self.backend.identity(),
            self.backend.credential_fingerprint(),
            self.method,
        )

    def __repr__(self) -> str:
        return f"<{self.backend.provider}.{self.method} batch>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (BatchCall, (self.backend, self.method, self.distinct, self.call_sites))


def describe_item_failures(
    results: list[Any], items: list[Any], call_sites: Sequence[str | None]
) -> list[Any]:
    """Tell each failed item of a batch its input and where its call was made."""
    for index, value in enumerate(results):
        if isinstance(value, ItemFailure):
            site = call_sites[index] if index < len(call_sites) else None
            describe_call(value.error, items[index], site)
    return results


def flatten_keys(keys: Any, into: list[Any]) -> list[Any]:
    """Append the keys in ``keys`` (one key, or nested lists of keys) to ``into``, in
    order, and return it. A loop, not dask's generator: it runs once per output."""
    if isinstance(keys, list):
        for item in keys:
            flatten_keys(item, into)
    else:
        into.append(keys)
    return into


def take_item(batch_result: list[Any], index: int) -> Any:
    """Pick one item's value out of a batch result (re-raising that item's own error)."""
    value = batch_result[index]
    if isinstance(value, ItemFailure):
        # Duplicate calls share one item: each key raises its own copy of the error,
        # so the scheduler labels every copy with the key that raised it.
        try:
            error = copy.copy(value.error)
        except Exception:  # an exception type that cannot be rebuilt from its args
            error = value.error
        raise error
    return value
