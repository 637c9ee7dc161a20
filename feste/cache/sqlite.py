"""The SQLite store: the embedded default, one file, stdlib ``sqlite3``.

Design
------
* **Many threads, many processes.** Each thread uses its own connection (made on first
  use; a forked child makes new ones). The database runs in WAL mode, so readers never
  wait for the writer, and every connection waits up to ``timeout`` seconds for a
  lock held by another process (SQLite's busy timeout) before failing with a message
  that names the file. Writes take the write lock at the start of their transaction
  (``BEGIN IMMEDIATE``), so two writers queue instead of deadlocking.
* **Durable.** ``synchronous=FULL``: a transaction is on disk when ``put_many``
  returns, so a result survives a crash of the process (SIGKILL included) and of the
  machine. Writes come in bulk (the sender groups them), so that costs little.
* **Faults name the file and the fix**: a file that is not an SQLite database or is
  corrupt, a read-only file or folder, a lock that is never released, and a cache
  written by a newer feste.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from feste.cache._sql import SQLStore
from feste.cache.base import SCHEMA_VERSION
from feste.errors import CacheError

__all__ = ["DEFAULT_TIMEOUT", "SQLiteStore"]

DEFAULT_TIMEOUT = 60.0

# SQLite's limit on parameters per statement is 32766 (since 3.32); stay well below.
_KEYS_PER_QUERY = 500


class SQLiteStore(SQLStore):
    """Results and run history in the SQLite file at ``path`` (created if missing).

    ``create=False`` refuses a path where no file exists (used by the ``feste``
    command, which should not create a cache by mistyping its path). ``timeout`` is
    how long to wait for a lock another process holds.
    """

    placeholder = "?"

    def __init__(
        self, path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT, create: bool = True
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.location = self.path
        self.timeout = float(timeout)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._schema_ready = False
        if not create and not os.path.exists(self.path):
            raise CacheError(
                f"no cache at {self.path}: check the path (or FESTE_CACHE), or run a "
                f"computation with cache={self.path!r} first"
            )
        # Open now: a bad location fails here, where the cache is chosen.
        self._connection()

    def reopen_arguments(self) -> tuple[Any, ...]:
        return (self.path, self.timeout)

    # -- connections --------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            self._after_fork()
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            return connection
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise CacheError(
                f"cannot create the cache {self.path}: the folder {folder} does not exist "
                "(create it, or choose another cache location)"
            )
        try:
            connection = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as error:
            raise self._failure(error, "opening the cache") from None
        try:
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as error:
                raise self._failure(error, "opening the cache") from None
            if not self._schema_ready:
                found = self._schema_version(connection)
                if found is None or found < SCHEMA_VERSION:
                    with self._in_transaction(
                        connection, "creating the cache's tables", True
                    ) as cur:
                        self.create_schema(cur)
                else:
                    self.check_schema(found)
                self._schema_ready = True
        except BaseException:
            connection.close()
            raise
        self._local.connection = connection
        with self._lock:
            self._connections.append(connection)
        return connection

    def _schema_version(self, connection: sqlite3.Connection) -> int | None:
        """The stored schema version, None before the tables exist (read without
        taking the write lock, so processes opening one cache at once do not queue)."""
        try:
            row = connection.execute(
                "SELECT value FROM feste_meta WHERE name = 'schema_version'"
            ).fetchone()
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return None
            raise self._failure(error, "opening the cache") from None
        except sqlite3.Error as error:
            raise self._failure(error, "opening the cache") from None
        return None if row is None else int(row[0])

    def _after_fork(self) -> None:
        # The parent's connections must not be used (nor closed) here.
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections = []
        self._pid = os.getpid()

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            with contextlib.suppress(sqlite3.Error):
                connection.close()
        self._local = threading.local()

    # -- transactions -------------------------------------------------------------------

    @contextlib.contextmanager
    def _in_transaction(
        self, connection: sqlite3.Connection, doing: str, write: bool
    ) -> Iterator[sqlite3.Cursor]:
        cursor = connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield cursor
            except BaseException:
                connection.rollback()
                raise
            cursor.execute("COMMIT")
        except sqlite3.Error as error:
            if connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    connection.rollback()
            raise self._failure(error, doing) from None
        finally:
            cursor.close()

    def transaction(self, doing: str, write: bool = True) -> contextlib.AbstractContextManager[Any]:
        return self._in_transaction(self._connection(), doing, write)

    def select_values(self, cursor: Any, keys: Sequence[str]) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = []
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            chunk = keys[start : start + _KEYS_PER_QUERY]
            marks = ",".join("?" * len(chunk))
            cursor.execute(f"SELECT key, value FROM feste_results WHERE key IN ({marks})", chunk)
            rows.extend(cursor.fetchall())
        return rows

    # -- errors -------------------------------------------------------------------------

    def _failure(self, error: sqlite3.Error, doing: str) -> CacheError:
        message = str(error)
        lowered = message.lower()
        if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
            return CacheError(
                f"the cache {self.path} is not a readable SQLite database ({message}) while "
                f"{doing}: move the file away (a new cache is then made at that path) or "
                "choose another cache location"
            )
        if "readonly" in lowered or "read-only" in lowered:
            return CacheError(
                f"the cache {self.path} is read-only ({message}) while {doing}: make the file "
                "and its folder writable by this user, or choose another cache location"
            )
        if "unable to open" in lowered:
            return CacheError(
                f"cannot open the cache {self.path} ({message}) while {doing}: the folder must "
                "exist and be writable by this user; or choose another cache location"
            )
        if "locked" in lowered or "busy" in lowered:
            return CacheError(
                f"the cache {self.path} stayed locked by another connection for "
                f"{self.timeout:g} s while {doing}: let the other process finish, open the "
                "store with a longer timeout (feste.cache.SQLiteStore(path, timeout=...)), "
                "or use a PostgreSQL cache for many concurrent writers"
            )
        return CacheError(f"the cache {self.path} failed while {doing}: {message}")
