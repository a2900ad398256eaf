"""The two HTTP/1.1 parsers behind one small event vocabulary, and the rules they both keep.

An adapter turns bytes into exactly three sink events:

    sink.on_head(method, target, http_version, headers, complete)
                                                          request line + header block
    sink.on_body(data)                                    a piece of the request body
    sink.on_end()                                         the request is complete

A request is ``on_head`` with ``complete`` false, its body's pieces and ``on_end``; or, for a
bodiless head the adapter knows to be whole when it delivers it (the repeat path, below),
``on_head`` with ``complete`` true alone: the same request in one event, a call less.

or raises :class:`HTTPError` for input it refuses (the connection answers with its status and
closes). Headers arrive as ``(lowercased name, value)`` byte pairs, values without surrounding
whitespace; ``http_version`` is "1.0" or "1.1" (the version the request is served as).

Agreement. A front-end proxy that reads a request differently from the server behind it is
how request smuggling starts, so httptools (llhttp) and h11 must read every byte stream the
same way. Each class of input has one decision, enforced for both parsers:

    class of input                                  decision                 reference
    ----------------------------------------------  -----------------------  --------------------
    empty lines (CRLF) before the request line      skipped, any number      RFC 9112 §2.2
    bare LF or bare CR anywhere in a head           400                      RFC 9112 §2.2
    first byte of a request not a token character   400 at once (TLS, ...)   RFC 9112 §3
    request line over limit_request_line            414                      RFC 9112 §3
    more fields than limit_request_fields, a field
      line over limit_request_field_size, or a
      head over limit_request_head                  431                      RFC 6585 §5
    request line not exactly three parts joined by
      one SP (HTAB, two SP, trailing SP, the
      HTTP/0.9 form ``GET /``)                      400                      RFC 9112 §3
    protocol not ``HTTP/d.d`` (``RTSP/1.0``,
      ``ICE/1.0``, ``http/1.1``, ``HTTP/1``)        400                      RFC 9112 §2.3
    HTTP/1.x with x > 1                             served as HTTP/1.1       RFC 9110 §2.5
    HTTP/0.x, HTTP/2.0 and up in HTTP/1 syntax
      (the HTTP/2 preface ``PRI * HTTP/2.0``)       505                      RFC 9110 §15.6.6
    method not a token                              400                      RFC 9110 §9.1
    method a token llhttp does not know
      (``PROPFOO``, lowercase ``get``, ``PRI``)     501                      RFC 9110 §9.1
    CONNECT                                         501 (no tunnels)         RFC 9110 §9.3.6
    request-target bytes outside VCHAR              400                      RFC 9112 §3.2
    target not origin-form, absolute-form
      (http/https, with a host, no userinfo) or
      ``*`` with OPTIONS (``a:80``, ``ftp://a/``,
      ``http://u@a/``, ``GET *``)                   400                      RFC 9112 §3.2,
                                                                             RFC 9110 §4.2.4
    ``#fragment`` in the target                     dropped: never in path
                                                    or query_string          RFC 9110 §7.1
    absolute-form target                            its authority is Host
                                                    (Host ignored, as told) RFC 9112 §3.2.2
    Host outside uri-host [":" port] (``a b/c``,
      ``a@b``, ``a:b``); empty Host is valid        400                      RFC 9112 §3.2,
                                                                             RFC 9110 §7.2
    no Host, or two, in HTTP/1.1                    400                      RFC 9112 §3.2
    field name not a token (NUL, DEL, 8-bit, ``"``,
      empty), whitespace before the colon, a line
      without a colon                               400                      RFC 9112 §5.1
    obsolete line folding (a line starting with SP
      or HTAB), also before the first field         400                      RFC 9112 §5.2
    control bytes other than HTAB in a value (NUL,
      DEL, bare CR, VT, ...); obs-text (0x80-0xFF)
      is kept                                       400                      RFC 9110 §5.5
    a second Content-Type, Authorization,
      Proxy-Authorization, Origin, Referer, Range,
      If-Range, If-(Un)Modified-Since or
      Max-Forwards with another value               400                      RFC 9110 §5.3
    Content-Length not 1 to 19 digits (``+5``,
      ``5,5``, ``5 5``, ``0x5``, empty; OWS around
      it is fine, leading zeros too)                400                      RFC 9110 §8.6
    two Content-Length fields, even equal           400                      RFC 9112 §6.3
    Content-Length with Transfer-Encoding           400                      RFC 9112 §6.1
    Transfer-Encoding in an HTTP/1.0 request        400                      RFC 9112 §6.1
    chunked listed twice (one field or two)         400                      RFC 9112 §6.1
    codings other than exactly ``chunked`` (gzip,
      identity, ``gzip, chunked``, ``chunked;x``,
      unknown); ``Chunked`` is chunked              501                      RFC 9112 §6.1
    chunk size not 1*HEXDIG (``-5``, ``0x5``, empty)
      or above 16 hex digits after leading zeros    400                      RFC 9112 §7.1
    whitespace anywhere in a chunk line (``0 ``,
      ``5 ;a=b``, ``5; a``, ``5;a = b``)            400 (BWS refused: each
                                                    reader skips it its own
                                                    way)                     RFC 9112 §7.1.1
    chunk extension not ``;token[=token|quoted]``
      (``5;``, ``5;;``, ``5;=x``, ``5;a=``,
      ``5;a="b"c``, bytes outside the grammar)      400                      RFC 9112 §7.1.1
    bare CR or bare LF in a chunk line or trailer,
      no CRLF after chunk data                      400 at that byte/line    RFC 9112 §7.1
    chunk line over 4096 bytes                      400                      (bound)
    trailer fields                                  read, checked as head
                                                    fields, never merged
                                                    into the request         RFC 9110 §6.5.2
    trailer naming framing, routing, auth or
      request-modifier fields (Content-Length,
      Transfer-Encoding, Host, Authorization, ...)  400                      RFC 9110 §6.5.1
    body of an Upgrade request                      framed by its
                                                    Content-Length or
                                                    chunked, like any body   RFC 9110 §7.8

Order. A head is read line by line: the first line that is wrong decides the answer, and
within a line its size comes before its syntax (so 431 beats 400 for an oversize bad line).
Then the request line's parts in the order of ``check_request_line``, then ``check_head``'s
rules on the whole head, then the target against Host in ``build_scope``. A line is judged
when its LF arrives; sizes as soon as they are exceeded; a first byte that cannot start a
request at once. The answer is therefore the same however the bytes are split into reads.

How both parsers keep it. Each parser takes a head that arrives whole at the start of a read
(the hot path) and must then pass a few cheap checks for its own leniencies (llhttp: runs of
SP, RTSP/ICE versions, leading CR/LF; h11: bare LF, obsolete folding, control bytes, any
token as method; both: versions, target forms, limits). Anything else — a head in pieces, a
parser's refusal, a failed check — is read by :class:`HeadReader`, which implements the order
above and either refuses with the first fault or delivers the head itself. Bodies are framed
here, not by the parsers: Content-Length by counting, chunked by :class:`ChunkedBody` (one
decoder for both), except that llhttp delivers the Content-Length body of a head it parsed.

Repeats: a read that is one whole bodiless head whose field block (all after the request line)
is byte for byte the one the parser read last on this connection, as a client sends it request
after request, is not given to the parser again: its fields are those the parser read then,
its request line is read by ``check_request_line`` (HeadReader's reading). Any doubt (another
request line form, a refusal, a limit within reach) leaves the read to the parser. The block is
kept from a connection's second such head on: one that serves a single request keeps nothing.

Pipelining: once a request is complete, further input is *held* (``held``) until the
connection calls :meth:`next_cycle` after its response; ``holding_input`` tells it to stop
reading; ``trailing_data`` is what was read past an upgrade request.
"""

