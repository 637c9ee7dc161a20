"""Running a simulator: in this process on a loop thread, or in a child process.

Design: ``serve`` is the plain coroutine (``python -m feste.testing`` uses
it). ``TestServer`` runs an ``ApiSimulator`` either on a daemon thread with
its own event loop (``mode="thread"``, starts in milliseconds; other threads
reach the simulator only by scheduling calls onto that loop) or in a child
process ``python -m feste.testing`` (``mode="process"``, so that a benchmark
client does not share the GIL with the server), which it then drives over
the control routes ``/_stats``, ``/_stats/reset`` and ``/_config``. The
child's api key travels over ``/_config``, never on its command line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import typing
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from ._answers import json_bytes
from ._app import ApiSimulator
from ._config import ServerConfig, check_loopback_host, config_to_argv
from ._stats import Stats

__all__ = ["TestServer", "serve"]


def _bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == "posix":
            # A fixed port can be reused at once after a restart (TIME_WAIT).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def _start_site(simulator: ApiSimulator, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(
        simulator.build_app(),
        access_log=None,
        handle_signals=False,
        # A client that disconnects (e.g. on its timeout) cancels its request,
        # so hangs and long latencies do not outlive their client.
        handler_cancellation=True,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    return runner


async def _stop_site(simulator: ApiSimulator, runner: web.AppRunner) -> None:
    # Cancel first: otherwise cleanup waits up to shutdown_timeout for hangs.
    simulator.cancel_requests()
    await runner.cleanup()


async def serve(
    config: ServerConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or the task is cancelled); ``on_ready(url)`` once listening."""
    simulator = ApiSimulator(config)
    sock = _bind_socket(check_loopback_host(host), port)
    url = _url_of(sock)
    runner = await _start_site(simulator, sock)
    try:
        if on_ready is not None:
            on_ready(url)
        await (stop or asyncio.Event()).wait()
    finally:
        await _stop_site(simulator, runner)


class _LoopThread:
    """Runs one simulator on a daemon thread with its own event loop."""

    def __init__(self, simulator: ApiSimulator) -> None:
        self._simulator = simulator
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def start(self, host: str, port: int) -> str:
        sock = _bind_socket(host, port)  # before the loop exists: a busy port raises here
        url = _url_of(sock)
        self._loop = loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, sock, ready), name=f"feste-testing {url}", daemon=True
        )
        self._thread.start()
        ready.result(timeout=30)
        return url

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        ready: concurrent.futures.Future[None],
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            self._runner = loop.run_until_complete(_start_site(self._simulator, sock))
        except BaseException as exc:
            sock.close()
            loop.close()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the server loop and return its result."""
        loop = self._loop
        if loop is None or threading.current_thread() is self._thread:
            return function()
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(function())
            except BaseException as exc:
                result.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return result.result(timeout=30)

    async def _shutdown(self, runner: web.AppRunner) -> None:
        await _stop_site(self._simulator, runner)
        # This loop is ours alone: finish whatever connection tasks are still
        # unwinding, so closing it reports no destroyed pending tasks.
        current = asyncio.current_task()
        leftovers = [task for task in asyncio.all_tasks() if task is not current]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers, timeout=1.0)

    def stop(self) -> None:
        loop = self._loop
        if self._runner is not None and loop is not None:
            shutdown = asyncio.run_coroutine_threadsafe(self._shutdown(self._runner), loop)
            with contextlib.suppress(concurrent.futures.TimeoutError):
                shutdown.result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)


def _package_root() -> str:
    """The directory holding the ``feste`` package, for the child's PYTHONPATH."""
    return str(Path(__file__).resolve().parents[2])


