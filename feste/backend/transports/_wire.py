"""A lean HTTP/1.1 client for JSON APIs: keep-alive connections on asyncio protocols.

Design
------
The ``http`` transport sends many small JSON requests at once; a general-purpose
client spends most of its CPU per request on what those requests never use (cookie
jars, redirects, proxies, tracing hooks, stream readers, multi-value header maps).
This module does what an API call needs and nothing else:

* **One pool per origin** (:class:`ConnectionPool`: scheme, host, port). It keeps
  idle keep-alive connections, newest first, and never limits how many are open: the
  scheduler's limits decide how many requests are in flight. A connection idle for
  longer than ``idle_seconds`` (default ``IDLE_SECONDS``) is closed rather than reused
  (servers and load balancers drop idle connections without a word). One that the
  server closed while idle is noticed (``connection_lost``) and never reused.
* **One write per request**: the caller hands the request head (request line and
  headers, built once per path and key by the transport) and the body; they go out as
  one ``write``, so a small request is one TCP segment.
* **One parser per connection** (:class:`_Connection`): status line, headers, then a
  body framed by ``Content-Length``, by the chunked transfer-coding, or by the end of
  the connection; ``gzip`` and ``deflate`` bodies are decoded. Header names come back
  lowercased, in a plain ``dict``.
* **A connection is reused only after a complete answer** that does not ask to close
  it. A failed or cancelled exchange (a deadline, an error) closes its connection: the
  answer to the abandoned request could still arrive on it.

Failures raise :class:`WireError` (the answer broke HTTP/1.1 framing, or the server
closed the connection before answering), ``OSError`` or ``TimeoutError`` (connecting);
the transport maps them at its boundary (:mod:`._errors`). A request is never sent
twice here: retrying is the sender's decision.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import Iterable
from typing import Any

__all__ = ["IDLE_SECONDS", "MAX_HEAD_BYTES", "ConnectionPool", "WireError", "encode_head"]

#: A keep-alive connection idle for longer than this is closed instead of reused.
IDLE_SECONDS = 15.0
#: An answer whose status line and headers exceed this is refused (a server gone wrong).
MAX_HEAD_BYTES = 64 * 1024
# A body at least this large is written after the head rather than joined to it.
_JOIN_LIMIT = 256 * 1024
_HEAD_END = b"\r\n\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})

_tls_context: ssl.SSLContext | None = None


class WireError(Exception):
    """The server's answer broke HTTP/1.1, or the connection ended before it was whole."""


def _default_tls_context() -> ssl.SSLContext:
    # Loading the system's certificates takes milliseconds: once per process.
    global _tls_context
    if _tls_context is None:
        _tls_context = ssl.create_default_context()
    return _tls_context


