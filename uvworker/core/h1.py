"""One HTTP/1.1 connection, sans-I/O: request bytes in, events out; response messages in, bytes out.

Rules this module keeps:

* One request at a time. Input behind a complete request (pipelining) is held by the parser
  adapter until ``next_request()``, after the response, and then delivered in order.
* Every head is checked once (``core.request``), whichever parser read it. Input that is
  refused becomes an ``on_refused(HTTPError)`` event; ``error()`` gives the answer's bytes.
* Response framing is decided once, at the first body piece, when both the app's headers and
  whether more body follows are known: the app's Content-Length; else the Content-Length of
  the single piece; else chunked (HTTP/1.1) or close-delimited (HTTP/1.0). HEAD, 204 and 304
  never carry a body. The head and the first piece leave as one write.
* A body that contradicts its declared Content-Length raises ``BodyLengthError``: when nothing
  has been written yet the client gets a 500, else the connection closes after at most the
  declared bytes. The peer never sees a desynchronised stream, and never silence.
* Extensions (advertised in every request scope, ``extensions``): pathsend, framed by the
  file's size when the app gave no Content-Length; 103 Early Hints for HTTP/1.1
  clients only (an HTTP/1.0 client could take any 1xx for the answer: dropped); trailer
  fields in the last chunk, when the client sent ``TE: trailers`` and the body is chunked
  (a body framed by Content-Length or by the close has no room for them: dropped); and on a
  connection that began with a PROXY header, ``uvworker.proxy_protocol``: what it said, and
  the peer that sent it.
* The keep-alive decision is made here, from the request (version, Connection), the response
  (the app's Connection: close, a close-delimited body, a 100-continue the app never took)
  and ``keep_alive_allowed``, which the transport clears when the server retires.

Theory of operation. The transport (``protocols.http``) moves bytes and runs timers; it calls:

    feed(data)             the PROXY header if expected, then the parser; the handler gets
                           on_request(scope) | on_upgrade(scope), on_body(data), on_end()
                           (none after a head read whole: body_complete is set at
                           on_request), on_discarded(reusable); refused input raises HTTPError
                           (``receive_data`` turns it into an on_refused(error) event)
    continue_()            the bytes of a 100 Continue, once, if the client asked for one
    start(status, headers) checks and encodes the response head (RuntimeError if invalid)
    body(data, more)       the framed bytes to write: bytes, or a tuple to write by reference
    early_hint(links)      the bytes of a 103 Early Hints (none for an HTTP/1.0 client)
    trailers(fields, ok)   the end of a body whose last piece said more: the last chunk, with
                           the trailer fields if ``ok`` (the request's TE: trailers)
    file(size, more)       the framing around a file sent as the body (pathsend)
    error(status, reason)  a whole answer of the server's own, with Connection: close
    after                  set by the last body piece: NEXT, CLOSE, or DISCARD (the app left
                           request body unread: it is read and dropped, bounded, and
                           on_discarded says whether the connection can be reused)
    next_request()         the next request may start: held input is delivered now (raises
                           HTTPError for a refused one; the hot path calls parser.next_cycle)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from uvworker.core.parsers import Headers, Limits, make_parser
from uvworker.core.request import ASGI_VERSION, ScopeTemplate, check_head, check_version, scope_template
from uvworker.core.response import (
    HEADER_LINES, RESP_CONNECTION, RESP_ENCODING, RESP_LENGTH, STATUS_LINES, HeadDefaults, error_response,
    header_line,
)
from uvworker.errors import HTTPError

if TYPE_CHECKING:
    from uvworker.proxy import TrustedHosts

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\n"
# scope["extensions"] of an HTTP/1.1 request, and of an HTTP/1.0 one (copied for each request).
EXTENSIONS = {"http.response.pathsend": {}, "http.response.early_hint": {}, "http.response.trailers": {}}
EXTENSIONS_10: dict[str, dict[str, Any]] = {"http.response.pathsend": {}}
NO_BODY_STATUSES = frozenset({204, 304})
LARGE_BODY = 64 * 1024  # body pieces this big are written by reference, not copied next to framing
MAX_DISCARD = 4 * 1024 * 1024  # unread request body dropped to keep a connection, at most
NEXT, CLOSE, DISCARD = range(3)  # what finish() says the connection does next
# H1Core._checked before any head, and after the first (nothing kept: see on_head).
NO_HEAD: tuple[str, Headers, Any] = ("", [], None)
FIRST_HEAD: tuple[str, Headers, Any] = ("", [], None)
# The verdicts check_head gives heads without an upgrade, one tuple each, for kept verdicts to share.
VERDICTS = {(k, e, None, p): (k, e, None, p) for k in (True, False) for e in (True, False) for p in (True, False)}


class Handler(Protocol):
    """The events a connection's core produces (the transport implements them). A request is
    ``on_request`` (or ``on_upgrade``), its body's pieces and ``on_end``; or ``on_request``
    alone when the core's ``body_complete`` is already true then (a bodiless head read whole)."""

    def on_request(self, scope: dict[str, Any]) -> None: ...
    def on_upgrade(self, scope: dict[str, Any]) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_end(self) -> None: ...
    def on_refused(self, error: HTTPError) -> None: ...
    def on_discarded(self, reusable: bool) -> None: ...