from __future__ import annotations

import copy
import re
from typing import Any, ClassVar, Protocol

import h11

from uvworker.core.request import (
    KNOWN_METHODS, TCHARS, Headers, check_chunked, check_request_line, known_request_line, read_field_line,
)
from uvworker.errors import HTTPError

__all__ = ["ChunkedBody", "H11Adapter", "HeadReader", "Headers", "HttptoolsAdapter", "Limits", "Sink", "make_parser"]

HEAD_BOUND = 128 * 1024  # a whole head held in memory, at most (standalone)
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions, at most


class Sink(Protocol):
    def on_head(self, method: bytes, target: bytes, http_version: str, headers: Headers, complete: bool) -> None: ...
    def on_fields_kept(self, headers: Headers) -> None: ...  # the last head's, as kept (_keep_fields)
    def on_body(self, data: bytes) -> None: ...
    def on_end(self) -> None: ...


class Limits:
    """The request-size limits, counted on the bytes as received.

    ``request_line``: the request line without its CRLF (414 beyond). ``fields``: field lines in
    the head, and apart in the trailer (431 beyond). ``field_line``: one field line as sent,
    ``Name: value`` with its whitespace, without its CRLF (431 beyond). ``head``: the whole head
    with its CRLFs, at most what the three allow and at most ``head_bound`` (0: no bound of its
    own, as under Gunicorn).
    """

    __slots__ = ("request_line", "fields", "field_size", "field_line", "head", "chunk_line", "fast", "tiny", "h11_head")

    def __init__(
        self, request_line: int, fields: int, field_size: int, h11_head: int | None = None,
        head_bound: int = HEAD_BOUND,
    ) -> None:
        self.request_line = request_line
        self.fields = fields
        self.field_size = field_size
        self.field_line = field_size  # the longest field line, without its CRLF
        allowed = request_line + 2 + fields * (field_size + 2) + 2
        self.head = min(allowed, head_bound) if head_bound else allowed
        self.chunk_line = MAX_CHUNK_LINE
        # --h11-max-incomplete-event-size: uvicorn's bound on what h11 holds of an incomplete
        # head or chunk line. Set, it is h11's alone (an exception to the agreement, as asked).
        self.h11_head = h11_head or self.head
        self._derive()

    def _derive(self) -> None:
        # A head this short cannot break a line limit: the parsers' hot path skips the count.
        self.fast = min(self.request_line, self.field_line, self.head)
        self.tiny = min(self.fast, 4 * self.fields)  # too short for more field lines than allowed

    def for_h11(self) -> Limits:
        """These limits as h11 keeps them: the same, unless --h11-max-incomplete-event-size."""
        if self.h11_head == self.head:
            return self
        limits = copy.copy(self)
        limits.head = self.h11_head
        limits.request_line = min(self.request_line, self.h11_head)
        limits.chunk_line = min(self.chunk_line, self.h11_head)
        limits._derive()
        return limits


