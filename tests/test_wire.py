"""Tests of feste.backend.transports._wire, feste's own HTTP/1.1 keep-alive client.

Two kinds of real servers on 127.0.0.1: an aiohttp app on its own loop in a thread
(:class:`AppServer`) for well-formed answers, and :class:`ScriptedServer`, a raw
``asyncio`` server in the test's own loop whose answers are exact bytes, for framing a
library server never sends. Counts (connections accepted, requests read, connections
the server saw closed) are measured at the server.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import suppress
from typing import Any

import pytest
import trustme
from aiohttp import web

from feste import context
from feste.backend import OpenAI
from feste.backend.transports._wire import (
    IDLE_SECONDS,
    MAX_HEAD_BYTES,
    ConnectionPool,
    WireError,
    encode_head,
)
from feste.errors import ConfigurationError

HOST = "127.0.0.1"
GET = encode_head("GET", "/", HOST, [("Accept", "*/*")])
CLOSED_EARLY = "the server closed the connection before answering"


def run(scenario: Coroutine[Any, Any, None]) -> None:
    """Run one test's scenario on a fresh event loop."""
    asyncio.run(scenario)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` without blocking the loop (the client and the scripted server
    share it); generous, only a broken run reaches the timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("the condition never held")
        await asyncio.sleep(0.005)


async def settle() -> None:
    """Let the loop deliver what the peer did (a close, a late write) to the client."""
    await asyncio.sleep(0.05)


# -- a raw server answering with exact bytes ---------------------------------------------


class Exchange:
    """One request as the scripted server read it, and the means to answer it."""

    def __init__(
        self, server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        #: 1 for the first request the server read, on any connection.
        self.number = server.requests

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def trickle(self, data: bytes) -> None:
        """Write ``data`` one byte at a time, letting the client read between bytes."""
        for index in range(len(data)):
            self.writer.write(data[index : index + 1])
            await self.writer.drain()
            await asyncio.sleep(0.001)


#: Bytes to write (the connection stays open), or a coroutine function that answers
#: and returns whether the server keeps the connection open.
Answer = bytes | Callable[[Exchange], Awaitable[bool]]


class ScriptedServer:
    """A raw HTTP/1.1 server in the running loop: for each request it reads the head
    (and a ``Content-Length`` body), then runs ``answer``."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests = 0
        self.closed = 0
        self.heads: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._pools: list[ConnectionPool] = []

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for pool in self._pools:
            await pool.aclose()
        # The client hung up: the handlers end on their own (a failed test may leave
        # one waiting, cancelled after a while).
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=10)
        for handler in list(self._handlers):
            handler.cancel()
            with suppress(asyncio.CancelledError):
                await handler

    def pool(self, **options: Any) -> ConnectionPool:
        pool = ConnectionPool("http", HOST, self.port, connect_timeout=10, **options)
        self._pools.append(pool)
        return pool

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self.connections += 1
        try:
            while await self._read_request(reader):
                exchange = Exchange(self, reader, writer)
                if isinstance(self.answer, bytes):
                    await exchange.send(self.answer)
                elif not await self.answer(exchange):
                    break
        except ConnectionError:
            pass
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
            self.closed += 1
            self._handlers.discard(handler)

    async def _read_request(self, reader: asyncio.StreamReader) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed the connection
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                await reader.readexactly(int(value))
        self.requests += 1
        self.heads.append(head)
        return True


def ok(body: bytes = b"ok", *headers: str) -> bytes:
    """A 200 answer framed by Content-Length."""
    lines = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- an aiohttp app in its own thread ---------------------------------------------------


class AppServer:
    """An aiohttp app on its own loop in a thread: well-formed answers of every kind."""

    def __init__(self) -> None:
        self.requests = 0
        # One entry per TCP connection that carried a request (transports are kept, so
        # no two connections can share an id).
        self.transports: set[Any] = set()
        self.in_flight = 0
        self.url = ""
        self.port = 0

    @property
    def connections(self) -> int:
        return len(self.transports)

    def pool(self, **options: Any) -> ConnectionPool:
        return ConnectionPool("http", HOST, self.port, connect_timeout=10, **options)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/plain", self.plain),
            web.post("/echo", self.echo),
            web.get("/gather/{count}", self.gather),
            web.get("/encoded/{coding}", self.encoded),
            web.get("/compressed", self.compressed),
            web.get("/chunked", self.chunked),
            web.get("/no-content", self.no_content),
            web.get("/close", self.close),
        ]

    def count(self, request: web.Request) -> None:
        self.requests += 1
        self.transports.add(request.transport)

    async def plain(self, request: web.Request) -> web.Response:
        self.count(request)
        return web.Response(body=b"hello", content_type="text/plain", headers={"X-Seen": "yes"})

    async def echo(self, request: web.Request) -> web.Response:
        self.count(request)
        return web.Response(body=await request.read(), content_type="application/json")

    async def gather(self, request: web.Request) -> web.Response:
        """Answer once ``count`` requests are in flight at once (or after 10 s)."""
        self.count(request)
        self.in_flight += 1
        wanted = int(request.match_info["count"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while self.in_flight < wanted and loop.time() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)  # let the others see the count too
        self.in_flight -= 1
        return web.Response(body=b"together")

    async def encoded(self, request: web.Request) -> web.Response:
        self.count(request)
        coding = request.match_info["coding"]
        data = b'{"answer": "' + b"compressible " * 50 + b'"}'
        bodies = {
            "gzip": gzip.compress(data),
            "deflate": zlib.compress(data),
            "raw-deflate": _raw_deflate(data),
            "br": b"\x0b\x02\x80hello\x03",
            "corrupt-gzip": b"\x1f\x8b" + b"not really gzip",
        }
        header = {"raw-deflate": "deflate", "corrupt-gzip": "gzip"}.get(coding, coding)
        return web.Response(body=bodies[coding], headers={"Content-Encoding": header})

    async def compressed(self, request: web.Request) -> web.Response:
        self.count(request)
        response = web.Response(body=b"squeezed " * 100)
        response.enable_compression()
        return response

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        self.count(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for piece in (b"first,", b"second,", b"third"):
            await response.write(piece)
        await response.write_eof()
        return response

    async def no_content(self, request: web.Request) -> web.Response:
        self.count(request)
        return web.Response(status=204)

    async def close(self, request: web.Request) -> web.Response:
        self.count(request)
        return web.Response(body=b"bye", headers={"Connection": "close"})


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def started(serve_app: Callable[..., int], tls: ssl.SSLContext | None = None) -> AppServer:
    """An :class:`AppServer` served in a thread (over TLS with ``tls``)."""
    server = AppServer()
    app = web.Application()
    app.add_routes(server.routes())
    server.port = serve_app(app, tls)
    server.url = f"{'https' if tls else 'http'}://{HOST}:{server.port}"
    return server


@pytest.fixture
def app_server(serve_app):
    return started(serve_app)


@pytest.fixture
def certificate_authority():
    """A throwaway certificate authority (trustme) and a certificate for 127.0.0.1."""
    return trustme.CA()


@pytest.fixture
def tls_app_server(serve_app, certificate_authority):
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert(HOST).configure_cert(server_tls)
    return started(serve_app, server_tls)


def get(path: str) -> bytes:
    return encode_head("GET", path, HOST, [("Accept", "*/*"), ("Accept-Encoding", "gzip, deflate")])


# -- keep-alive and reuse ---------------------------------------------------------------


def test_sequential_requests_share_one_connection(app_server):
    async def scenario() -> None:
        pool = app_server.pool()
        first = await pool.request(get("/plain"))
        second = await pool.request(encode_head("POST", "/echo", HOST, []), b'{"n": 1}')
        assert pool.open_connections == 1
        await pool.aclose()

        status, headers, body = first
        assert (status, body) == (200, b"hello")
        assert headers["content-length"] == "5"
        assert headers["content-type"] == "text/plain"
        assert headers["x-seen"] == "yes"
        assert all(name == name.lower() for name in headers)
        assert second[0] == 200 and second[2] == b'{"n": 1}'

    run(scenario())
    assert (app_server.requests, app_server.connections) == (2, 1)


def test_concurrent_requests_open_one_connection_each_and_reuse_them(app_server):
    async def scenario() -> None:
        pool = app_server.pool()
        for _ in range(2):
            answers = await asyncio.gather(*(pool.request(get("/gather/3")) for _ in range(3)))
            assert [(status, body) for status, _, body in answers] == [(200, b"together")] * 3
            assert pool.open_connections == 3
        for _ in range(2):
            assert (await pool.request(get("/plain")))[2] == b"hello"
        assert pool.open_connections == 3
        await pool.aclose()
        assert pool.open_connections == 0

    run(scenario())
    assert (app_server.requests, app_server.connections) == (8, 3)


def test_a_closing_answer_is_not_reused(app_server):
    async def scenario() -> None:
        pool = app_server.pool()
        for _ in range(2):
            status, headers, body = await pool.request(get("/close"))
            assert (status, headers["connection"], body) == (200, "close", b"bye")
            assert pool.open_connections == 0
        assert (await pool.request(get("/plain")))[2] == b"hello"
        await pool.aclose()

    run(scenario())
    assert (app_server.requests, app_server.connections) == (3, 3)


def test_a_connection_the_server_closes_while_idle_is_replaced():
    async def answer_then_close(exchange: Exchange) -> bool:
        await exchange.send(ok(b"once"))
        await settle()  # the client holds the connection idle by now
        return False

    async def scenario() -> None:
        async with ScriptedServer(answer_then_close) as server:
            pool = server.pool()
            assert (await pool.request(GET))[2] == b"once"
            await until(lambda: server.closed == 1)
            await settle()
            assert (await pool.request(GET))[2] == b"once"
            assert (server.connections, server.requests) == (2, 2)
            await pool.aclose()

    run(scenario())


def test_a_connection_idle_for_longer_than_idle_seconds_is_not_reused():
    async def scenario() -> None:
        async with ScriptedServer(ok(b"fresh")) as server:
            patient = server.pool(idle_seconds=60)
            hasty = server.pool(idle_seconds=0.05)
            for pool in (patient, hasty):
                assert (await pool.request(GET))[2] == b"fresh"
            await asyncio.sleep(0.1)
            for pool in (patient, hasty):
                assert (await pool.request(GET))[2] == b"fresh"
                assert pool.open_connections == 1
            await until(lambda: server.closed == 1)  # the hasty pool's first connection
            assert (server.connections, server.requests) == (3, 4)

    assert IDLE_SECONDS == 15.0
    run(scenario())


def test_bytes_after_a_complete_answer_stop_reuse():
    two_answers = ok(b"one") + ok(b"two")

    async def scenario() -> None:
        async with ScriptedServer(two_answers) as server:
            pool = server.pool()
            status, _, body = await pool.request(GET)
            assert (status, body) == (200, b"one")
            assert pool.open_connections == 0
            assert (await pool.request(GET))[2] == b"one"
            assert (server.connections, server.requests) == (2, 2)
            await pool.aclose()

    run(scenario())


def test_bytes_arriving_on_an_idle_connection_stop_reuse():
    late = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"

    async def answer_then_babble(exchange: Exchange) -> bool:
        await exchange.send(ok())
        if exchange.number == 1:
            await settle()
            await exchange.send(late)
        return True

    async def scenario() -> None:
        async with ScriptedServer(answer_then_babble) as server:
            pool = server.pool()
            assert (await pool.request(GET))[2] == b"ok"
            await until(lambda: server.closed == 1)  # the client hung up on the babble
            assert (await pool.request(GET))[2] == b"ok"
            assert (server.connections, server.requests) == (2, 2)
            await pool.aclose()

    run(scenario())


# -- framing ----------------------------------------------------------------------------


def test_chunked_answers_from_aiohttp(app_server):
    async def scenario() -> None:
        pool = app_server.pool()
        for _ in range(2):
            status, headers, body = await pool.request(get("/chunked"))
            assert (status, headers["transfer-encoding"], body) == (
                200,
                "chunked",
                b"first,second,third",
            )
        assert pool.open_connections == 1
        await pool.aclose()

    run(scenario())
    assert (app_server.requests, app_server.connections) == (2, 1)


CHUNKED = (
    b"HTTP/1.1 200 OK\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"X-Kind: chunky\r\n"
    b"\r\n"
    b"5;ext=1\r\nhello\r\n"
    b"1\r\n,\r\n"
    b'A ; name="quoted"\r\n0123456789\r\n'
    b"0\r\n"
    b"Expires: never\r\n"
    b"X-Trailer: yes\r\n"
    b"\r\n"
)


@pytest.mark.parametrize("delivery", ["whole", "byte by byte"])
def test_chunked_extensions_trailers_and_awkward_splits(delivery):
    async def answer(exchange: Exchange) -> bool:
        if delivery == "whole":
            await exchange.send(CHUNKED)
        else:
            await exchange.trickle(CHUNKED)
        return True

    async def scenario() -> None:
        async with ScriptedServer(answer) as server:
            pool = server.pool()
            for _ in range(2):
                status, headers, body = await pool.request(GET)
                assert (status, body) == (200, b"hello,0123456789")
                assert headers == {"transfer-encoding": "chunked", "x-kind": "chunky"}
            assert pool.open_connections == 1
            assert (server.connections, server.requests) == (1, 2)
            await pool.aclose()

    run(scenario())


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", b"until the end"),
        (b"HTTP/1.0 200 OK\r\n\r\nold style", b"old style"),
        (b"HTTP/1.1 200 OK\r\n\r\n", b""),
    ],
    ids=["http/1.1", "http/1.0", "empty"],
)
def test_a_body_framed_by_the_end_of_the_connection(answer, body):
    async def answer_in_pieces(exchange: Exchange) -> bool:
        head, _, rest = answer.partition(b"\r\n\r\n")
        await exchange.send(head + b"\r\n\r\n")
        await settle()
        await exchange.trickle(rest)
        return False

    async def scenario() -> None:
        async with ScriptedServer(answer_in_pieces) as server:
            pool = server.pool()
            for _ in range(2):
                status, _, content = await pool.request(GET)
                assert (status, content) == (200, body)
                assert pool.open_connections == 0
            assert (server.connections, server.requests) == (2, 2)
            await pool.aclose()

    run(scenario())


def test_an_http_1_0_answer_with_content_length_is_not_reused():
    async def scenario() -> None:
        # The server keeps the connection open: the client is the one that closes it.
        async with ScriptedServer(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc") as server:
            pool = server.pool()
            for _ in range(2):
                assert (await pool.request(GET))[2] == b"abc"
            assert pool.open_connections == 0
            await until(lambda: server.closed == 2)
            assert (server.connections, server.requests) == (2, 2)
            await pool.aclose()

    run(scenario())


def test_interim_answers_are_skipped_and_repeated_headers_are_joined():
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\n"
        b"Content-Length: 4\r\n"
        b"Set-Cookie: a=1\r\n"
        b"SET-COOKIE:b=2  \r\n"
        b"X-Empty:\r\n"
        b"\r\n"
        b"made"
    )

    async def scenario() -> None:
        async with ScriptedServer(answer) as server:
            pool = server.pool()
            for _ in range(2):
                status, headers, body = await pool.request(GET)
                assert (status, body) == (201, b"made")
                assert headers == {"content-length": "4", "set-cookie": "a=1, b=2", "x-empty": ""}
            assert (server.connections, pool.open_connections) == (1, 1)
            await pool.aclose()

    run(scenario())


def test_no_content_and_head_answers_have_no_body(app_server):
    async def scenario() -> None:
        pool = app_server.pool()
        status, _, body = await pool.request(get("/no-content"))
        assert (status, body) == (204, b"")
        status, headers, body = await pool.request(
            encode_head("HEAD", "/plain", HOST, []), head_request=True
        )
        assert (status, headers["content-length"], body) == (200, "5", b"")
        assert (await pool.request(get("/plain")))[2] == b"hello"
        assert pool.open_connections == 1
        await pool.aclose()

    run(scenario())
    assert (app_server.requests, app_server.connections) == (3, 1)


# -- content-encoding -------------------------------------------------------------------


def test_an_empty_body_needs_no_decoding(app_server):
    # A HEAD answer names the encoding its GET answer would have, with no body.
    async def scenario() -> None:
        pool = app_server.pool()
        head = encode_head("HEAD", "/encoded/gzip", HOST, [("Accept-Encoding", "gzip")])
        status, headers, body = await pool.request(head, head_request=True)
        assert (status, headers["content-encoding"], body) == (200, "gzip", b"")
        assert pool.open_connections == 1
        await pool.aclose()

    run(scenario())


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
def test_compressed_bodies_are_decoded(app_server, coding):
    async def scenario() -> None:
        pool = app_server.pool()
        for _ in range(2):
            status, headers, body = await pool.request(get(f"/encoded/{coding}"))
            assert (status, body) == (200, b'{"answer": "' + b"compressible " * 50 + b'"}')
            assert headers["content-encoding"] == coding.removeprefix("raw-")
        assert pool.open_connections == 1
        await pool.aclose()

    run(scenario())
    assert (app_server.requests, app_server.connections) == (2, 1)


def test_aiohttps_own_compression_is_decoded(app_server):
    async def scenario() -> None:
        pool = app_server.pool()
        status, headers, body = await pool.request(get("/compressed"))
        assert (status, body) == (200, b"squeezed " * 100)
        assert headers["content-encoding"] in ("gzip", "deflate")
        await pool.aclose()

    run(scenario())


@pytest.mark.parametrize(
    ("coding", "message"),
    [
        ("br", "the answer uses a content-encoding that was not asked for: 'br'"),
        ("corrupt-gzip", "the gzip body cannot be decoded: Error -3 while decompressing data"),
    ],
)
def test_an_undecodable_body_is_a_wire_error(app_server, coding, message):
    async def scenario() -> None:
        pool = app_server.pool()
        with pytest.raises(WireError) as caught:
            await pool.request(get(f"/encoded/{coding}"))
        assert str(caught.value).startswith(message)
        assert pool.open_connections == 0
        assert (await pool.request(get("/plain")))[2] == b"hello"
        await pool.aclose()

    run(scenario())
    assert (app_server.requests, app_server.connections) == (2, 2)


# -- broken answers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Trailer: cut",
    ],
    ids=["nothing", "half a head", "half a body", "chunks unfinished", "trailers unfinished"],
)
def test_the_server_closing_before_the_answer_is_whole(answer):
    async def answer_and_close(exchange: Exchange) -> bool:
        if exchange.number == 1:
            await exchange.send(answer)
            return False
        await exchange.send(ok(b"next"))
        return True

    async def scenario() -> None:
        async with ScriptedServer(answer_and_close) as server:
            pool = server.pool()
            with pytest.raises(WireError) as caught:
                await pool.request(GET)
            assert str(caught.value).startswith(CLOSED_EARLY)
            assert pool.open_connections == 0
            assert (await pool.request(GET))[2] == b"next"
            assert (server.connections, server.requests) == (2, 2)
            await pool.aclose()

    run(scenario())


MALFORMED = {
    "not http": (
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        "the answer does not start with an HTTP/1.x status line: b'SSH-2.0-OpenSSH_9.6'",
    ),
    "http/2": (
        b"HTTP/2 200\r\n\r\n",
        "the answer does not start with an HTTP/1.x status line: b'HTTP/2 200'",
    ),
    "status not a number": (
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        "the status line has no status code: b'HTTP/1.1 2x0 OK'",
    ),
    "header without colon": (
        b"HTTP/1.1 200 OK\r\nContent-Length 2\r\n\r\nok",
        "a header line is not 'name: value': b'Content-Length 2'",
    ),
    "folded header": (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  continued\r\n\r\n",
        "a header line is not 'name: value': b'  continued'",
    ),
    "content-length not a number": (
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        "the Content-Length header is not a number",
    ),
    "content-length negative": (
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        "the Content-Length header is negative",
    ),
    "chunk size not hex": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz;x=1\r\n",
        "a chunk size is not hexadecimal: b'zz'",
    ),
    "chunk without crlf": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
        "a chunk of the body does not end with CRLF",
    ),
    "head too large": (
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES,
        f"the answer's headers exceed {MAX_HEAD_BYTES} bytes",
    ),
    "chunk size line too long": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"e" * MAX_HEAD_BYTES,
        "a chunk size line is too long",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_answer_is_a_wire_error(case):
    answer, message = MALFORMED[case]

    async def scenario() -> None:
        # The server keeps the connection open: the client must give up on it itself.
        async with ScriptedServer(answer) as server:
            pool = server.pool()
            with pytest.raises(WireError) as caught:
                await pool.request(GET)
            assert str(caught.value) == message
            assert pool.open_connections == 0
            await until(lambda: server.closed == 1)
            assert (server.connections, server.requests) == (1, 1)
            await pool.aclose()

    assert MAX_HEAD_BYTES == 64 * 1024
    run(scenario())


# -- cancelling and closing -------------------------------------------------------------


async def never_answer_the_first(exchange: Exchange) -> bool:
    """The first request waits until the client hangs up; later ones get "ok"."""
    if exchange.number == 1:
        await exchange.reader.read()
        return False
    await exchange.send(ok())
    return True


def test_a_cancelled_request_closes_its_connection():
    async def scenario() -> None:
        async with ScriptedServer(never_answer_the_first) as server:
            pool = server.pool()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.request(GET), 0.3)
            assert pool.open_connections == 0
            await until(lambda: server.closed == 1)  # the server saw the hang-up
            assert (await pool.request(GET))[2] == b"ok"
            assert (server.connections, server.requests) == (2, 2)
            assert pool.open_connections == 1
            await pool.aclose()

    run(scenario())


def test_closing_the_pool_fails_requests_in_flight():
    async def hold(exchange: Exchange) -> bool:
        await exchange.reader.read()
        return False

    async def scenario() -> None:
        async with ScriptedServer(hold) as server:
            pool = server.pool()
            waiting = [asyncio.create_task(pool.request(GET)) for _ in range(2)]
            await until(lambda: server.requests == 2)
            assert pool.open_connections == 2
            await pool.aclose()
            outcomes = await asyncio.gather(*waiting, return_exceptions=True)
            assert [type(outcome) for outcome in outcomes] == [WireError, WireError]
            assert [str(outcome) for outcome in outcomes] == ["the connection pool is closed"] * 2
            assert pool.closed
            assert pool.open_connections == 0
            await until(lambda: server.closed == 2)
            with pytest.raises(WireError) as caught:
                await pool.request(GET)
            assert str(caught.value) == "the connection pool is closed"
            assert server.connections == 2
            assert repr(pool) == f"<ConnectionPool http://{HOST}:{server.port} open=0 idle=0>"

    run(scenario())


def test_closing_the_pool_fails_a_request_still_connecting():
    async def scenario() -> None:
        async with ScriptedServer(ok()) as server:
            pool = server.pool()
            connecting = asyncio.create_task(pool.request(GET))
            await asyncio.sleep(0)  # the task is inside create_connection now
            await pool.aclose()
            with pytest.raises(WireError) as caught:
                await connecting
            assert str(caught.value) == "the connection pool is closed"
            assert pool.open_connections == 0
            await until(lambda: server.closed == server.connections)
            assert server.requests == 0

    run(scenario())


def test_closing_the_pool_closes_idle_connections():
    async def scenario() -> None:
        async with ScriptedServer(ok()) as server:
            pool = server.pool()
            await asyncio.gather(pool.request(GET), pool.request(GET))
            assert repr(pool) == f"<ConnectionPool http://{HOST}:{server.port} open=2 idle=2>"
            await pool.aclose()
            await until(lambda: server.closed == 2)
            assert pool.closed and pool.open_connections == 0

    run(scenario())


def test_a_pool_refuses_other_schemes():
    with pytest.raises(ValueError) as caught:
        ConnectionPool("ftp", HOST, 21, connect_timeout=1)
    assert str(caught.value) == "scheme must be 'http' or 'https', got 'ftp'"


# -- the request head -------------------------------------------------------------------


def test_encode_head_bytes():
    head = encode_head(
        "POST",
        "/v1/chat/completions",
        "api.example.com:8443",
        [("Accept", "application/json"), ("X-Tabbed", "a\tb"), ("X-Empty", "")],
    )
    assert head == (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: api.example.com:8443\r\n"
        b"Accept: application/json\r\n"
        b"X-Tabbed: a\tb\r\n"
        b"X-Empty: \r\n"
    )


def test_the_pool_ends_the_head_and_frames_the_body():
    async def scenario() -> None:
        async with ScriptedServer(ok()) as server:
            pool = server.pool()
            await pool.request(encode_head("GET", "/a", HOST, []))
            await pool.request(encode_head("POST", "/b", HOST, []), b"{}")
            await pool.request(encode_head("POST", "/c", HOST, []), b"")
            await pool.request(encode_head("POST", "/d", HOST, []), b"x" * (300 * 1024))
            await pool.aclose()
        assert server.heads == [
            f"GET /a HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(),
            f"POST /b HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2\r\n\r\n".encode(),
            f"POST /c HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n\r\n".encode(),
            f"POST /d HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 307200\r\n\r\n".encode(),
        ]
        assert server.connections == 1

    run(scenario())


SECRET = "sk-secret-0123456789"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (("Authorization", f"Bearer {SECRET}\r\nX: y"), "header 'Authorization'"),
        (("Authorization", f"Bearer {SECRET}\n"), "header 'Authorization'"),
        (("Authorization", f"Bearer {SECRET}\x00"), "header 'Authorization'"),
        (("Authorization", f"Bearer {SECRET}\x7f"), "header 'Authorization'"),
        (("X-Bad\r\nName", SECRET), "header 'X-Bad\\r\\nName'"),
    ],
    ids=["crlf", "lf", "nul", "del", "name"],
)
def test_encode_head_refuses_control_characters_without_quoting_the_value(header, message):
    with pytest.raises(ValueError) as caught:
        encode_head("GET", "/", HOST, [("Accept", "*/*"), header])
    text = str(caught.value)
    part = "name" if header[0] == "X-Bad\r\nName" else "value"
    assert text == f"the {part} of {message} holds a control character"
    assert "0123456789" not in text


@pytest.mark.parametrize(
    ("method", "target", "message"),
    [
        ("GET", "/batches/a b", "the request target holds a space or a control character"),
        ("GET", "/batches/a\r\nX: y", "the request target holds a space or a control character"),
        ("GET", "", "the request target holds a space or a control character"),
        ("GE T", "/", "the HTTP method 'GE T' is not a method name"),
    ],
    ids=["space", "crlf", "empty", "method"],
)
def test_encode_head_refuses_a_request_line_http_cannot_carry(method, target, message):
    with pytest.raises(ValueError) as caught:
        encode_head(method, target, HOST, [])
    assert str(caught.value) == message


def test_encode_head_refuses_non_ascii():
    with pytest.raises(UnicodeEncodeError):
        encode_head("GET", "/", HOST, [("Authorization", "Bearer sk-clé-0123456789")])


# -- TLS ----------------------------------------------------------------------------------


def test_https_requests_reuse_one_tls_connection(tls_app_server, certificate_authority):
    client_tls = ssl.create_default_context()
    certificate_authority.configure_trust(client_tls)

    async def scenario() -> None:
        pool = ConnectionPool(
            "https", HOST, tls_app_server.port, connect_timeout=10, tls=client_tls
        )
        try:
            first = await pool.request(get("/plain"))
            second = await pool.request(get("/plain"))
        finally:
            await pool.aclose()
        assert first[0] == second[0] == 200
        assert first[2] == second[2] == b"hello"

    run(scenario())
    assert (tls_app_server.requests, tls_app_server.connections) == (2, 1)


# -- through the http transport ---------------------------------------------------------

KEY = "sk-wire-test-0123456789"


def test_a_base_url_with_a_bad_port_is_refused_on_the_first_call():
    base_url = "http://127.0.0.1:notaport/v1"
    llm = OpenAI(api_key=KEY, base_url=base_url, transport="http")  # accepted here
    with context.set(eager=True, max_retries=3), pytest.raises(ConfigurationError) as caught:
        llm.chat("hi")
    error = caught.value
    assert error.message == (
        "invalid URL (Port could not be cast to integer value as 'notaport'); "
        f"check base_url={base_url!r}"
    )
    assert (error.backend, error.method, error.attempts) == ("openai", "chat", 1)


def test_a_certificate_that_cannot_be_verified_is_a_configuration_error(tls_app_server):
    # The default context trusts the machine's certificates, not this throwaway CA:
    # refused at the handshake, not retried (sending again cannot help), nothing sent.
    base_url = f"{tls_app_server.url}/v1"
    llm = OpenAI(api_key=KEY, base_url=base_url, transport="http")
    with context.set(eager=True, max_retries=3), pytest.raises(ConfigurationError) as caught:
        llm.chat("hi")
    error = caught.value
    assert error.message.startswith(f"the TLS certificate of {base_url} could not be verified (")
    assert error.message.endswith(
        "); check base_url, or the certificates this machine trusts (the SSL_CERT_FILE "
        "environment variable names a bundle)"
    )
    assert "certificate" in error.message.split("(")[1]
    assert (error.backend, error.method, error.attempts) == ("openai", "chat", 1)
    assert tls_app_server.requests == 0


def test_an_organization_with_a_line_break_is_refused_before_sending(llm_server):
    organization = "org\r\nX-Evil: 1"
    # Accepted at construction: the http transport refuses it on the first call.
    base_url = llm_server.openai_base_url
    llm = OpenAI(api_key=KEY, organization=organization, base_url=base_url, transport="http")
    with context.set(eager=True, max_retries=3), pytest.raises(ConfigurationError) as caught:
        llm.chat("hi")
    error = caught.value
    assert error.message == (
        "the request could not be sent (ValueError: the client refused a header value); "
        "check the API key and the headers this backend sends"
    )
    assert (error.backend, error.method, error.attempts) == ("openai", "chat", 1)
    assert "X-Evil" not in str(error) and KEY not in str(error)
    assert llm_server.stats()["requests"] == 0
