"""``feste.cache``: a persistent, content-addressed cache of call results, and run history.

Turn it on with one option: ``feste.compute(..., cache="results.db")``,
``feste.context.set(cache=...)`` or the ``FESTE_CACHE`` environment variable. The value
is a file path (SQLite, the embedded default), a ``postgresql://`` URL (one cache
shared by every process and machine), or a :class:`CacheStore` object.

* Backend calls are looked up where they are sent (:mod:`feste._calls`), on every
  scheduler: a hit never reaches a rate limiter or the provider, a miss is sent and
  stored before its value is used. The key covers the provider, the backend's
  settings (never the API key), the method, every parameter and the input
  (:mod:`feste.cache.keys`).
* ``pure=False`` calls are cached only within a named run (``run="name"``), so that
  a resumed run replays them, and never shared with another run.
* ``feste.compute(..., run="name")`` records the run (graph, times, counts, outputs)
  for ``feste runs list|show|diff|delete``.

Layout: :mod:`~feste.cache.base` (the store base class), :mod:`~feste.cache.sqlite`,
:mod:`~feste.cache.postgres`, :mod:`~feste.cache.keys`; ``_codec`` (values as JSON),
``_open`` (options to stores), ``_session`` (what the sender and pure tasks use),
``_sql`` (SQL shared by both stores). The package imports only ``feste.errors``,
``feste.context`` and (for typing) ``feste.backend.base``; ``feste._replay`` (the
graph-level bulk lookup) and ``feste._runs`` (run history) sit with ``feste.compute``.
"""

from feste.cache._open import ENVIRONMENT_VARIABLE, active_store, open_store
from feste.cache.base import SCHEMA_VERSION, CacheEntry, CacheStore, RunOutput
from feste.cache.keys import call_key, task_key
from feste.cache.postgres import PostgresStore
from feste.cache.sqlite import SQLiteStore

__all__ = [
    "CacheEntry",
    "CacheStore",
    "ENVIRONMENT_VARIABLE",
    "PostgresStore",
    "RunOutput",
    "SCHEMA_VERSION",
    "SQLiteStore",
    "active_store",
    "call_key",
    "open_store",
    "task_key",
]