# -- our own reading of a head, in the order of the table ------------------------------------------
class HeadReader:
    """Reads one head from its first byte, line by line, as it arrives (``read`` again with the
    grown buffer). Raises HTTPError at the first fault; returns the head's length once its
    empty line is in, with ``method``, ``target``, ``version`` and ``headers`` set."""

    __slots__ = ("limits", "pos", "seen", "method", "target", "version", "headers")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.pos = 0  # the start of the first line not yet read
        self.seen = 0  # where to look for the next LF
        self.method = b""
        self.target = b""
        self.version = ""
        self.headers: Headers = []

    def read(self, buf: bytes | bytearray) -> int:
        limits = self.limits
        size = len(buf)
        if not self.method:  # the request line
            if not size:
                return -1
            if buf[0] not in TCHARS:
                raise HTTPError(400, "Invalid request line")
            lf = buf.find(b"\n", self.seen)
            if lf < 0:
                if size > limits.request_line + 1:
                    raise HTTPError(414, "Request-URI too long")
                self.seen = size
                return -1
            end = lf - 1 if buf[lf - 1] == 13 else lf
            if end > limits.request_line:
                raise HTTPError(414, "Request-URI too long")
            if end == lf:
                raise HTTPError(400, "Bare LF in the request line")
            self.method, self.target, self.version = check_request_line(bytes(buf[:end]))
            self.pos = self.seen = lf + 1
        pos = self.pos
        headers = self.headers
        while pos < size:
            first = buf[pos]
            if first == 13:
                if pos + 1 == size:
                    break
                if buf[pos + 1] != 10:
                    raise HTTPError(400, "Bare CR in the header block")
                if pos + 2 > limits.head:
                    raise HTTPError(431, "Request header fields too large")
                return pos + 2
            if first == 10:
                raise HTTPError(400, "Bare LF in the header block")
            if len(headers) >= limits.fields:
                raise HTTPError(431, "Too many request header fields")
            lf = buf.find(b"\n", max(self.seen, pos))
            if lf < 0:
                self.seen = size
                if size - pos > limits.field_line + 1 or size > limits.head:
                    raise HTTPError(431, "Request header fields too large")
                break
            end = lf - 1 if buf[lf - 1] == 13 else lf
            if end - pos > limits.field_line or lf >= limits.head:
                raise HTTPError(431, "Request header fields too large")
            if end == lf:
                raise HTTPError(400, "Bare LF in a header field")
            headers.append(read_field_line(buf[pos:end]))
            pos = self.pos = self.seen = lf + 1
        if size > limits.head:
            raise HTTPError(431, "Request header fields too large")
        return -1


def skip_empty_lines(buf: bytes) -> bytes:
    """RFC 9112 §2.2: empty lines (CRLF) before a request line are ignored; a bare CR or LF there
    is not an empty line. Returns what follows them (a lone trailing CR waits for its LF)."""
    rest = buf.lstrip(b"\r\n")
    skipped = len(buf) - len(rest)
    if skipped:
        pairs = skipped // 2
        if buf[: 2 * pairs] != b"\r\n" * pairs or (skipped % 2 and (rest or buf[-1] != 13)):
            raise HTTPError(400, "Bare CR or LF before the request line")
        if skipped % 2:
            return b"\r"
    return rest


