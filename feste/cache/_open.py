"""Turning a cache option (a path, a URL, a store) into a store, and reading the option.

Design
------
``cache=`` (argument of ``feste.compute``, option of ``feste.context``) and the
``FESTE_CACHE`` environment variable take the same values: a file path (SQLite), a
``postgresql://`` URL, or a :class:`~feste.cache.base.CacheStore`. A path or URL is
what travels to worker processes (options are shipped by value); a store object
travels too, and reopens from its location there. Each process opens one store per
location (:func:`~feste.cache.base.shared_store`), whatever the number of calls.
"""

from __future__ import annotations

import os
from typing import Any

from feste import context
from feste.cache import postgres, sqlite
from feste.cache.base import CacheStore, shared_store
from feste.cache.postgres import PostgresStore
from feste.cache.sqlite import SQLiteStore
from feste.errors import CacheError

__all__ = ["ENVIRONMENT_VARIABLE", "active_store", "open_store"]

#: Where the cache location is read from when no ``cache=`` option is set.
ENVIRONMENT_VARIABLE = "FESTE_CACHE"

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(spec: Any, *, create: bool = True) -> CacheStore:
    """The store for ``spec``: a path (SQLite file), a ``postgresql://`` URL, or a store.

    ``create=False`` refuses a SQLite path where no file exists yet.
    """
    if isinstance(spec, CacheStore):
        return spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or isinstance(spec, bool):
        raise CacheError(
            f"a cache is a file path (SQLite), a postgresql:// URL or a "
            f"feste.cache.CacheStore; got {type(spec).__name__} {spec!r}"
        )
    if not spec.strip():
        raise CacheError("the cache location is empty: give a file path or a postgresql:// URL")
    if spec.startswith(_POSTGRES_SCHEMES):
        return shared_store(
            PostgresStore, spec, postgres.DEFAULT_MAX_CONNECTIONS, postgres.DEFAULT_TIMEOUT
        )
    if "://" in spec:
        scheme = spec.split("://", 1)[0]
        raise CacheError(
            f"unknown cache URL scheme {scheme!r}: use a file path (SQLite), a "
            "postgresql://user:password@host:port/database URL, or a feste.cache.CacheStore"
        )
    path = os.path.abspath(os.path.expanduser(spec))
    if not create:
        return SQLiteStore(path, sqlite.DEFAULT_TIMEOUT, create=False)
    return shared_store(SQLiteStore, path, sqlite.DEFAULT_TIMEOUT)


# Locations already opened in this process, so that a call's lookup of its store costs
# a dict access (paths need no resolving again). Keyed by the option's value and pid.
_opened: dict[tuple[Any, int], CacheStore] = {}


def active_store() -> CacheStore | None:
    """The store the current context caches in, or None when caching is off.

    The ``cache`` option wins (``False`` turns caching off even when ``FESTE_CACHE`` is
    set); when it is not set, ``FESTE_CACHE`` names the cache; by default there is none.
    """
    spec = context.get("cache")
    if spec is None:
        spec = os.environ.get(ENVIRONMENT_VARIABLE) or None
    if spec is None or spec is False:
        return None
    if isinstance(spec, CacheStore):
        return spec
    memo_key = (spec, os.getpid())
    store = _opened.get(memo_key)
    if store is None:
        store = _opened[memo_key] = open_store(spec)
    return store
