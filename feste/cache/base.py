"""The result store: one small base class, one subclass per database.

Design
------
A :class:`CacheStore` keeps two things:

* **results**: JSON text under a content-addressed key (:mod:`feste.cache.keys`),
  written once (a second write of a key keeps the first value: nothing is silently
  overwritten) and read in bulk: :meth:`~CacheStore.get_many` answers many keys in
  one query and :meth:`~CacheStore.put_many` writes many entries in one transaction,
  which commits before it returns (a result is durable before anyone uses it);
* **run history**: one record per named run (a JSON object: graph summary, times,
  counts) and its outputs (a digest and a text per output, for comparing runs);
* **batch jobs**: the provider Batch API jobs a run created (a JSON record each: the
  job id, the backend, the custom ids of its requests), saved as soon as a job
  exists, so a run started again re-attaches to its jobs (:mod:`feste._batch_jobs`).

The store deals in text only; turning values into text is the caller's job
(:mod:`feste.cache._codec`). Stores are used from many threads at once (each keeps
what it needs per thread) and travel to other processes by reopening from their
location (``__reduce__``): one store object per location and process
(:func:`shared_store`).

A new store is one subclass implementing the abstract methods below;
:class:`feste.cache.sqlite.SQLiteStore` and :class:`feste.cache.postgres.PostgresStore`
share their SQL through :class:`feste.cache._sql.SQLStore`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from feste.errors import CacheError

__all__ = [
    "CacheEntry",
    "CacheStore",
    "RunOutput",
    "SCHEMA_VERSION",
    "shared_store",
]

#: The layout of the tables this feste writes. A store created by a newer feste (a
#: larger number) is refused rather than misread; an older one is brought up to date
#: (version 2 added the batch jobs table).
SCHEMA_VERSION = 2


class CacheEntry(NamedTuple):
    """One result to store: its key, its JSON text, a label and the run it belongs to.

    ``label`` says what made it (``"openai.chat gpt-4o-mini"``) for ``feste cache
    stats``; ``run`` is set only for results that belong to one run (``pure=False``
    calls), which are deleted with that run.
    """

    key: str
    value: str
    label: str
    run: str | None = None


class RunOutput(NamedTuple):
    """One output of a run: where it sits among the computed values, what it was."""

    position: int
    path: str
    key: str | None
    digest: str
    text: str
    failed: bool


class CacheStore:
    """Base class of result stores; see the module docstring."""

    #: Shown in messages and ``feste cache stats`` (never a password).
    location: str = ""

    # -- results ----------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """The stored JSON text of each of ``keys`` that is present, in one query."""
        raise NotImplementedError

    def put_many(self, entries: Sequence[CacheEntry]) -> None:
        """Store ``entries`` in one transaction, committed on return; existing keys are
        kept as they are."""
        raise NotImplementedError

    # -- run history --------------------------------------------------------------------

    def save_run(self, record: Mapping[str, Any]) -> None:
        """Insert or replace the record of run ``record["name"]``."""
        raise NotImplementedError

    def save_run_outputs(self, name: str, outputs: Sequence[RunOutput]) -> None:
        """Replace the outputs recorded for run ``name``."""
        raise NotImplementedError

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run record, oldest first."""
        raise NotImplementedError

    def get_run(self, name: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def run_outputs(self, name: str) -> list[RunOutput]:
        """The outputs of run ``name`` in position order (empty for an unknown run)."""
        raise NotImplementedError

    def delete_run(self, name: str) -> bool:
        """Delete a run's record, its outputs, its batch jobs' records and the results
        cached for it alone.
        False when there was no such run."""
        raise NotImplementedError

    # -- batch jobs ---------------------------------------------------------------------

    def save_batch_job(self, run: str, job_id: str, record: Mapping[str, Any]) -> None:
        """Insert or replace the record of batch job ``job_id`` of run ``run`` ("" for
        computations without a run name); committed on return."""
        raise NotImplementedError

    def batch_jobs(self, run: str) -> list[dict[str, Any]]:
        """The records of run ``run``'s batch jobs, oldest first."""
        raise NotImplementedError

    # -- maintenance --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counts for ``feste cache stats``: entries, bytes, oldest, newest, per label."""
        raise NotImplementedError

    def clear(self) -> int:
        """Delete every cached result and batch job record (run history stays); the
        number of results deleted."""
        raise NotImplementedError

    def prune(self, older_than: float) -> int:
        """Delete results stored more than ``older_than`` seconds ago (and the records of
        batch jobs created before then); the number of results deleted."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (the store opens them again if used afterwards)."""

    # -- shared behaviour ---------------------------------------------------------------

    def reopen_arguments(self) -> tuple[Any, ...]:
        """Constructor arguments that open this store again in another process."""
        raise NotImplementedError

    def __reduce__(self) -> tuple[Any, ...]:
        return (shared_store, (type(self), *self.reopen_arguments()))

    def check_schema(self, found: int | None) -> None:
        """Refuse a store written by a newer feste."""
        if found is not None and found > SCHEMA_VERSION:
            raise CacheError(
                f"the cache {self.location} was written by a newer feste (schema version "
                f"{found}; this feste reads version {SCHEMA_VERSION}): upgrade feste, or use "
                "another cache location"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


StoreType = TypeVar("StoreType", bound=CacheStore)

_shared_lock = threading.Lock()
_shared: dict[tuple[Any, ...], CacheStore] = {}
_shared_pid = os.getpid()


def shared_store(cls: type[StoreType], *arguments: Any) -> StoreType:
    """This process's store of class ``cls`` opened with ``arguments`` (made once)."""
    global _shared_pid
    with _shared_lock:
        if _shared_pid != os.getpid():
            # A forked child: the parent's connections are not ours to use.
            _shared.clear()
            _shared_pid = os.getpid()
        memo_key = (cls, *arguments)
        store = _shared.get(memo_key)
        if store is None:
            store = _shared[memo_key] = cls(*arguments)
        return store  # type: ignore[return-value]