# -- bodies ------------------------------------------------------------------------------------------
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_TOKEN_RE = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_CHUNK_LINE = re.compile(
    rb"0*([0-9A-Fa-f]{1,16})(?:;" + _TOKEN_RE + rb"(?:=(?:" + _TOKEN_RE + rb"|" + _QUOTED + rb"))?)*"
).fullmatch
# Fields that must not come in a trailer (RFC 9110 §6.5.1): framing, routing, authentication,
# request modifiers, connection options, and the proxy headers we route by.
FORBIDDEN_TRAILERS = frozenset(
    b"content-length transfer-encoding te trailer host authorization proxy-authorization cookie "
    b"content-type content-encoding content-range expect max-forwards range cache-control pragma "
    b"if-match if-none-match if-modified-since if-unmodified-since if-range connection keep-alive "
    b"upgrade proxy-connection forwarded x-forwarded-for x-forwarded-proto x-forwarded-host".split()
)
_SIZE, _DATA, _DATA_CR, _DATA_LF, _TRAILER = range(5)


class ChunkedBody:
    """A chunked body (RFC 9112 §7.1), read strictly as it arrives: one decoder for both parsers.

    ``feed`` passes the data to ``sink.on_body`` piece by piece and returns -1 while the body
    goes on, or the offset just past its end (after the trailer section). Trailer fields are
    checked like head fields and dropped.
    """

    __slots__ = ("limits", "state", "size", "line", "trailers")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.state = _SIZE
        self.size = 0
        self.line = b""  # the start of a line split across reads
        self.trailers = 0

    def feed(self, data: bytes, sink: Sink) -> int:
        i, n = 0, len(data)
        while i < n:
            state = self.state
            if state == _DATA:
                take = min(self.size, n - i)
                sink.on_body(data if take == n else data[i : i + take])
                i += take
                self.size -= take
                if not self.size:
                    self.state = _DATA_CR
            elif state == _DATA_CR:
                if data[i] != 13:
                    raise HTTPError(400, "Invalid chunked body: no CRLF after chunk data")
                i += 1
                self.state = _DATA_LF
            elif state == _DATA_LF:
                if data[i] != 10:
                    raise HTTPError(400, "Invalid chunked body: no CRLF after chunk data")
                i += 1
                self.state = _SIZE
            else:
                lf = data.find(b"\n", i)
                end = lf if lf >= 0 else n
                line = self.line + data[i:end] if self.line else data[i:end]
                # A line is judged when its LF arrives, its size as soon as it is too long.
                cr = line[-1:] == b"\r"
                if len(line) - cr > (self.limits.chunk_line if state == _SIZE else self.limits.field_line):
                    if state == _SIZE:  # (431 when --h11-max-incomplete-event-size bounds it)
                        status = 400 if self.limits.chunk_line == MAX_CHUNK_LINE else 431
                        raise HTTPError(status, "Invalid chunked body: chunk line too long")
                    raise HTTPError(431, "Request trailer field too large")
                if lf < 0:
                    self.line = line
                    return -1
                self.line = b""
                i = lf + 1
                if not cr:
                    raise HTTPError(400, "Invalid chunked body: bare LF")
                line = line[:-1]
                if state == _SIZE:
                    match = _CHUNK_LINE(line)
                    if match is None:
                        raise HTTPError(400, "Invalid chunked body: bad chunk line")
                    self.size = int(match[1], 16)
                    self.state = _DATA if self.size else _TRAILER
                elif not line:
                    return i
                else:
                    self._trailer(line)
        return -1

    def _trailer(self, line: bytes) -> None:
        if self.trailers >= self.limits.fields:
            raise HTTPError(431, "Too many request trailer fields")
        self.trailers += 1
        name, _ = read_field_line(line)
        if name in FORBIDDEN_TRAILERS:
            raise HTTPError(400, f"Forbidden trailer field: {name.decode()}")


def body_framing(headers: Headers) -> tuple[int, bool]:
    """(Content-Length, chunked) of a head; refuses framing ``check_head`` refuses, so that the
    adapters never frame a body two ways whatever their sink checks."""
    lengths = [value for name, value in headers if name == b"content-length"]
    encodings = [value for name, value in headers if name == b"transfer-encoding"]
    if len(lengths) > 1 or (lengths and (encodings or not lengths[0].isdigit())):
        raise HTTPError(400, "Invalid Content-Length")
    if encodings:
        check_chunked(b",".join(encodings))
        return 0, True
    return (int(lengths[0]) if lengths else 0), False


# -- what both adapters share ---------------------------------------------------------------------
def _read_line(line: bytes) -> tuple[bytes, bytes, str] | None:
    """check_request_line's answer, or None for a line it refuses (the parser says how)."""
    try:
        return check_request_line(line)
    except HTTPError:
        return None


