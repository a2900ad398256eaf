"""A small raw-socket HTTP/1.1 client for black-box protocol tests.

Real clients (httpx) hide exactly what these tests need to see: the bytes on the wire, how a
response is framed, and whether the server closed the connection. ``Conn`` keeps one socket and
one receive buffer, so pipelined responses can be read one after another, and every read has a
deadline: a test never hangs, it fails.

A connection reset by the server counts as "closed" (a server that closes with unread request
bytes in its receive queue makes the kernel send RST instead of FIN), and data received before
the reset is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

NO_BODY_STATUSES = {204, 304}


class Closed(AssertionError):
    """The server closed the connection before the expected bytes arrived."""


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)
    head: bytes = b""

    def get(self, name: str) -> str | None:
        """The value of the first header called ``name`` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def has_token(self, name: str, token: str) -> bool:
        """Whether a comma-separated header (Connection, Transfer-Encoding) lists ``token``."""
        return any(
            part.strip().lower() == token
            for value in self.get_all(name)
            for part in value.split(",")
        )


def build_request(
    method: str = "GET",
    target: str = "/",
    *,
    version: str = "1.1",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    host: bool = True,
) -> bytes:
    """Serialise a request; adds ``Host`` (unless ``host=False``) and ``Content-Length`` when a
    body is given and no framing header was passed."""
    lines = [f"{method} {target} HTTP/{version}"]
    given = [name.lower() for name, _ in headers or []]
    if host and "host" not in given:
        lines.append("Host: testserver")
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body and "content-length" not in given and "transfer-encoding" not in given:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Conn:
    """One client connection with a receive buffer (for pipelining) and deadlines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    @classmethod
    def open(cls, host: str, port: int, *, rcvbuf: int | None = None, sndbuf: int | None = None) -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Buffer sizes must be set before connect to bound the TCP window.
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.settimeout(5.0)
        sock.connect((host, port))
        return cls(sock)

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        """Send everything; a server that already closed is not an error here (the test then
        checks what it answered before closing)."""
        self.sock.settimeout(5.0)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    # -- receiving ---------------------------------------------------------------------------

    def _fill(self, deadline: float) -> bool:
        """Receive more bytes into the buffer. False on EOF; TimeoutError at the deadline."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from the server before the deadline")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no data from the server before the deadline") from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_until(self, delimiter: bytes, deadline: float) -> bytes:
        while True:
            index = self.buf.find(delimiter)
            if index >= 0:
                return self._take(index + len(delimiter))
            if not self._fill(deadline):
                raise Closed(f"connection closed while waiting for {delimiter!r}; got {bytes(self.buf)!r}")

    def read_exact(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            if not self._fill(deadline):
                raise Closed(f"connection closed after {len(self.buf)} of {n} bytes")
        return self._take(n)

    def read_head(self, timeout: float = 3.0) -> Response:
        """Read one status line and header block (interim or final), without the body."""
        deadline = time.monotonic() + timeout
        head = self.read_until(b"\r\n\r\n", deadline)
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        status, _, reason = rest.partition(" ")
        assert version.startswith("HTTP/1."), f"not an HTTP/1.x status line: {lines[0]!r}"
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon, f"malformed response header line {line!r}"
            headers.append((name.strip().lower(), value.strip()))
        return Response(int(status), reason, version, headers, head=head)

    def read_response(self, method: str = "GET", timeout: float = 3.0) -> Response:
        """Read one response, interim (1xx) responses included, framed the way RFC 9112 §6.3
        says a client must: no body for HEAD/1xx/204/304, then chunked, then Content-Length,
        else until the server closes."""
        deadline = time.monotonic() + timeout
        resp = self.read_head(timeout)
        if method == "HEAD" or resp.status < 200 or resp.status in NO_BODY_STATUSES:
            return resp
        if resp.get("transfer-encoding") is not None:
            assert resp.has_token("transfer-encoding", "chunked"), resp.headers
            resp.chunked = True
            resp.body, resp.trailers = self._read_chunked(deadline)
        elif resp.get("content-length") is not None:
            lengths = resp.get_all("content-length")
            assert len(lengths) == 1, f"several Content-Length headers: {lengths}"
            resp.body = self.read_exact(int(lengths[0]), deadline)
        else:
            resp.body = self.read_until_close(max(deadline - time.monotonic(), 0.01))
        return resp

    def read_final_response(self, method: str = "GET", timeout: float = 3.0) -> Response:
        """Like ``read_response`` but skips interim 1xx responses."""
        deadline = time.monotonic() + timeout
        while True:
            resp = self.read_response(method, max(deadline - time.monotonic(), 0.01))
            if resp.status >= 200:
                return resp

    def _read_chunked(self, deadline: float) -> tuple[bytes, list[tuple[str, str]]]:
        body = bytearray()
        while True:
            size_line = self.read_until(b"\r\n", deadline)[:-2]
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                break
            body += self.read_exact(size, deadline)
            assert self.read_exact(2, deadline) == b"\r\n", "chunk data not followed by CRLF"
        trailers = []
        while True:
            line = self.read_until(b"\r\n", deadline)[:-2]
            if not line:
                return bytes(body), trailers
            name, _, value = line.decode("latin-1").partition(":")
            trailers.append((name.strip().lower(), value.strip()))

    def read_until_close(self, timeout: float = 3.0) -> bytes:
        """Everything the server sends until it closes; AssertionError if it stays open."""
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            raise AssertionError(
                f"server did not close the connection within {timeout} s; got {bytes(self.buf)!r}"
            ) from None
        return self._take(len(self.buf))

    def closed_within(self, timeout: float) -> bytes:
        """Alias of ``read_until_close`` that reads better in timeout tests."""
        return self.read_until_close(timeout)

    def assert_open(self, window: float = 0.05) -> None:
        """The server has neither closed the connection nor sent unexpected bytes."""
        readable, _, _ = select.select([self.sock], [], [], window)
        if readable:
            try:
                self.sock.settimeout(0.5)
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            assert data, "server closed the connection"
            raise AssertionError(f"unexpected bytes from the server: {data!r}")


def send_body(conn: Conn, total: int, sent: int = 0, stall: float | None = 0.5, limit: float = 10.0) -> int:
    """Send body bytes until ``total`` have gone, or (with ``stall``) until a send makes no
    progress for ``stall`` seconds because the server stopped reading; returns bytes sent."""
    chunk = b"x" * 65536
    conn.sock.settimeout(stall if stall is not None else limit)
    deadline = time.monotonic() + limit
    while sent < total and time.monotonic() < deadline:
        try:
            sent += conn.sock.send(chunk[: min(len(chunk), total - sent)])
        except socket.timeout:
            if stall is None:
                raise
            break
    return sent


def wait_until_stalled(progress: Callable[[], int], quiet: float = 0.3, timeout: float = 10.0) -> None:
    """Wait until ``progress()`` stops changing for ``quiet`` seconds: backpressure has reached
    the app. Fails the test if it keeps changing past ``timeout``."""
    from tests.conftest import wait_for

    last = {"value": -1, "since": time.monotonic()}

    def stalled() -> bool:
        now, value = time.monotonic(), progress()
        if value != last["value"]:
            last.update(value=value, since=now)
            return False
        return now - last["since"] > quiet

    wait_for(stalled, timeout=timeout)


def parse_responses(data: bytes) -> list[Response]:
    """Split bytes received until close into responses (for pipelining/smuggling checks)."""
    conn = Conn(socket.socket())
    conn.sock.close()
    conn.buf = bytearray(data)
    conn.eof = True
    out = []
    while conn.buf:
        out.append(conn.read_response())
    return out


# -- helpers for the inline ASGI apps -----------------------------------------------------------


async def wait_event(event: threading.Event, timeout: float = 5.0) -> bool:
    """Await a ``threading.Event`` set by the test thread, without blocking the server's loop."""
    deadline = time.monotonic() + timeout
    while not event.is_set():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def read_body(receive) -> bytes:  # type: ignore[no-untyped-def]
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client disconnected")
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body)


async def respond(send, status: int = 200, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> None:  # type: ignore[no-untyped-def]
    """Send a complete response with an explicit Content-Length."""
    all_headers = [(b"content-length", str(len(body)).encode())] + list(headers or [])
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


# -- log capture -------------------------------------------------------------------------------


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock_:
            self.records.append(record)


@contextlib.contextmanager
def capture_log(name: str = "uvworker.error") -> Iterator[list[logging.LogRecord]]:
    """Records emitted on logger ``name``, whatever its propagation settings (a handler is
    attached to the logger itself, which caplog's root handler cannot guarantee)."""
    logger = logging.getLogger(name)
    handler = _ListHandler()
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def error_tracebacks(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """The ERROR-or-worse records that carry a traceback."""
    return [r for r in records if r.levelno >= logging.ERROR and r.exc_info and r.exc_info[0] is not None]