class _ChildProcess:
    """Runs ``python -m feste.testing`` and talks to it over its control routes."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: typing.IO[bytes] | None = None
        self.url = ""
        # Never route control calls through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def start(self, config: ServerConfig, host: str, port: int, timeout: float = 60.0) -> str:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            path for path in (_package_root(), env.get("PYTHONPATH")) if path
        )
        command = [
            sys.executable,
            "-m",
            "feste.testing",
            "--host",
            host,
            "--port",
            str(port),
            "--exit-on-stdin-eof",
            *config_to_argv(config),
        ]
        # stderr goes to a file: a pipe nobody reads could fill up and block
        # the server in the middle of a long benchmark.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env
        )
        try:
            line = self._first_line(timeout)
            if not line.startswith("http://"):
                raise RuntimeError(f"feste.testing server failed to start: {self._stderr_text()}")
            self.url = line
            if config.api_key is not None:
                # Sent after start, not on the command line, so it never shows in `ps`.
                self.request("POST", "/_config", {"api_key": config.api_key})
        except BaseException:
            self.stop()
            raise
        return line

    def _first_line(self, timeout: float) -> str:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return lines[0].decode().strip() if lines else ""

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()[-4000:]

    def request(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json_bytes(payload)
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            # The control routes answer a bad knob with 400 {"error": message}.
            try:
                detail = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError):
                detail = str(exc)
            raise ValueError(detail) from None

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdin, process.stdout, self._stderr):
            if stream is not None:
                stream.close()
        self._process = None
        self._stderr = None


class TestServer:
    """A running local imitation of the OpenAI and Cohere APIs.

    ``TestServer(**knobs)`` takes ``ServerConfig`` fields as keywords, plus
    ``host`` (loopback only), ``port`` (0: ephemeral) and ``mode``
    (``"thread"`` or ``"process"``). Use it as a context manager (sync or
    async) or call ``start()`` / ``stop()``; both are idempotent, and a stopped
    server can be started again (a thread-mode server keeps its statistics, a
    process-mode one starts fresh). After ``stop()``, ``stats()`` returns the
    last statistics.
    """

    __test__ = False  # a library class, not a pytest test class

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: Literal["thread", "process"] = "thread",
        config: ServerConfig | None = None,
        **knobs: Any,
    ) -> None:
        if mode not in ("thread", "process"):
            raise ValueError(f"mode must be 'thread' or 'process', got {mode!r}")
        self._host = check_loopback_host(host)
        self._port = port
        self._mode = mode
        self._config = (config or ServerConfig()).with_changes(**knobs)
        self._lifecycle = threading.Lock()
        self._simulator = ApiSimulator(self._config) if mode == "thread" else None
        self._loop_thread: _LoopThread | None = None
        self._child: _ChildProcess | None = None
        self._url: str | None = None
        self._last_stats: dict[str, Any] | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> TestServer:
        with self._lifecycle:
            if self._url is not None:
                return self
            if self._simulator is not None:
                loop_thread = _LoopThread(self._simulator)
                self._url = loop_thread.start(self._host, self._port)
                self._loop_thread = loop_thread
            else:
                child = _ChildProcess()
                self._url = child.start(self._config, self._host, self._port)
                self._child = child
                self._last_stats = None
        return self

    def stop(self) -> None:
        with self._lifecycle:
            if self._loop_thread is not None:
                self._loop_thread.stop()
                self._loop_thread = None
            if self._child is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._last_stats = self._child.request("GET", "/_stats")
                self._child.stop()
                self._child = None
            self._url = None

    def __enter__(self) -> TestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> TestServer:
        # Starting a process-mode server blocks for a while: keep the loop free.
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    # -- addresses ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._url is not None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the test server is not running; call start() first")
        return self._url

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def cohere_base_url(self) -> str:
        return self.url

    @property
    def mode(self) -> str:
        return self._mode

    # -- knobs and statistics ----------------------------------------------

    @property
    def config(self) -> ServerConfig:
        if self._simulator is not None:
            return self._simulator.config
        return self._config

    def configure(self, **changes: Any) -> ServerConfig:
        """Change knobs at runtime; unknown names or bad values raise ``ValueError``."""
        new = self.config.with_changes(**changes)  # validate before touching the server
        simulator = self._simulator
        if simulator is not None:
            if self._loop_thread is not None:
                new = self._loop_thread.call(lambda: simulator.configure(**changes))
            else:
                new = simulator.configure(**changes)
        elif self._child is not None:
            self._child.request("POST", "/_config", changes)
        self._config = new
        return new

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of the statistics; keys as documented on ``_stats.Stats``."""
        simulator = self._simulator
        if simulator is not None:
            if self._loop_thread is not None:
                return typing.cast(dict[str, Any], self._loop_thread.call(simulator.stats))
            return simulator.stats()
        if self._child is not None:
            return typing.cast(dict[str, Any], self._child.request("GET", "/_stats"))
        return dict(self._last_stats or Stats().snapshot(0))

    def reset_stats(self) -> None:
        simulator = self._simulator
        if simulator is not None:
            if self._loop_thread is not None:
                self._loop_thread.call(simulator.reset_stats)
            else:
                simulator.reset_stats()
        elif self._child is not None:
            self._child.request("POST", "/_stats/reset", {})
        else:
            self._last_stats = None

    def __repr__(self) -> str:
        knobs = "".join(
            f", {name}={value!r}" for name, value in self.config.changed_knobs().items()
        )
        where = self._url or "not running"
        return f"TestServer(url={where!r}, mode={self._mode!r}{knobs})"
