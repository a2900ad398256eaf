"""The two HTTP/1.1 parsers behind one small event vocabulary.

An adapter tokenizes bytes and calls its sink (the connection) with exactly three events:

    sink.on_head(method, target, http_version, headers)   request line + header block
    sink.on_body(data)                                    a piece of the request body
    sink.on_end()                                         the request is complete

or raises :class:`HTTPError` for input it cannot accept. Headers arrive as a list of
``(lowercased name, value)`` byte pairs with surrounding whitespace trimmed. Everything after
that — validation, framing decisions, limits on individual fields, the ASGI cycle — is shared
and lives in ``request.py``, ``response.py`` and the request cycle.

Pipelining is the adapter's job too: once a request is complete, further input is *held*
(not parsed into events) until the connection calls :meth:`next_cycle` after its response.
h11 does that natively (``PAUSED``); for httptools, which parses everything it is fed, the
adapter records later events and replays them. ``held`` tells the connection to stop reading.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import h11

from uvworker.errors import HTTPError

Headers = list[tuple[bytes, bytes]]


class Sink(Protocol):
    def on_head(self, method: bytes, target: bytes, http_version: str, headers: Headers) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_end(self) -> None: ...


class Limits:
    """The request-size limits both adapters enforce while bytes arrive."""

    __slots__ = ("request_line", "fields", "field_size", "head", "h11_head")

    def __init__(self, request_line: int, fields: int, field_size: int, h11_head: int | None = None) -> None:
        self.request_line = request_line
        self.fields = fields
        self.field_size = field_size
        # Bound on a whole header block held in memory while it arrives. Individual limits are
        # checked per field; this only stops a slow client from making us buffer without end.
        self.head = min(request_line + 2 + fields * (field_size + 2) + 2, 128 * 1024)
        # h11's max_incomplete_event_size (--h11-max-incomplete-event-size), for h11 only.
        self.h11_head = h11_head or self.head


class HttptoolsAdapter:
    """httptools (llhttp) callbacks → sink events, with replay for pipelined input."""

    def __init__(self, sink: Sink, limits: Limits) -> None:
        import httptools

        self._httptools = httptools
        self.sink = sink
        self.limits = limits
        self.parser = httptools.HttpRequestParser(self)
        self.held = False
        self._replay: list[tuple[Any, ...]] = []
        self._url: bytes = b""
        self._headers: Headers = []
        self._head_bytes = 0
        self._in_head = True
        self._unparsed = b""  # bytes after an Upgrade request, parsed on the next cycle

    # -- driving ------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.head and not self.held:
                self._fail(HTTPError(431, "Request header fields too large"))
                return
        try:
            self.parser.feed_data(data)
        except self._httptools.HttpParserUpgrade as exc:
            # llhttp stops at the end of an Upgrade request; keep the rest as ordinary input
            # (uvworker answers such a request itself or hands the bytes to a WebSocket).
            self._unparsed += data[exc.args[0] :]
        except self._httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, HTTPError):
                raise exc.__context__ or exc  # a bug in the sink, not bad input
            self._fail(exc.__context__)
        except self._httptools.HttpParserError as exc:
            self._fail(_bad(exc))

    def _fail(self, error: HTTPError) -> None:
        if self.held:
            self._replay.append((self._raise, error))
        else:
            raise error

    @staticmethod
    def _raise(error: HTTPError) -> None:
        raise error

    def next_cycle(self) -> None:
        """The current response is done: deliver the held input, stopping at the next request."""
        self.held = False
        self._head_bytes = 0
        replay = self._replay
        while replay and not self.held:
            call, *args = replay.pop(0)
            call(*args)
        if self._unparsed and not self.held:
            data, self._unparsed = self._unparsed, b""
            self.feed(data)

    @property
    def trailing_data(self) -> bytes:
        """Unparsed bytes after an Upgrade request (the start of another protocol)."""
        return self._unparsed

    @property
    def holding_input(self) -> bool:
        """Input for a later request is waiting: the connection should stop reading."""
        return self.held and bool(self._replay or self._unparsed)

    # -- httptools callbacks --------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.request_line:  # early guard; exact check at the head's end
            raise HTTPError(414, "Request-URI too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field: tolerated, not passed on
        headers = self._headers
        limits = self.limits
        if len(headers) >= limits.fields:
            raise HTTPError(431, "Too many request header fields")
        if len(name) + len(value) + 2 > limits.field_size:
            raise HTTPError(431, "Request header field too large")
        headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        # The next head starts afresh (no on_message_begin callback: one call less a request).
        url, headers = self._url, self._headers
        self._url, self._headers = b"", []
        self._in_head = False
        self._head_bytes = 0
        parser = self.parser
        method = parser.get_method()
        if len(method) + len(url) + 10 > self.limits.request_line:
            raise HTTPError(414, "Request-URI too long")
        if self.held:
            self._replay.append((self.sink.on_head, method, url, parser.get_http_version(), headers))
        else:
            self.sink.on_head(method, url, parser.get_http_version(), headers)

    def on_body(self, body: bytes) -> None:
        if self.held:
            self._replay.append((self.sink.on_body, body))
        else:
            self.sink.on_body(body)

    def on_message_complete(self) -> None:
        self._in_head = True  # parse-time state: what follows is the next head
        if self.held:
            self._replay.append((self._complete,))
        else:  # _complete(), inlined: this runs once a request
            self.held = True
            self.sink.on_end()

    def _complete(self) -> None:
        self.held = True  # anything after this belongs to the next request
        self.sink.on_end()


def _bad(exc: BaseException) -> HTTPError:
    return HTTPError(400, f"Invalid HTTP request: {exc}")


class H11Adapter:
    """h11 events → sink events. h11 holds pipelined input itself (PAUSED)."""

    def __init__(self, sink: Sink, limits: Limits) -> None:
        self.sink = sink
        self.limits = limits
        self.held = False
        self.conn = self._new_connection()
        self._head = bytearray()  # raw head bytes: h11 merges repeated Content-Length; we refuse them

    def _new_connection(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.h11_head)

    def feed(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and len(self._head) < self.limits.head:
            self._head += data
        self.conn.receive_data(data)
        if not self.held:
            self._pump()

    def next_cycle(self) -> None:
        # Our responses never pass through h11 (the shared cycle frames them), so rather than
        # walking h11's server-side states we start a fresh h11 connection on the unparsed bytes.
        data, closed = self.conn.trailing_data
        self.conn = self._new_connection()
        self.held = False
        self._head = bytearray(data[: self.limits.head])
        if data:
            self.conn.receive_data(data)
        if closed:
            self.conn.receive_data(b"")
        self._pump()

    @property
    def trailing_data(self) -> bytes:
        return self.conn.trailing_data[0]

    @property
    def holding_input(self) -> bool:
        return self.held and bool(self.conn.trailing_data[0])

    def _pump(self) -> None:
        conn, sink = self.conn, self.sink
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._error(exc) from None
            kind = type(event)
            if kind is h11.Data:
                sink.on_body(bytes(event.data))
            elif kind is h11.Request:
                headers = list(event.headers)
                self._check_limits(event.method, event.target, headers)
                sink.on_head(event.method, event.target, event.http_version.decode(), headers)
            elif kind is h11.EndOfMessage:
                self.held = True
                sink.on_end()
                return
            else:  # NEED_DATA, PAUSED, ConnectionClosed: nothing more to deliver now
                return

    def _check_limits(self, method: bytes, target: bytes, headers: Headers) -> None:
        """What httptools' adapter checks as the head arrives; h11 gives us the whole head."""
        limits = self.limits
        head, self._head = self._head, bytearray()
        if len(method) + len(target) + 10 > limits.request_line:
            raise HTTPError(414, "Request-URI too long")
        if len(headers) > limits.fields:
            raise HTTPError(431, "Too many request header fields")
        for name, value in headers:
            if len(name) + len(value) + 2 > limits.field_size:
                raise HTTPError(431, "Request header field too large")
            if name == b"content-length":
                _check_raw_content_length(head)

    def _error(self, exc: h11.RemoteProtocolError) -> HTTPError:
        if exc.error_status_hint == 431:
            data = self.conn.trailing_data[0]
            end = data.find(b"\n")
            if end == -1 or end > self.limits.request_line:
                return HTTPError(414, "Request-URI too long")
            return HTTPError(431, "Request header fields too large")
        return HTTPError(400, f"Invalid HTTP request: {exc}")  # h11 says 501 for TE; RFC 9112 §6.1 allows 400


_CONTENT_LENGTH = re.compile(rb"\r?\ncontent-length[ \t]*:([^\r\n]*)", re.IGNORECASE)


def _check_raw_content_length(data: bytearray) -> None:
    end = data.find(b"\r\n\r\n")
    values = _CONTENT_LENGTH.findall(data, 0, end if end != -1 else len(data))
    if len(values) > 1 or (values and b"," in values[0]):
        raise HTTPError(400, "Duplicate Content-Length")


def make_parser(name: str, sink: Sink, limits: Limits) -> HttptoolsAdapter | H11Adapter:
    return HttptoolsAdapter(sink, limits) if name == "httptools" else H11Adapter(sink, limits)