_IDLE, _HEAD, _LENGTH, _CHUNKED, _PARSER_BODY, _DONE = range(6)
_NO_FIELDS: Headers = []  # never changed
KEPT_BLOCKS = 256  # field blocks an adapter class keeps for every connection (_keep_fields)


class _Adapter:
    """Held input, body framing, repeated heads and our own head reading; a subclass's
    ``_parse`` tries its parser on a read that starts a request and is no repeat (``feed``)."""

    # One per connection: slots, one block (a compact values array is a second: 50 bytes more).
    __slots__ = (
        "sink", "limits", "held", "holding_input", "_state", "_buf", "_reader", "_remaining", "_chunks", "_fields",
        "_fields_read", "__weakref__",  # (tests check that adapters are freed)
    )
    # Field blocks and what the parser read from each, shared by the connections (_keep_fields);
    # one table per subclass, as each parser reads a block its own way.
    _kept: ClassVar[dict[bytes, tuple[bytes, Headers]]]

    def __init__(self, sink: Sink, limits: Limits) -> None:
        self.sink = sink
        self.limits = limits
        self.held = False
        # Input for a later request is waiting (held and _buf): the connection should stop
        # reading. An attribute, kept where those change: read after every read, a property
        # would cost a call from C (~1.6k instructions a request, callgrind).
        self.holding_input = False
        self._state = _IDLE
        self._buf: bytes | bytearray = b""  # a head in pieces, or the input after a request
        self._reader: HeadReader | None = None
        self._remaining = 0  # Content-Length bytes still to come
        self._chunks: ChunkedBody | None = None
        # The field block (the head after its request line) of the last read that was one
        # whole bodiless head, as the parser took it, and the fields it read from it (kept).
        # None before the first such read, b"" after it: kept from the second (_keep_fields).
        self._fields: bytes | None = None
        self._fields_read: Headers = _NO_FIELDS

    def feed(self, data: bytes) -> None:
        """A read. In the _IDLE state (it starts a request) one whole head whose field block is
        the one the parser last read, bodiless (what a client sends request after request),
        is delivered here, without the parser: the fields as it read them, the request line
        as HeadReader reads it (the repeat path, inline: a call costs 400-500 instructions).
        Anything else starting a request goes to the subclass's parser (``_parse``) as always."""
        if self._state != _IDLE:
            self._drive(data)
            return
        fields = self._fields  # None or b"" until a block is kept (_keep_fields)
        # A head ends with LF (a read with a body rarely does: it goes on to the parser after
        # one byte's test). Then one partition at the first CRLF, whose rest must be the kept
        # block: a method of one argument (METH_O), where endswith and find parse a tuple of
        # arguments and take the buffer protocol (~1k instructions each), and the slice that
        # followed them is its first part (~1.7k instructions less a repeated head).
        if fields and data and data[-1] == 10 and len(data) <= self.limits.fast:
            request_line, _, block = data.partition(b"\r\n")
            if block == fields:
                # check_request_line's answer, kept (no call); a line not read before is read
                # here, and one it refuses is the parser's to refuse.
                read = known_request_line(request_line) or _read_line(request_line)
                if read is not None and read[1][0] == 47:
                    self.sink.on_head(read[0], read[1], read[2], self._fields_read.copy(), True)  # the request, whole
                    # As _end(b"") without its on_end (the head said complete): nothing follows the head.
                    self._buf = b""
                    self._state = _DONE
                    self.held = True
                    self.holding_input = False
                    return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        """A read that starts a request, not a repeat: the parser's."""
        raise NotImplementedError

    def next_cycle(self) -> None:
        """The current response is done: parse the held input, up to the next request's end."""
        self.held = self.holding_input = False
        self._state = _IDLE
        data, self._buf = self._buf, b""
        if data:
            self.feed(bytes(data))

    def detach(self) -> None:
        """The connection is gone: let go of the sink, which holds this adapter (H1Core.detach)."""
        del self.sink

    def _keep_fields(self, data: bytes, headers: Headers) -> None:
        """The parser read ``data``, one whole bodiless head, into ``headers`` (a list no one
        else has): see feed; nothing is kept of a head over limits.fast. Not called for a connection's
        first such head (``_fields`` None; the caller makes it b""): a connection may serve
        just one request, and then it keeps nothing of it while it idles (the field block
        and the fields: ~500 bytes). The connections that send the same block (most clients
        of a server send the same fields on all their connections) keep one copy, the
        first's, per process (bounded, cleared when full): one that all of them read stays
        in the CPU's caches, where a block and fields of each connection's own are cold by
        its next request when a thousand connections take turns."""
        if len(data) > self.limits.fast:
            return
        fields = data[data.find(b"\r\n") + 2 :]
        table = self._kept
        kept = table.get(fields)
        if kept is None:
            if len(table) >= KEPT_BLOCKS:
                table.clear()
            kept = table[fields] = fields, headers
        self._fields, self._fields_read = kept
        self.sink.on_fields_kept(kept[1])  # equal to the head's, delivered: maybe other objects

    @property
    def trailing_data(self) -> bytes:
        """Input after the current request (after an upgrade request: the other protocol's)."""
        return bytes(self._buf) if self.held else b""

    def _parser_body(self, data: bytes) -> None:
        raise NotImplementedError

    def _drive(self, data: bytes) -> None:
        """Input in any state but _IDLE."""
        state = self._state
        if state == _LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self.sink.on_body(data)
                return
            self._remaining = 0
            self.sink.on_body(data if len(data) == remaining else data[:remaining])
            self._end(data[remaining:])
        elif state == _CHUNKED:
            end = self._chunks.feed(data, self.sink)  # type: ignore[union-attr]
            if end >= 0:
                self._chunks = None
                self._end(data[end:])
        elif state == _HEAD:
            self._read_head(data)
        elif state == _DONE:
            if isinstance(self._buf, bytearray):
                self._buf += data
            else:
                self._buf = bytearray(self._buf) + data
            self.holding_input = bool(self._buf)
        elif state == _PARSER_BODY:
            self._parser_body(data)
        else:
            self.feed(data)

    def _read_head(self, data: bytes) -> None:
        """A head that no parser took whole: read it ourselves (see the table)."""
        self._state = _HEAD
        buf = self._buf
        if buf:
            buf += data  # a bytearray: a head in many reads grows in place
        else:
            buf = data
        if self._reader is None:
            buf = skip_empty_lines(bytes(buf))
            if not buf or buf == b"\r":
                self._buf = buf
                return
            self._reader = HeadReader(self.limits)
        end = self._reader.read(buf)
        if end < 0:
            self._buf = buf if isinstance(buf, bytearray) else bytearray(buf)
            return
        reader, self._reader, self._buf = self._reader, None, b""
        self._deliver(reader.method, reader.target, reader.version, reader.headers, bytes(buf[end:]))

    def _deliver(self, method: bytes, target: bytes, version: str, headers: Headers, rest: bytes) -> None:
        """A head we read ourselves, or one whose body we frame: the body follows in ``rest``."""
        self.sink.on_head(method, target, version, headers, False)
        self._frame(headers, rest)

    def _frame(self, headers: Headers, rest: bytes) -> None:
        length, chunked = body_framing(headers)
        if chunked:
            self._chunks = ChunkedBody(self.limits)
            self._state = _CHUNKED
        elif length:
            self._remaining = length
            self._state = _LENGTH
        else:
            self._end(rest)
            return
        if rest:
            self._drive(rest)

    def _end(self, rest: bytes | bytearray) -> None:
        self._buf = rest
        self._state = _DONE
        self.held = True
        self.holding_input = bool(rest)
        self.sink.on_end()