class BodyLengthError(RuntimeError):
    """The app's body does not match its Content-Length. ``data`` is what may still be written
    (at most the declared bytes) when the head is already out (``committed``)."""

    def __init__(self, committed: bool, data: bytes | tuple[bytes, ...] = b"") -> None:
        super().__init__("Response body does not match the Content-Length header")
        self.committed = committed
        self.data = data


@dataclass(frozen=True)
class H1Options:
    """What the core needs from the settings (one object per server, shared by connections)."""

    parser: str = "h11"
    limits: Limits = field(default_factory=lambda: Limits(8190, 100, 8190))
    root_path: str = ""
    proxy_headers: bool = False  # apply X-Forwarded-* / Forwarded from trusted peers
    forwarded_allow: TrustedHosts | None = None
    proxy_protocol: bool = False  # expect a PROXY protocol header from proxy_allow peers
    proxy_allow: TrustedHosts | None = None
    websocket: bool = True  # hand WebSocket upgrade requests to on_upgrade
    keep_alive: bool = True  # False: every response closes the connection
    lifespan_state: dict[str, Any] = field(default_factory=dict)


class H1Core:
    # Slots: one block per connection (a compact values array is a second, 50 bytes more),
    # and no limit of 30 names as for the keys instances share (see RequestCycle.__init__).
    __slots__ = (
        "options", "handler", "defaults", "client", "server", "scheme", "keep_alive", "keep_alive_allowed", "head",
        "chunked", "remaining", "no_body", "http10", "head_method", "expect_continue", "body_complete", "discarding",
        "discarded", "after", "last_request", "extensions", "extensions_10", "parser", "proxy_buffer",
        "_trust_proxy_headers", "_template", "_checked", "__weakref__",  # (tests check that cores are freed)
    )

    def __init__(
        self, options: H1Options, handler: Handler, defaults: HeadDefaults,
        client: tuple[str, int | None] | None, server: tuple[str, int | None] | None, scheme: str,
    ) -> None:
        self.options = options
        self.handler = handler
        self.defaults = defaults
        self.client = client
        self.server = server
        self.scheme = scheme
        self.keep_alive = True
        self.keep_alive_allowed = options.keep_alive
        # The per-response state, all of it set here (a slot never set raises AttributeError).
        self.head = b""  # the response head, until the first body piece takes it
        self.chunked = False
        self.remaining: int | None = None  # Content-Length bytes still to come
        self.no_body = False
        self.http10 = False
        self.head_method = False
        self.expect_continue = False
        self.body_complete = True  # the request body has been read to its end
        self.discarding = False
        self.discarded = 0
        self.after = NEXT  # what the connection does once the response is complete
        self.last_request = False  # the client said this request is its last (Connection: close, HTTP/1.0)
        # Per connection (the transport adds "tls" on a TLS connection), copied for each request.
        self.extensions = EXTENSIONS
        self.extensions_10 = EXTENSIONS_10
        self.parser = make_parser(options.parser, self, options.limits)
        # A PROXY header still to come (or its part read so far); None: none expected (any more).
        self.proxy_buffer: bytes | None = b"" if options.proxy_protocol else None
        self._trust_proxy_headers = options.proxy_headers and self._trusted(client)
        # What the scopes of the connection's requests share, but the client, and the scopes of
        # the request lines they repeat: shared with other connections (scope_template), from
        # the first head on (after a PROXY header).
        self._template: ScopeTemplate = None  # type: ignore[assignment]
        # The version and fields of the last head whose checks passed (a copy: the app may
        # change its scope's list), and what check_head said of it: a client sends the same
        # fields again and again on one connection, and a comparison costs a tenth of the
        # checks.
        self._checked: tuple[str, Headers, tuple[bool, bool, bytes | None, bool]] = NO_HEAD

    # -- bytes in -----------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """The PROXY header if one is expected, then the parser; raises HTTPError for input
        that is refused. (The transport calls the parser's feed itself once the header is
        behind it: no call of this, nor a bound method kept per connection.)"""
        if self.proxy_buffer is not None:
            data = self.strip_proxy_header(data)
            if not data:
                return
        self.parser.feed(data)

    def receive_data(self, data: bytes) -> None:
        """``feed``, with a refusal delivered as the handler's ``on_refused`` event."""
        try:
            self.feed(data)
        except HTTPError as exc:
            self.handler.on_refused(exc)

    def strip_proxy_header(self, data: bytes) -> bytes:
        """The bytes after the PROXY header, if one is expected: b"" while it is incomplete
        (``proxy_buffer`` is not None) or when it is refused (``on_refused`` has been called)."""
        if self.proxy_buffer is None:
            return data
        return self._read_proxy_header(data)

    def next_request(self) -> None:
        """The response is out: deliver held (pipelined) input, up to the next request's end."""
        self.parser.next_cycle()

    def detach(self) -> None:
        """The connection is gone: drop the references back to the handler and those between
        the parser's objects. Each is a reference cycle, which only the cyclic collector
        frees; without them the connection's objects go as soon as the transport lets go."""
        del self.handler
        self.parser.detach()

    @property
    def holding_input(self) -> bool:
        """Input for a later request waits in the parser: the transport should stop reading."""
        return self.parser.holding_input

    @property
    def client_finished(self) -> bool:
        """The client said this request is its last and all it sent has been read (the whole
        body, nothing behind it): no more input is due, so closing at once resets nothing."""
        return self.last_request and self.body_complete and not self.parser.holding_input

    @property
    def trailing_data(self) -> bytes:
        """Bytes read past an upgrade request: the first bytes of the other protocol."""
        return self.parser.trailing_data

    # -- parser events (the adapters' sink) ----------------------------------------------------------
    def on_head(self, method: bytes, target: bytes, http_version: str, headers: Headers, complete: bool) -> None:
        if http_version != "1.1" and http_version != "1.0":
            http_version = check_version(http_version)
        checked = self._checked
        options = self.options
        if http_version == checked[0] and headers == checked[1]:
            keep_alive, expect, upgrade, proxied = checked[2]
        else:  # check_head is a function of these two alone
            verdict = check_head(http_version, headers)
            keep_alive, expect, upgrade, proxied = verdict
            if checked is NO_HEAD:
                # The connection's first head: a connection may serve just one request (and
                # then idle or close), so it keeps no verdict of it; from the second on it does.
                self._checked = FIRST_HEAD
                self._template = scope_template(self.server, self.scheme, options.root_path)
            else:
                self._checked = http_version, headers.copy(), VERDICTS.get(verdict, verdict)
        template = self._template
        kept = template.lines.get(target)
        if kept is not None and kept[0] == method and kept[1] == http_version:
            # The scope of this request line, kept (most requests repeat one): as the
            # template's scope() makes it, inline (a call with its arguments costs ~1k).
            scope = kept[2].copy()
            scope["client"] = self.client
            scope["asgi"] = ASGI_VERSION.copy()
            scope["headers"] = headers
            scope["state"] = options.lifespan_state.copy()
        else:
            scope = template.scope(self.client, method, target, http_version, headers, options.lifespan_state)
        if proxied and self._trust_proxy_headers:
            from uvworker.proxy import apply_proxy_headers

            apply_proxy_headers(scope, options.forwarded_allow)  # type: ignore[arg-type]
        self.keep_alive = keep_alive and self.keep_alive_allowed
        if not keep_alive:  # the client's last request: the connection closes after it anyway
            self.last_request = True
        self.expect_continue = expect
        self.body_complete = complete  # true: no on_end follows, for us or the handler
        self.http10 = http10 = http_version == "1.0"
        scope["extensions"] = self.extensions_10.copy() if http10 else self.extensions.copy()
        self.head_method = method == b"HEAD"
        self.remaining = None
        if self.chunked or self.no_body:
            self.chunked = self.no_body = False
        # `is not None` first: None == bytes is a generic comparison (~140 instructions).
        if (upgrade is not None and upgrade == b"websocket" and options.websocket and method == b"GET"
                and http_version == "1.1"):
            self.handler.on_upgrade(scope)
        else:
            self.handler.on_request(scope)

    def on_fields_kept(self, headers: Headers) -> None:
        """The adapter keeps the fields of the head just delivered as ``headers``: a list no
        one changes, shared by the connections that sent the same fields, whose copies it
        delivers for the heads that repeat them. The verdict kept for those fields keeps that
        list too: a later head's then compares item by item by identity, with objects that
        many connections touch (in the CPU's caches), none of this connection's own."""
        checked = self._checked
        if checked[2] is not None and checked[1] == headers:
            # One kept verdict for every connection that shares these fields: a tuple of each
            # core's own is one more cold object for each of its requests (callgrind, uvloop,
            # 1024 connections: 2.2 L2 misses a request).
            key = checked[0], id(headers)  # (the tuple kept holds the list: its id is not reused)
            shared = _kept_verdicts.get(key)
            if shared is None or shared[1] is not headers:
                if len(_kept_verdicts) >= KEPT_VERDICTS:
                    _kept_verdicts.clear()
                shared = _kept_verdicts[key] = checked[0], headers, checked[2]
            self._checked = shared

    def on_body(self, data: bytes) -> None:
        if self.discarding:
            self.discarded += len(data)
            if self.discarded > MAX_DISCARD:
                self.discarding = False
                self.handler.on_discarded(False)
            return
        self.handler.on_body(data)

    def on_end(self) -> None:
        self.body_complete = True
        if self.discarding:
            self.discarding = False
            self.handler.on_discarded(True)
        else:
            self.handler.on_end()

    # -- response bytes out ----------------------------------------------------------------------
    def continue_(self) -> bytes:
        """``100 Continue``, once, for a client that asked with ``Expect: 100-continue``."""
        if self.expect_continue and not self.body_complete:
            self.expect_continue = False
            return CONTINUE
        return b""

    def start(self, status: int, headers: Any) -> None:
        """Check and encode the response head; it goes out with the first body piece."""
        sent = _last_response
        if headers == sent[0]:  # the same fields as the last response (often the same list)
            lines, length, close, override_defaults = sent[1]
        else:
            lines, length, close, override_defaults = self._header_lines(headers)
        if length is not None:
            self.remaining = length
        if close:
            self.keep_alive = False
        if status in NO_BODY_STATUSES:
            self.no_body = True
            self.remaining = 0
            if status == 204 and length is not None:  # RFC 9110 §8.6: none in a 204 (a 304 may say the GET's)
                lines = self._header_lines([pair for pair in headers if pair[0].lower() != b"content-length"])[0]
        elif self.head_method:
            self.no_body = True
        if self.expect_continue and not self.body_complete:
            # Answered without taking the body the client may still send: close after.
            self.expect_continue = False
            self.keep_alive = False
        if not self.keep_alive_allowed:
            self.keep_alive = False
        defaults = self.defaults.without(headers) if override_defaults else self.defaults.encoded
        if self.remaining is None:
            end = b""  # the framing is chosen at the first body piece (_frame_head)
        # Framed by Content-Length (or bodiless by status): nothing the body does can change
        # the head now, so it is finished here, in the same join (body() takes it as is).
        elif not self.keep_alive:
            end = b"connection: close\r\n\r\n"
        elif self.http10:
            end = b"connection: keep-alive\r\n\r\n"
        else:
            end = b"\r\n"
        # The head is a function of its four parts: the last one is kept (per process, as the
        # header lines are), found again by identity while the parts are the same objects
        # (the lines of the same fields, the defaults until the Date changes). The join costs
        # ~1.2k instructions, these comparisons ~0.2k.
        global _last_head
        last = _last_head
        if status == last[0] and defaults is last[1] and lines is last[2] and end is last[3]:
            self.head = last[4]
        else:
            head = self.head = b"".join((STATUS_LINES[status], defaults, lines, end))
            _last_head = status, defaults, lines, end, head

    def _header_lines(self, headers: Any) -> tuple[bytes, int | None, bool, bool]:
        """The app's response fields, checked: (their lines, the Content-Length or None, whether
        Connection says close, whether one replaces a default). Kept for the next response
        (``start``) when every pair is a hashable tuple, which no app can change once sent, in
        a list, which is copied: kept per process, not per connection, as an app sends the
        same headers to every client (a connection keeps no bytes for it, and a connection's
        first response finds them too)."""
        lines = HEADER_LINES
        parts = []
        length = None
        close = override_defaults = False
        cacheable = type(headers) is list
        for pair in headers:
            try:
                line, kind, value = lines[pair]
            except (KeyError, TypeError):  # new, or not a hashable (name, value) tuple
                line, kind = header_line(*pair)
                value = int(pair[1]) if kind == RESP_LENGTH else 0
                if type(pair) is tuple:
                    if len(lines) >= 4096:
                        lines.clear()
                    lines[pair] = line, kind, value
                else:
                    cacheable = False
            if kind:
                if kind == RESP_LENGTH:
                    length = value
                elif kind == RESP_CONNECTION:
                    if pair[1].lower().find(b"close") >= 0:
                        close = True
                    continue  # written by us, once
                elif kind == RESP_ENCODING:
                    continue  # framing is ours to choose
                else:
                    override_defaults = True
            parts.append(line)
        result = b"".join(parts), length, close, override_defaults
        if cacheable:
            global _last_response
            _last_response = headers.copy(), result
        return result

    def body(self, body: bytes, more: bool) -> bytes | tuple[bytes, ...]:
        """The bytes that carry ``body``: one buffer, or pieces for a large one (by reference)."""
        size = len(body)
        head = self.head
        remaining = self.remaining
        if not more:
            self.after = NEXT if self.keep_alive and self.body_complete else CLOSE if not self.keep_alive else DISCARD
            if size == remaining and head and not self.no_body and size < LARGE_BODY:
                self.head, self.remaining = b"", 0  # the whole body, as start() framed it
                return head + body
        if head:
            if remaining is None:
                prefix, suffix = self._frame_head(size, more)
            elif self.no_body or not (size > remaining or (not more and size < remaining)):
                prefix, suffix, self.head = head, b"", b""  # as start() finished it
            else:
                prefix = suffix = b""  # the wrong length: nothing goes out (a 500, below)
        elif self.chunked and not self.no_body:
            prefix, suffix = (b"%x\r\n" % size, b"\r\n") if size else (b"", b"")
            if not more:
                suffix += b"0\r\n\r\n"
        else:
            prefix = suffix = b""
        if self.no_body:
            return prefix
        if remaining is not None:
            self.remaining = remaining - size
            if size > remaining or (not more and size < remaining):
                self.keep_alive = False
                self.after = CLOSE
                if not prefix and self.head:  # nothing at all is out: the caller answers 500
                    raise BodyLengthError(False)
                raise BodyLengthError(not self.head, prefix + body[:remaining])
        if size >= LARGE_BODY:  # by reference (writev), not copied next to its framing
            if type(body) is not bytes:
                body = bytes(body)  # the app may reuse a bytearray once send() returns
            return (prefix, body, suffix) if suffix else (prefix, body) if prefix else (body,)
        return prefix + body + suffix  # concatenating b"" returns the other operand as is

    def early_hint(self, links: list[bytes]) -> bytes:
        """A 103 Early Hints (RFC 8297) with one Link field per value, for an HTTP/1.1 client;
        nothing for an HTTP/1.0 one (RFC 9110 §15.2: no 1xx to a 1.0 client)."""
        if self.http10:
            return b""
        return b"%s%s\r\n" % (EARLY_HINTS, b"".join(b"link: %s\r\n" % link for link in links))

    def trailers(self, fields: Any, accepted: bool) -> bytes:
        """The last chunk of a response whose last body piece said ``more`` (the app announced
        trailers), with ``fields`` (checked like header lines) when the client accepts them;
        nothing when the body is framed by Content-Length or by the close. The message then
        ends as after any body: with a last, empty piece (``body(b"", False)``)."""
        if not self.chunked or self.no_body:
            return b""
        self.chunked = False  # the last chunk is out: the empty last piece adds no framing
        if not accepted or not fields:
            return b"0\r\n\r\n"
        return b"0\r\n%s\r\n" % b"".join(header_line(*pair)[0] for pair in fields)

    def file(self, size: int, more: bool) -> tuple[bytes, bytes]:
        """The framing around a file of ``size`` bytes sent as the whole body (pathsend): (the
        head and what precedes the file's bytes, what follows them). The app's Content-Length
        must be ``size`` (else BodyLengthError, nothing is out: a 500); without one the file's
        size is the Content-Length, for HEAD as for GET. With ``more`` (trailers follow) the
        file is one chunk of a chunked body. The message then ends as after any body: with a
        last, empty piece (``body(b"", False)``), or the trailers first."""
        remaining = self.remaining
        if remaining is None:
            if self.head_method and not more:
                self.head += b"content-length: %d\r\n" % size  # what a GET would get
        elif remaining != size and not self.no_body:
            self.keep_alive = False
            self.after = CLOSE
            raise BodyLengthError(False)
        prefix, suffix = self._frame_head(size, more)
        if self.no_body:
            return prefix, b""
        if remaining is not None:
            self.remaining = 0
        return prefix, suffix

    def _frame_head(self, size: int, more: bool) -> tuple[bytes, bytes]:
        """Choose the framing: (head + framing of the first body bytes, what follows them)."""
        head, self.head = self.head, b""
        framing = start = suffix = b""
        remaining = self.remaining
        if remaining is not None:  # start() finished the head (file() checked the size)
            return head, b""
        if self.no_body:
            pass
        elif remaining is None:
            if not more:
                framing = b"content-length: %d\r\n" % size
            elif not self.http10:
                self.chunked = True
                framing = b"transfer-encoding: chunked\r\n"
                if size:
                    start, suffix = b"%x\r\n" % size, b"\r\n"
            else:
                self.keep_alive = False  # close-delimited: the end of the body is the close
        if not self.keep_alive:
            framing += b"connection: close\r\n"
        elif self.http10:
            framing += b"connection: keep-alive\r\n"
        return head + framing + b"\r\n" + start, suffix  # + b"" costs nothing

    def error(self, status: int, reason: str, extra: bytes = b"") -> bytes:
        """A whole plain-text answer of the server's own; the connection closes after it."""
        self.keep_alive = False
        self.after = CLOSE
        self.head = b""
        return error_response(status, reason, self.defaults.encoded, extra)

    def discard_body(self) -> None:
        """``after`` said DISCARD: what is left of the request body is read and dropped."""
        self.discarding = True
        self.discarded = 0

    # -- the connection's addresses ----------------------------------------------------------------
    def _trusted(self, address: tuple[str, int | None] | None) -> bool:
        host = address[0] if address else None
        allow = self.options.forwarded_allow
        return allow is None or host in allow

    def _read_proxy_header(self, data: bytes) -> bytes:
        from uvworker.proxy import (
            PROXY_EXTENSION, V1_PREFIX, V2_SIGNATURE, ProxyProtocolError, parse_proxy_protocol, proxy_extension,
        )

        buffer = self.proxy_buffer + data  # type: ignore[operator]
        if not (V1_PREFIX.startswith(buffer[:6]) or V2_SIGNATURE.startswith(buffer[:12])):
            self.proxy_buffer = None
            return buffer
        host = self.client[0] if self.client else None
        allow = self.options.proxy_allow
        try:
            if allow is not None and host is not None and host not in allow:
                raise ProxyProtocolError("PROXY header from a peer not in proxy_allow_ips")
            info = parse_proxy_protocol(buffer)
        except ProxyProtocolError as exc:
            self.proxy_buffer = None
            self.handler.on_refused(HTTPError(400, f"Invalid PROXY protocol header: {exc}"))
            return b""
        if info is None:
            self.proxy_buffer = buffer
            return b""
        self.proxy_buffer = None
        if info.client is not None:
            extension = {PROXY_EXTENSION: proxy_extension(self.client, info)}  # the peer, for Gunicorn's hooks
            self.extensions, self.extensions_10 = {**self.extensions, **extension}, {**self.extensions_10, **extension}
            self.client = info.client
            self.server = info.server or self.server
            self._trust_proxy_headers = self.options.proxy_headers and self._trusted(self.client)
        return buffer[info.consumed :]


# The verdicts kept for fields an adapter keeps (H1Core.on_fields_kept): (version, id of the
# fields' list) -> (version, that list, check_head's verdict), shared by the cores; bounded.
KEPT_VERDICTS = 256
_kept_verdicts: dict[tuple[str, int], tuple[str, Headers, tuple[bool, bool, bytes | None, bool]]] = {}

# The fields of the last response whose pairs were all tuples, in a list (a copy), and what
# H1Core._header_lines made of them.
_last_response: tuple[list[Any] | None, tuple[bytes, int | None, bool, bool]] = (None, (b"", None, False, False))
# The last head H1Core.start made, and its parts: (status, defaults, lines, end, head).
_last_head: tuple[int, bytes, bytes, bytes, bytes] = (0, b"", b"", b"", b"")
