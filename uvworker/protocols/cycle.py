"""One HTTP request/response, shared by both parsers: scope, ASGI receive/send, framing.

Rules this module keeps:

* The request head is checked once, here (``check_head``), whichever parser read it: Host,
  Content-Length and Transfer-Encoding rules that close request-smuggling gaps, keep-alive
  and ``Expect: 100-continue``.
* Response framing is decided once, at the first body message, when both the app's headers
  and whether more body follows are known: the app's Content-Length; else a Content-Length
  of the single body message; else chunked (HTTP/1.1) or close-delimited (HTTP/1.0). HEAD,
  1xx, 204 and 304 never carry a body. The head and the first body go out in one write.
* A response that contradicts its own Content-Length closes the connection: the peer never
  sees a desynchronised stream.
* Request body is buffered up to ``BODY_HIGH_WATER``; beyond it the connection stops reading
  until the app calls ``receive()`` (backpressure). ``send()`` waits while the transport is
  paused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from uvworker.core.parsers import Headers
from uvworker.core.response import HEADER_LINES, RESP_CONNECTION, RESP_ENCODING, RESP_LENGTH, STATUS_LINES, header_line
from uvworker.errors import ClientDisconnected

if TYPE_CHECKING:
    from uvworker.protocols.http import HTTPConnection

logger = logging.getLogger("uvworker.error")

BODY_HIGH_WATER = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
NO_BODY_STATUSES = frozenset({204, 304})

LARGE_BODY = 64 * 1024  # body pieces this big are written by reference, not copied into one buffer

class RequestCycle:
    """The ASGI side of one request: ``receive`` and ``send`` for the app."""

    # Class-level defaults: a new cycle stores only what differs per request (hot path).
    chunks: list[bytes] | tuple[()] = ()
    buffered = 0
    more_body = True
    final_delivered = False
    disconnected = False
    waiter: asyncio.Future[None] | None = None
    response_started = False
    response_complete = False
    status = 0
    response_headers: Headers = []
    head = b""
    chunked = False
    remaining: int | None = None
    no_body = False
    bytes_sent = 0
    task: asyncio.Task[None] | None = None
    finished = False

    def __init__(self, conn: HTTPConnection, scope: dict[str, Any], keep_alive: bool, expect_continue: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.start_time = time.time()
        self.start_clock = time.perf_counter()

    # -- events from the connection ---------------------------------------------------
    def on_body(self, data: bytes) -> None:
        if self.response_complete or self.disconnected:
            return  # being discarded: the response is out, the rest of the body is not wanted
        if not self.chunks:
            self.chunks = []
        self.chunks.append(data)  # type: ignore[union-attr]
        self.buffered += len(data)
        if self.buffered > BODY_HIGH_WATER:
            self.conn.pause_reading()
        self._wake()

    def on_end(self) -> None:
        self.more_body = False
        if self.waiter is not None:  # most GETs end before the app asks for a body
            self._wake()

    def on_disconnect(self) -> None:
        self.disconnected = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- ASGI ---------------------------------------------------------------------------
    async def receive(self) -> dict[str, Any]:
        if self.expect_continue:
            self.expect_continue = False
            if self.more_body and not self.response_started:
                self.conn.write(CONTINUE)
        if not self.disconnected and not self.response_complete and not self.chunks:
            if self.more_body or self.final_delivered:
                if self.more_body:
                    self.conn.wait_for_body()
                self.waiter = self.conn.loop.create_future()
                await self.waiter
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = ()
        if self.buffered > BODY_HIGH_WATER:
            self.conn.resume_reading()
        self.buffered = 0
        self.final_delivered = not self.more_body
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if self.disconnected:
            if kind.startswith("http.response"):
                raise ClientDisconnected("the client has disconnected")
            raise RuntimeError(f"Unexpected ASGI message {kind!r}")
        if kind == "http.response.body" and self.response_started and not self.response_complete:
            self._send_body(message.get("body", b""), message.get("more_body", False))
            if self.conn.write_paused and not self.response_complete:
                await self.conn.drain()
        elif kind == "http.response.start" and not self.response_started:
            self._start_response(message)
        elif self.response_complete:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} after the response completed")
        else:
            raise RuntimeError(f"Unexpected ASGI message {kind!r}")

    def _start_response(self, message: dict[str, Any]) -> None:
        status = message["status"]
        if type(status) is not int or not 100 <= status <= 599:
            raise RuntimeError(f"Invalid HTTP status {status!r}")
        if status < 200:
            raise RuntimeError(f"Status {status} cannot be sent as a response; 1xx are the server's to send")
        headers = message.get("headers", ())
        conn = self.conn
        parts = [STATUS_LINES[status]]
        override_defaults = False
        lines = HEADER_LINES
        for pair in headers:
            try:
                line, kind = lines[pair]
            except (KeyError, TypeError):  # new, or not a hashable (name, value) tuple
                line, kind = header_line(*pair)
                if type(pair) is tuple:
                    if len(lines) >= 4096:
                        lines.clear()
                    lines[pair] = line, kind
            if kind:
                if kind == RESP_LENGTH:
                    self.remaining = int(pair[1])
                elif kind == RESP_CONNECTION:
                    if b"close" in pair[1].lower():
                        self.keep_alive = False
                    continue  # written by us, once
                elif kind == RESP_ENCODING:
                    continue  # framing is ours to choose
                else:
                    override_defaults = True
            parts.append(line)
        parts.insert(1, conn.state.head_defaults(headers if override_defaults else None))
        self.status = status
        self.response_headers = headers if type(headers) is list else list(headers)
        if status in NO_BODY_STATUSES:
            self.no_body = True
            self.remaining = None
        elif self.scope["method"] == "HEAD":
            self.no_body = True
        if self.expect_continue:
            # The app answered without reading the body the client may still send: close after.
            self.expect_continue = False
            self.keep_alive = False
        if not conn.keep_alive_allowed:
            self.keep_alive = False
        self.head = b"".join(parts)
        self.response_started = True

    def _send_body(self, body: bytes, more_body: bool) -> None:
        conn = self.conn
        size = len(body)
        if self.head:
            prefix, suffix = self._frame_head(size, more_body)
        elif self.no_body:
            prefix = suffix = b""
        elif self.chunked:
            prefix, suffix = (b"%x\r\n" % size, b"\r\n") if size else (b"", b"")
            if not more_body:
                suffix += b"0\r\n\r\n"
        else:
            prefix = suffix = b""
        if self.no_body:
            body = b""
        elif self.remaining is not None:
            self.remaining -= size
            if self.remaining < 0 or (not more_body and self.remaining > 0):
                self.keep_alive = False
                self.response_complete = True
                conn.abort_response(self)
                raise RuntimeError("Response body does not match the Content-Length header")
        if len(body) >= LARGE_BODY:  # by reference (writev), not copied next to its framing
            self.bytes_sent += size
            if type(body) is not bytes:
                body = bytes(body)  # the app may reuse a bytearray once send() returns
            conn.writelines((prefix, body, suffix) if suffix else (prefix, body) if prefix else (body,))
        else:
            data = prefix + body + suffix  # concatenating b"" returns the other operand as is
            if data:
                self.bytes_sent += size
                if more_body:
                    conn.write_soon(data)
                else:
                    conn.write(data)
        if not more_body:
            self.response_complete = True
            if self.waiter is not None:
                self._wake()
            conn.on_response_complete(self)

    def _frame_head(self, size: int, more_body: bool) -> tuple[bytes, bytes]:
        """Choose the framing: (head + framing of the first body bytes, what follows them)."""
        head, self.head = self.head, b""
        framing = b""
        start = suffix = b""
        if self.no_body:
            pass
        elif self.remaining is None:
            if not more_body:
                framing = b"content-length: %d\r\n" % size
            elif self.scope["http_version"] != "1.0":
                self.chunked = True
                framing = b"transfer-encoding: chunked\r\n"
                if size:
                    start, suffix = b"%x\r\n" % size, b"\r\n"
            else:
                self.keep_alive = False  # close-delimited: the end of the body is the close
        if not self.keep_alive:
            framing += b"connection: close\r\n"
        elif self.scope["http_version"] == "1.0":
            framing += b"connection: keep-alive\r\n"
        return b"%s%s\r\n%s" % (head, framing, start), suffix

    # -- running the app ----------------------------------------------------------------
    async def run_asgi(self, app: Any) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except Exception as exc:
            if isinstance(exc, ClientDisconnected) or (self.disconnected and isinstance(exc, OSError)):
                return  # the app noticed the client left: nothing to report
            logger.error("Exception in ASGI application", exc_info=exc)
            self._fail()
        except BaseException:  # cancelled, or the process is exiting: not the app's error
            self.conn.abort_response(self)
            raise
        else:
            if not self.response_complete and not self.disconnected:
                if not self.response_started:
                    logger.error("ASGI callable returned without starting a response.")
                else:
                    logger.error("ASGI callable returned without completing the response.")
                self._fail()

    def _fail(self) -> None:
        if self.disconnected or self.response_complete:
            return
        if not self.response_started or self.head:
            self.response_started = self.response_complete = True
            self.keep_alive = False
            self.status = 500
            self.conn.send_error(500, "Internal Server Error", self)
        else:
            self.response_complete = True
            self.conn.abort_response(self)