# -- httptools (llhttp) ------------------------------------------------------------------------------
class _Reread(Exception):
    """Raised from a callback: this head is read by HeadReader after all."""


class _Chunks(Exception):
    """Raised from a callback: the body is chunked, and ChunkedBody reads it."""


_VERSIONS = {b" HTTP/1.1": "1.1", b" HTTP/1.0": "1.0"}  # how the request line ends, on the hot path


class HttptoolsAdapter(_Adapter):
    """llhttp parses a head that starts a read, and the Content-Length body behind it.

    llhttp parses all it is given and tells no offsets. When a request ends inside a read it
    goes on into the next one, whose callbacks are ignored: where the request ended is counted
    (its head ends at the first CRLFCRLF — a head llhttp took has no bare CR or LF — and its
    body is what llhttp delivered), what follows is held, and that llhttp is replaced. The
    sink's ``on_end`` waits until llhttp returns, because for an Upgrade request llhttp calls
    the request complete before its body.
    """

    __slots__ = (
        "parser", "_url", "_headers", "_data", "_body", "_after", "_max_fields", "_short", "_tiny", "_request_headers",
    )
    _httptools: Any = None  # the module (an optional dependency), imported by the first adapter
    _kept = {}

    def __init__(self, sink: Sink, limits: Limits) -> None:
        if self._httptools is None:
            import httptools

            HttptoolsAdapter._httptools = httptools
        super().__init__(sink, limits)
        self._new_parser()
        self._data = b""  # the read being parsed, which starts with the current request
        self._body = 0  # body bytes llhttp delivered for the current request, in this read
        self._after = False  # llhttp went on into the next request in this read
        self._max_fields = limits.fields
        self._short = limits.fast
        self._tiny = limits.tiny
        self._request_headers: Headers = _NO_FIELDS

    def detach(self) -> None:
        super().detach()
        del self.parser  # llhttp holds this adapter's bound methods: a cycle of its own

    def _new_parser(self) -> None:
        self.parser = self._httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: Headers = []

    # -- driving -------------------------------------------------------------------------------
    def _parse(self, data: bytes) -> None:
        self._data = data  # the hot path: a read that starts a request, given to llhttp whole
        try:
            self.parser.feed_data(data)
        except Exception as exc:
            self._failed(data, exc)
            return
        state = self._state
        if state == _DONE:
            if self._after or self._body or self._url or self._headers or data[-1] != 10 or data[-5] <= 13:
                self._finish(data)
            else:
                # The read ends with the head: llhttp, which silently skips CR and LF after a
                # request (and method letters until a SP), would have failed on "x\r\n\r\n".
                self._buf = b""
                self.held = True
                if self._fields is None:  # the first: nothing kept (see _keep_fields), nor held
                    self._fields = b""
                    self._request_headers = _NO_FIELDS
                else:
                    self._keep_fields(data, self._request_headers)
                    self._request_headers = _NO_FIELDS  # kept (maybe another's) or not: let go while idle
                self.sink.on_end()
        elif state == _PARSER_BODY:  # the body goes on in later reads
            length, chunked = body_framing(self._request_headers)
            if chunked:
                self._reframe(data)
            else:
                self._remaining = length - self._body
                self._body = 0
        else:  # the head goes on in later reads: read it ourselves from the start
            self._new_parser()
            self._read_head(data)

    def _failed(self, data: bytes, exc: Exception) -> None:
        httptools = self._httptools
        if isinstance(exc, httptools.HttpParserUpgrade):
            self._upgraded(data, exc.args[0])
        elif isinstance(exc, httptools.HttpParserCallbackError):
            error = exc.__context__
            if type(error) is _Reread:
                self._new_parser()
                self._read_head(data)
            elif type(error) is _Chunks:
                self._reframe(data)
            elif isinstance(error, HTTPError):
                raise error from None  # the sink refused the head
            else:
                raise error or exc  # a bug in the sink, not bad input
        elif isinstance(exc, httptools.HttpParserError):
            state = self._state
            if state == _IDLE:  # llhttp refused the head: our reading decides
                self._new_parser()
                self._read_head(data)
            elif state == _PARSER_BODY:  # llhttp refused the body's framing: ours decides
                self._reframe(data)
            else:  # _DONE: the next request is bad; it is read again after this one's response
                self._after = True
                self._finish(data)
        else:
            raise exc

    def _finish(self, data: bytes) -> None:
        """llhttp completed the request in ``data`` and may have gone on: hold what follows it."""
        rest = data[data.find(b"\r\n\r\n") + 4 + self._body :]
        self._body = 0
        if rest or self._after or self._url or self._headers:
            self._new_parser()  # it parsed into the next request: that one is parsed again
            self._after = False
        self._end(rest)

    def _reframe(self, data: bytes) -> None:
        """The body is not llhttp's to read (chunked): we frame it from the end of the head."""
        self._new_parser()
        self._frame(self._request_headers, data[data.find(b"\r\n\r\n") + 4 :])

    def _upgraded(self, data: bytes, offset: int) -> None:
        """llhttp stops after an upgrade request's head and skips its body; we frame the body."""
        if self._after:  # a later request in this read asks to upgrade: not this one's business
            self._finish(data)
            return
        self._new_parser()
        self._frame(self._request_headers, data[offset:])

    def _parser_body(self, data: bytes) -> None:
        """The rest of a Content-Length body llhttp is reading."""
        remaining = self._remaining
        if len(data) > remaining:
            piece, rest = data[:remaining], data[remaining:]
        else:
            piece, rest = data, b""
        self._remaining = remaining - len(piece)
        try:
            self.parser.feed_data(piece)
        except self._httptools.HttpParserCallbackError as exc:
            raise exc.__context__ or exc from None  # the sink's, as in feed()
        self._body = 0
        if self._state == _DONE:
            self._end(rest)

    # -- httptools callbacks -------------------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        if self._state != _IDLE:
            self._after = True  # the next request in this read: read again later
            return
        url, headers = self._url, self._headers
        self._url, self._headers = b"", []
        method = self.parser.get_method()
        data = self._data
        n = len(method) + len(url)
        # llhttp accepts runs of SP, RTSP/ and ICE/ versions and CR/LF before the request line:
        # one SP either side and " HTTP/1.x" in place (SP cannot be in method or URL) rule
        # them out, and read the version (other versions go to HeadReader).
        version = _VERSIONS.get(data[n + 1 : n + 10])
        if (
            version is None
            or url[0] != 47
            or method == b"CONNECT"
            or (len(data) > self._tiny and self._oversize(data, headers))
        ):
            raise _Reread
        self._state = _PARSER_BODY
        self._request_headers = headers  # ours: the sink's list may change (the app has it)
        self.sink.on_head(method, url, version, headers.copy(), False)

    def _oversize(self, data: bytes, headers: Headers) -> bool:
        """Whether the head may break a limit (then HeadReader counts it exactly)."""
        if len(headers) > self._max_fields:
            return True
        return len(data) > self._short and data.find(b"\r\n\r\n") + 4 > self._short

    def on_body(self, body: bytes) -> None:
        if self._state == _PARSER_BODY:
            self._body += len(body)
            self.sink.on_body(body)

    def on_message_complete(self) -> None:
        if self._state == _PARSER_BODY:
            self._state = _DONE  # on_end is the caller's, once llhttp returns
        else:
            self._after = True

    def on_chunk_header(self) -> None:
        if self._state == _PARSER_BODY:
            raise _Chunks


