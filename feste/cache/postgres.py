"""The PostgreSQL store: one cache shared by every process and machine that can reach it.

Design
------
``psycopg`` 3 with a ``psycopg_pool`` connection pool (made per process: a forked child
opens its own). Both are optional dependencies, imported when a store is made; without
them the error says ``pip install 'feste[postgres]'``. The tables and statements are
those of the SQLite store (:mod:`feste.cache._sql`); the bulk lookup is one
``key = ANY(%s)`` query and bulk writes use psycopg's pipelined ``executemany``.
Concurrent first uses create the tables once, under an advisory lock.

The URL (``postgresql://user:password@host:port/database``) may hold a password: it
is kept to reopen the store in worker processes, and shown everywhere else (``repr``,
messages, ``feste cache stats``) with the password replaced by ``***``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from feste.cache._sql import SQLStore
from feste.errors import CacheError

__all__ = ["DEFAULT_MAX_CONNECTIONS", "DEFAULT_TIMEOUT", "PostgresStore", "redact_url"]

DEFAULT_MAX_CONNECTIONS = 8
DEFAULT_TIMEOUT = 30.0

# Any constant shared by every feste process: serializes the first CREATE TABLEs.
_SCHEMA_LOCK_ID = 0x66657374


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class PostgresStore(SQLStore):
    """Results and run history in the PostgreSQL database at ``url``.

    ``max_connections`` caps the pool of this process; ``timeout`` is how long to wait
    for a connection (the server unreachable, or the pool exhausted).
    """

    placeholder = "%s"

    def __init__(
        self,
        url: str,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        try:
            import psycopg
            import psycopg_pool
        except ImportError as error:
            raise CacheError(
                f"a PostgreSQL cache needs the psycopg and psycopg_pool packages ({error}): "
                "pip install 'feste[postgres]'"
            ) from None
        self._psycopg = psycopg
        self._pool_module = psycopg_pool
        self.url = url
        self.location = redact_url(url)
        self.max_connections = int(max_connections)
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._pool: Any = None
        self._pid = os.getpid()
        # Connect now: a wrong URL or a stopped server fails where the cache is chosen.
        with self.transaction("creating the cache's tables") as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
            self.create_schema(cursor)
        atexit.register(self.close)

    def reopen_arguments(self) -> tuple[Any, ...]:
        return (self.url, self.max_connections, self.timeout)

    def _connections(self) -> Any:
        with self._lock:
            if self._pid != os.getpid():
                self._pool = None  # the parent's pool: its sockets are not ours
                self._pid = os.getpid()
            if self._pool is None:
                pool = self._pool_module.ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self.max_connections,
                    timeout=self.timeout,
                    open=False,
                    name="feste-cache",
                )
                try:
                    pool.open(wait=True, timeout=self.timeout)
                except Exception as error:
                    with contextlib.suppress(Exception):
                        pool.close(timeout=0)
                    raise CacheError(
                        f"cannot connect to the PostgreSQL cache {self.location} ({error}): "
                        "check the URL, that the server runs and accepts this user"
                    ) from None
                self._pool = pool
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            mine = self._pid == os.getpid()
        if pool is not None and mine:
            with contextlib.suppress(Exception):
                pool.close(timeout=5)

    @contextlib.contextmanager
    def _in_transaction(self, doing: str) -> Iterator[Any]:
        pool = self._connections()
        try:
            with pool.connection() as connection, connection.cursor() as cursor:
                yield cursor
        except self._psycopg.Error as error:
            raise self._failure(error, doing) from None
        except self._pool_module.PoolTimeout as error:
            raise CacheError(
                f"no connection to the PostgreSQL cache {self.location} within "
                f"{self.timeout:g} s while {doing} ({error}): check the server, or raise "
                "max_connections"
            ) from None

    def transaction(self, doing: str, write: bool = True) -> contextlib.AbstractContextManager[Any]:
        return self._in_transaction(doing)

    def select_values(self, cursor: Any, keys: Sequence[str]) -> list[tuple[str, str]]:
        cursor.execute("SELECT key, value FROM feste_results WHERE key = ANY(%s)", (list(keys),))
        return [(key, value) for key, value in cursor.fetchall()]

    def _failure(self, error: Exception, doing: str) -> CacheError:
        message = " ".join(str(error).split())
        if isinstance(error, self._psycopg.errors.ReadOnlySqlTransaction):
            return CacheError(
                f"the PostgreSQL cache {self.location} is read-only ({message}) while {doing}: "
                "connect to the primary server, or grant this user write access"
            )
        if isinstance(error, self._psycopg.errors.InsufficientPrivilege):
            return CacheError(
                f"the PostgreSQL cache {self.location} refused this user ({message}) while "
                f"{doing}: grant it CREATE, SELECT, INSERT and DELETE on the feste_* tables"
            )
        if isinstance(error, self._psycopg.OperationalError):
            return CacheError(
                f"the PostgreSQL cache {self.location} failed while {doing} ({message}): check "
                "that the server runs and is reachable"
            )
        return CacheError(f"the PostgreSQL cache {self.location} failed while {doing}: {message}")
