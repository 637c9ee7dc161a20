"""SQL shared by the SQLite and PostgreSQL stores.

Design
------
Both databases understand the same tables and statements (``INSERT ... ON CONFLICT``,
partial indexes, ``DOUBLE PRECISION``), so the store logic is written once here, in
SQL with ``?`` placeholders. A subclass supplies a transaction (a DB-API cursor that
commits when the block ends, rolls back on error), the one query that differs (bulk
key lookup), the placeholder style, and the translation of its driver's errors into
:class:`~feste.errors.CacheError` messages that name the database and what to do.

Tables (``SCHEMA_VERSION`` 2; version 1 had no ``feste_batch_jobs``, which is added
when a version 1 store is opened)::

    feste_meta         name, value                       schema_version
    feste_results      key, value, label, run, created   the cache (JSON text values)
    feste_runs         name, status, started, ended, record (JSON)
    feste_run_outputs  run, position, path, key, digest, text, failed
    feste_batch_jobs   run, job_id, created, record (JSON)
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from feste.cache.base import SCHEMA_VERSION, CacheEntry, CacheStore, RunOutput

__all__ = ["SCHEMA", "SQLStore"]

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS feste_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS feste_results ("
    " key TEXT PRIMARY KEY, value TEXT NOT NULL, label TEXT NOT NULL, run TEXT,"
    " created DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS feste_results_created ON feste_results (created)",
    "CREATE INDEX IF NOT EXISTS feste_results_run ON feste_results (run) WHERE run IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS feste_runs ("
    " name TEXT PRIMARY KEY, status TEXT NOT NULL, started DOUBLE PRECISION NOT NULL,"
    " ended DOUBLE PRECISION, record TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS feste_run_outputs ("
    " run TEXT NOT NULL, position INTEGER NOT NULL, path TEXT NOT NULL, key TEXT,"
    " digest TEXT NOT NULL, text TEXT NOT NULL, failed INTEGER NOT NULL,"
    " PRIMARY KEY (run, position))",
    "CREATE TABLE IF NOT EXISTS feste_batch_jobs ("
    " run TEXT NOT NULL, job_id TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,"
    " record TEXT NOT NULL, PRIMARY KEY (run, job_id))",
)

_INSERT_RESULT = (
    "INSERT INTO feste_results (key, value, label, run, created) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (key) DO NOTHING"
)
_SAVE_BATCH_JOB = (
    "INSERT INTO feste_batch_jobs (run, job_id, created, record) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (run, job_id) DO UPDATE SET record = excluded.record"
)
_SAVE_RUN = (
    "INSERT INTO feste_runs (name, status, started, ended, record) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET status = excluded.status, started = excluded.started, "
    "ended = excluded.ended, record = excluded.record"
)


class SQLStore(CacheStore):
    """A store on an SQL database; subclasses connect (see the module docstring)."""

    #: The driver's placeholder, written ``?`` in the statements here.
    placeholder = "?"

    # -- for subclasses -----------------------------------------------------------------

    def transaction(self, doing: str, write: bool = True) -> contextlib.AbstractContextManager[Any]:
        """A cursor in a transaction that commits at the end of the ``with`` block.

        ``doing`` ("reading cached results"...) goes into the error raised when the
        database fails, which names the database and what to do. ``write=False`` says
        the block only reads (SQLite then takes no write lock).
        """
        raise NotImplementedError

    def select_values(self, cursor: Any, keys: Sequence[str]) -> list[tuple[str, str]]:
        """``(key, value)`` rows for those of ``keys`` that are stored."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------

    def sql(self, statement: str) -> str:
        if self.placeholder == "?":
            return statement
        return statement.replace("?", self.placeholder)

    def create_schema(self, cursor: Any) -> None:
        """Create the tables if needed and check the schema version (in a transaction
        the subclass has made exclusive)."""
        for statement in SCHEMA:
            cursor.execute(statement)
        cursor.execute(self.sql("SELECT value FROM feste_meta WHERE name = ?"), ("schema_version",))
        row = cursor.fetchone()
        if row is None:
            cursor.execute(
                self.sql("INSERT INTO feste_meta (name, value) VALUES (?, ?)"),
                ("schema_version", str(SCHEMA_VERSION)),
            )
            return
        found = int(row[0])
        self.check_schema(found)
        if found < SCHEMA_VERSION:
            # An older store: the tables it lacked were just created.
            cursor.execute(
                self.sql("UPDATE feste_meta SET value = ? WHERE name = ?"),
                (str(SCHEMA_VERSION), "schema_version"),
            )

    # -- results ------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        if not keys:
            return {}
        with self.transaction("reading cached results", write=False) as cursor:
            return dict(self.select_values(cursor, keys))

    def put_many(self, entries: Sequence[CacheEntry]) -> None:
        if not entries:
            return
        now = time.time()
        rows = [(entry.key, entry.value, entry.label, entry.run, now) for entry in entries]
        with self.transaction("storing results") as cursor:
            cursor.executemany(self.sql(_INSERT_RESULT), rows)

    # -- runs ---------------------------------------------------------------------------

    def save_run(self, record: Mapping[str, Any]) -> None:
        row = (
            record["name"],
            record["status"],
            record["started"],
            record.get("ended"),
            json.dumps(dict(record), sort_keys=True),
        )
        with self.transaction("saving the run record") as cursor:
            cursor.execute(self.sql(_SAVE_RUN), row)

    def save_run_outputs(self, name: str, outputs: Sequence[RunOutput]) -> None:
        rows = [
            (name, out.position, out.path, out.key, out.digest, out.text, int(out.failed))
            for out in outputs
        ]
        with self.transaction("saving the run's outputs") as cursor:
            cursor.execute(self.sql("DELETE FROM feste_run_outputs WHERE run = ?"), (name,))
            if rows:
                cursor.executemany(
                    self.sql(
                        "INSERT INTO feste_run_outputs (run, position, path, key, digest, text,"
                        " failed) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    ),
                    rows,
                )

    def list_runs(self) -> list[dict[str, Any]]:
        with self.transaction("listing runs", write=False) as cursor:
            cursor.execute("SELECT record FROM feste_runs ORDER BY started, name")
            return [json.loads(row[0]) for row in cursor.fetchall()]

    def get_run(self, name: str) -> dict[str, Any] | None:
        with self.transaction("reading a run", write=False) as cursor:
            cursor.execute(self.sql("SELECT record FROM feste_runs WHERE name = ?"), (name,))
            row = cursor.fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def run_outputs(self, name: str) -> list[RunOutput]:
        with self.transaction("reading a run's outputs", write=False) as cursor:
            cursor.execute(
                self.sql(
                    "SELECT position, path, key, digest, text, failed FROM feste_run_outputs "
                    "WHERE run = ? ORDER BY position"
                ),
                (name,),
            )
            rows = cursor.fetchall()
        return [
            RunOutput(int(position), path, key, digest, text, bool(failed))
            for position, path, key, digest, text, failed in rows
        ]

    def delete_run(self, name: str) -> bool:
        with self.transaction("deleting a run") as cursor:
            cursor.execute(self.sql("DELETE FROM feste_runs WHERE name = ?"), (name,))
            found = cursor.rowcount > 0
            cursor.execute(self.sql("DELETE FROM feste_run_outputs WHERE run = ?"), (name,))
            cursor.execute(self.sql("DELETE FROM feste_results WHERE run = ?"), (name,))
            cursor.execute(self.sql("DELETE FROM feste_batch_jobs WHERE run = ?"), (name,))
        return found

    # -- batch jobs ---------------------------------------------------------------------

    def save_batch_job(self, run: str, job_id: str, record: Mapping[str, Any]) -> None:
        row = (run, job_id, time.time(), json.dumps(dict(record), sort_keys=True))
        with self.transaction("saving a batch job") as cursor:
            cursor.execute(self.sql(_SAVE_BATCH_JOB), row)

    def batch_jobs(self, run: str) -> list[dict[str, Any]]:
        with self.transaction("reading batch jobs", write=False) as cursor:
            cursor.execute(
                self.sql(
                    "SELECT record FROM feste_batch_jobs WHERE run = ? ORDER BY created, job_id"
                ),
                (run,),
            )
            return [json.loads(row[0]) for row in cursor.fetchall()]

    # -- maintenance --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self.transaction("reading statistics", write=False) as cursor:
            cursor.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(value)), 0), MIN(created), MAX(created) "
                "FROM feste_results"
            )
            entries, size, oldest, newest = cursor.fetchone()
            cursor.execute(
                "SELECT label, COUNT(*) FROM feste_results GROUP BY label ORDER BY label"
            )
            labels = {label: int(count) for label, count in cursor.fetchall()}
            cursor.execute("SELECT COUNT(*) FROM feste_runs")
            (runs,) = cursor.fetchone()
        return {
            "location": self.location,
            "schema_version": SCHEMA_VERSION,
            "entries": int(entries),
            "value_bytes": int(size),
            "oldest": oldest,
            "newest": newest,
            "by_label": labels,
            "runs": int(runs),
        }

    def clear(self) -> int:
        with self.transaction("clearing the cache") as cursor:
            cursor.execute("DELETE FROM feste_results")
            cleared = int(cursor.rowcount)
            # A job's answers are cached results too: a cleared cache sends calls again.
            cursor.execute("DELETE FROM feste_batch_jobs")
            return cleared

    def prune(self, older_than: float) -> int:
        cutoff = time.time() - older_than
        with self.transaction("pruning the cache") as cursor:
            cursor.execute(self.sql("DELETE FROM feste_results WHERE created < ?"), (cutoff,))
            pruned = int(cursor.rowcount)
            # Batch jobs that old have ended at the provider (24 hours at most).
            cursor.execute(self.sql("DELETE FROM feste_batch_jobs WHERE created < ?"), (cutoff,))
            return pruned