# -- h11 -----------------------------------------------------------------------------------------------
# After h11 accepted a head, deleting the bytes a head may hold (but CR and LF) must leave
# exactly one CRLF per line: no bare CR or LF, no control bytes, no continuation lines (h11
# joins those, so they would show as more CRLFs than fields).
_HEAD_BYTES = bytes(b for b in range(256) if b == 9 or 0x20 <= b != 0x7F)
_CRLFS = b"\r\n" * 4096


_H11_VERSIONS = {b"1.1": "1.1", b"1.0": "1.0"}
_FRAMING_FIELDS = (b"content-length", b"transfer-encoding")


def _h11_request_public(data: bytes) -> tuple[bytes, bytes, bytes, Headers] | None:
    """The request h11 reads from ``data`` at the start of a connection: (method, target,
    version, headers), or None (it needs more). Raises h11.ProtocolError for input it refuses."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    if type(event) is not h11.Request:
        return None
    return event.method, event.target, event.http_version, list(event.headers)


try:
    # The same, from the reader h11's Connection calls for a client in its IDLE state, on a
    # buffer of its own: a Connection per request and its state machine were 40% of the
    # parse (h11 keeps no state between requests that we use: we frame bodies ourselves).
    from h11._readers import READERS as _H11_READERS
    from h11._receivebuffer import ReceiveBuffer as _H11Buffer

    _read_h11 = _H11_READERS[h11.CLIENT, h11.IDLE]

    def _h11_request(data: bytes) -> tuple[bytes, bytes, bytes, Headers] | None:
        buf = _H11Buffer()
        buf += data
        event = _read_h11(buf)
        if event is None:
            return None
        return event.method, event.target, event.http_version, [(name, value) for _, name, value in event.headers._full_items]
except (ImportError, KeyError, AttributeError):  # a later h11 moved its internals: the public way
    _h11_request = _h11_request_public


class H11Adapter(_Adapter):
    """h11 parses a head that starts a read; the body is framed here."""

    __slots__ = ()
    _kept = {}

    def __init__(self, sink: Sink, limits: Limits) -> None:
        super().__init__(sink, limits.for_h11())

    def _parse(self, data: bytes) -> None:
        try:
            request = _h11_request(data)
        except h11.ProtocolError:
            request = None
        if request is not None:
            method, target, raw_version, headers = request
            version = _H11_VERSIONS.get(raw_version)
            end = data.find(b"\r\n\r\n") + 4
            head = data if end == len(data) else data[:end]
            lines = len(headers) + 2
            limits = self.limits
            if (
                end >= 4
                and head.translate(None, _HEAD_BYTES) == _CRLFS[: 2 * lines]
                and version is not None
                and method in KNOWN_METHODS
                and target[0] == 47
                and end <= limits.fast
                and lines - 2 <= limits.fields
            ):
                for name, _ in headers:
                    if name in _FRAMING_FIELDS:
                        break  # the body is framed by our reading of the head, below
                else:
                    read = headers.copy()  # the sink's list may change
                    self.sink.on_head(method, target, version, headers, False)
                    if end == len(data):
                        if self._fields is None:  # the first: nothing kept (see _keep_fields)
                            self._fields = b""
                        else:
                            self._keep_fields(data, read)
                    self._end(data[end:])  # no body
                    return
        # h11 needs more, refused, was lenient, or rewrote a framing value ("5, 5" → "5",
        # "Chunked" → "chunked"): our reading decides, from the bytes as sent.
        self._read_head(data)


def make_parser(name: str, sink: Sink, limits: Limits) -> HttptoolsAdapter | H11Adapter:
    return HttptoolsAdapter(sink, limits) if name == "httptools" else H11Adapter(sink, limits)