def encode_head(method: str, target: str, host: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The request line and headers, each line ending in CRLF; the pool adds
    ``Content-Length`` and the empty line that ends the head.

    Raises ``ValueError`` for a method, target, header name or value that HTTP cannot
    carry (a space in the target, a line break, a control character) and
    ``UnicodeEncodeError`` for non-ASCII text; the message never quotes a header value,
    which may be a key.
    """
    if not method.isalpha() or not method.isascii():
        raise ValueError(f"the HTTP method {method!r} is not a method name")
    if not target or any(character == " " or _is_control(character) for character in target):
        raise ValueError("the request target holds a space or a control character")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers:
        for part, text in (("name", name), ("value", value)):
            if any(_is_control(character) for character in text):
                raise ValueError(f"the {part} of header {name!r} holds a control character")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _is_control(character: str) -> bool:
    # HTTP field values may hold tabs, never other C0 controls or DEL.
    return (ord(character) < 32 and character != "\t") or character == "\x7f"


class _Answer:
    """One answer as it is read: status, headers, body, and how its body is framed."""

    __slots__ = ("body", "chunk_left", "chunked", "headers", "keep_alive", "length", "status")

    def __init__(self, status: int, headers: dict[str, str], keep_alive: bool) -> None:
        self.status = status
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.chunked = False
        # Bytes of the body still to come with Content-Length; None: until the end.
        self.length: int | None = None
        # Bytes of the current chunk still to come; -1 between chunks.
        self.chunk_left = -1


def _parse_head(head: bytes) -> _Answer:
    # Decoded once (latin-1 maps every byte), then split and read as text.
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0]
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or len(parts[1]) != 3:
        raise WireError(
            f"the answer does not start with an HTTP/1.x status line: {_raw(status_line[:80])!r}"
        )
    try:
        status = int(parts[1])
    except ValueError:
        raise WireError(f"the status line has no status code: {_raw(status_line[:80])!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name[0] in " \t":
            raise WireError(f"a header line is not 'name: value': {_raw(line[:80])!r}")
        key = name.lower()
        text = value.strip(" \t")  # optional whitespace in HTTP: spaces and tabs
        previous = headers.get(key)
        headers[key] = text if previous is None else f"{previous}, {text}"
    keep_alive = parts[0] != "HTTP/1.0" and "close" not in headers.get("connection", "").lower()
    return _Answer(status, headers, keep_alive)


def _raw(text: str) -> bytes:
    """Text of the answer's head as the bytes it came as (for error messages)."""
    return text.encode("latin-1")


def _decode_content(answer: _Answer) -> bytes:
    coding = answer.headers.get("content-encoding", "identity").strip().lower()
    body = bytes(answer.body)
    if coding in ("identity", "") or not body:
        return body  # no body (HEAD, 204, 304) names the coding a body would have
    try:
        if coding in ("gzip", "x-gzip"):
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if coding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:  # some servers send raw deflate, without the zlib wrapper
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise WireError(f"the {coding} body cannot be decoded: {exc}") from None
    raise WireError(f"the answer uses a content-encoding that was not asked for: {coding!r}")


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses its answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # uvloop's transports are not asyncio.Transport subclasses: typed loosely.
        self._transport: Any = None
        self._buffer = bytearray()
        self._answer: _Answer | None = None
        self._waiter: asyncio.Future[_Answer] | None = None
        self._is_head_request = False
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # Bytes nobody asked for (a 408 before closing, garbage): never reuse this.
            self.close()
            return
        self._buffer += data
        try:
            done = self._parse()
        except WireError as exc:
            self.fail(exc)
            return
        if done:
            answer, self._answer = self._answer, None
            assert answer is not None
            if self._buffer:
                # The server sent more than one answer: this connection is out of step.
                answer.keep_alive = False
            waiter, self._waiter = self._waiter, None
            if not waiter.done():
                waiter.set_result(answer)

    def eof_received(self) -> bool:
        answer = self._answer
        waiter = self._waiter
        if waiter is not None and answer is not None and answer.length is None:
            if answer.chunked:
                return False  # connection_lost reports the unfinished body
            # A body framed by the end of the connection is now whole.
            answer.keep_alive = False
            self._answer = None
            self._waiter = None
            if not waiter.done():
                waiter.set_result(answer)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        if self._waiter is not None:
            detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
            self.fail(WireError(f"the server closed the connection before answering{detail}"))

    # -- exchange -------------------------------------------------------------------

    async def exchange(self, head: bytes, body: bytes, head_request: bool = False) -> _Answer:
        transport = self._transport
        if transport is None or self.closed:
            raise WireError("the connection is closed")
        self._waiter = self._loop.create_future()
        self._is_head_request = head_request
        if len(body) < _JOIN_LIMIT:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        return await self._waiter

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def fail(self, exc: WireError) -> None:
        """Close the connection; a request waiting on it raises ``exc``."""
        waiter, self._waiter = self._waiter, None
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # -- parsing --------------------------------------------------------------------

    def _parse(self) -> bool:
        """Consume what the buffer holds; True once the answer is whole."""
        while self._answer is None:
            end = self._buffer.find(_HEAD_END)
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    raise WireError(f"the answer's headers exceed {MAX_HEAD_BYTES} bytes")
                return False
            answer = _parse_head(bytes(self._buffer[:end]))
            del self._buffer[: end + 4]
            if 100 <= answer.status < 200:
                continue  # an interim answer (100 Continue): the real one follows
            self._answer = answer
            if self._is_head_request or answer.status in _NO_BODY_STATUSES:
                answer.length = 0
            elif "chunked" in answer.headers.get("transfer-encoding", "").lower():
                answer.chunked = True
            elif "content-length" in answer.headers:
                try:
                    answer.length = int(answer.headers["content-length"])
                except ValueError:
                    raise WireError("the Content-Length header is not a number") from None
                if answer.length < 0:
                    raise WireError("the Content-Length header is negative")
            else:
                answer.keep_alive = False  # the body runs to the end of the connection
        answer = self._answer
        if answer.chunked:
            return self._parse_chunks(answer)
        if answer.length is None:
            answer.body += self._buffer
            self._buffer.clear()
            return False
        wanted = answer.length - len(answer.body)
        answer.body += self._buffer[:wanted]
        del self._buffer[:wanted]
        return len(answer.body) == answer.length

    def _parse_chunks(self, answer: _Answer) -> bool:
        buffer = self._buffer
        while True:
            if answer.chunk_left > 0:
                piece = buffer[: answer.chunk_left]
                answer.body += piece
                answer.chunk_left -= len(piece)
                del buffer[: len(piece)]
                if answer.chunk_left > 0:
                    return False
            if answer.chunk_left == 0:
                if len(buffer) < 2:
                    return False
                if buffer[:2] != b"\r\n":
                    raise WireError("a chunk of the body does not end with CRLF")
                del buffer[:2]
                answer.chunk_left = -1
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise WireError("a chunk size line is too long")
                return False
            if answer.chunk_left == -2:
                # After the last chunk: trailer lines until an empty one.
                del buffer[: line_end + 2]
                if line_end == 0:
                    return True
                continue
            size_text = bytes(buffer[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise WireError(f"a chunk size is not hexadecimal: {size_text[:20]!r}") from None
            del buffer[: line_end + 2]
            answer.chunk_left = size if size > 0 else -2


class ConnectionPool:
    """The keep-alive connections to one origin (``scheme://host:port``)."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        connect_timeout: float | None,
        tls: ssl.SSLContext | None = None,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be 'http' or 'https', got {scheme!r}")
        self.scheme = scheme
        self.host = host
        self.port = port
        self._connect_timeout = connect_timeout
        self._idle_seconds = idle_seconds
        self._tls = tls if tls is not None or scheme == "http" else None
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<ConnectionPool {self.scheme}://{self.host}:{self.port} "
            f"open={len(self._open)} idle={len(self._idle)}>"
        )

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def request(
        self, head: bytes, body: bytes | None = None, *, head_request: bool = False
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request (``head`` from :func:`encode_head`; ``body`` None for a
        request without content, such as a GET) and return the answer's status,
        headers and decoded body."""
        connection = self._idle_connection()
        if connection is None:
            connection = await self._connect()
        reusable = False
        try:
            if body is None:
                answer = await connection.exchange(head + b"\r\n", b"", head_request)
            else:
                length = b"Content-Length: %d\r\n\r\n" % len(body)
                answer = await connection.exchange(head + length, body, head_request)
            content = _decode_content(answer)
            reusable = answer.keep_alive
        finally:
            if reusable and not self._closed and not connection.closed:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:
                self._discard(connection)
        return answer.status, answer.headers, content

    def _idle_connection(self) -> _Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            if (
                not connection.closed
                and time.monotonic() - connection.idle_since < self._idle_seconds
            ):
                return connection
            self._discard(connection)
        return None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise WireError("the connection pool is closed")
        loop = asyncio.get_running_loop()
        connection = _Connection(loop)
        tls: Any = None
        if self.scheme == "https":
            tls = self._tls if self._tls is not None else _default_tls_context()
        opening = loop.create_connection(
            lambda: connection,
            self.host,
            self.port,
            ssl=tls,
            server_hostname=self.host if tls is not None else None,
        )
        if self._connect_timeout is None:
            await opening
        else:
            async with asyncio.timeout(self._connect_timeout):
                await opening
        if self._closed:  # closed while connecting
            connection.close()
            raise WireError("the connection pool is closed")
        self._open.add(connection)
        return connection

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def aclose(self) -> None:
        """Close every connection; requests in flight fail with :class:`WireError`."""
        self._closed = True
        self._idle.clear()
        for connection in list(self._open):
            connection.fail(WireError("the connection pool is closed"))
            self._open.discard(connection)
        # Let the transports run their close callbacks before the loop may stop.
        await asyncio.sleep(0)
