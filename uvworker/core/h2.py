"""HTTP/2 requests and responses, sans-I/O: what uvworker adds to the h2 package's state machine.

The h2 package (``h2.connection.H2Connection``) frames, compresses headers (HPACK), tracks
stream states and flow-control windows, and validates what RFC 9113 asks of a header block.
This module holds the rest, as plain functions and objects that tests drive without sockets:

* ``request_scope``: a request's decoded header block → the ASGI ``http`` scope, by the same
  rules as HTTP/1.1 (``core.request``: target, Host, Content-Length, fields that must not
  repeat, proxy headers), within the same limits (``--limit-request-fields``,
  ``--limit-request-field-size``, and ``--limit-request-line`` for the request line the
  request would have in HTTP/1.1: 414 beyond); ``:authority`` becomes the ``host`` header when the request
  has none, as HTTP/1.1 apps expect (RFC 9113 §8.3.1). Refused input raises ``HTTPError``.
* ``ResponseHead``: the app's status and headers → an h2 header list: names lowercased and
  checked once per distinct (name, value) pair, the connection-specific fields HTTP/2 forbids
  dropped (RFC 9113 §8.2.2), the server's own headers (Server, Date, ``--header``) added.
* ``FloodBudget``: the defence against frames that cost us work and give nothing back (rapid
  reset, CVE-2023-44487; SETTINGS, PING, PRIORITY and empty-DATA floods): each such frame
  fills a leaky bucket, each response served empties it a little; a full bucket ends the
  connection with ENHANCE_YOUR_CALM.
* ``StatelessEncoder``: HPACK for our responses without a dynamic table (static-table indexes,
  else literals that are not indexed), so that a response head is a pure function of its
  headers and is encoded once per distinct head, not once per response (h2's own encoder
  costs about a tenth of a hello-world response).
* ``BoundedFrameBuffer``: h2's frame buffer with the header block (HEADERS + CONTINUATION)
  bounded by the header limits before it is decoded (CVE-2024-27316); h2 alone holds up to
  64 CONTINUATION frames of any permitted size.
* ``H2State``, ``FieldDecoder``: h2's connection and HPACK decoder where they part from RFC
  9113 (a client's GOAWAY; the error code of an undecodable field block).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h2.connection import H2Connection
from h2.errors import ErrorCodes, _error_code_from_int
from h2.events import ConnectionTerminated
from h2.exceptions import DenialOfServiceError, ProtocolError
from h2.frame_buffer import FrameBuffer
from hpack import Decoder
from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError
from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

from uvworker.core.request import build_scope, check_head, check_target
from uvworker.core.response import RESP_DEFAULTED, RESP_LENGTH, HeadDefaults, header_line
from uvworker.errors import HTTPError

if TYPE_CHECKING:
    from hyperframe.frame import Frame, GoAwayFrame

    from uvworker.core.h1 import H1Options

Headers = list[tuple[bytes, bytes]]

NO_BODY_STATUSES = frozenset({204, 304})
# RFC 9113 §8.2.2: fields that only mean something to one HTTP/1.1 connection.
CONNECTION_FIELDS = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
# scope["extensions"] of an HTTP/2 request (copied for each): what H2Stream carries.
EXTENSIONS: dict[str, dict[str, Any]] = {
    "http.response.pathsend": {}, "http.response.early_hint": {}, "http.response.trailers": {},
}
STATUSES = {status: str(status).encode() for status in range(100, 600)}


def request_scope(
    headers: Headers, options: H1Options, server: Any, client: Any, scheme: str, trust_proxy_headers: bool,
    extensions: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], bool]:
    """A request's header block (pseudo-header fields first, as h2 checked) → (scope,
    expect_continue); ``extensions``: the connection's (EXTENSIONS, with ``tls`` over TLS). Raises HTTPError: 431 beyond the header limits, 414 beyond the request line limit, 400 for what HTTP/1.1
    refuses too, 501 for CONNECT (no tunnels)."""
    method = path = authority = b""
    fields: Headers = []
    limits = options.limits
    field_line = limits.field_line
    host = False
    for pair in headers:
        name, value = pair
        if name[0] == 58:  # ":"
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue  # :scheme: the connection's scheme is the one the server vouches for
        if len(name) + len(value) + 2 > field_line:
            raise HTTPError(431, "Request header field too large")
        if name == b"host":
            host = True
        fields.append(pair)
    if len(fields) > limits.fields:
        raise HTTPError(431, "Too many request header fields")
    if len(method) + len(path) + _LINE_EXTRA > limits.request_line:  # the request line it would be in HTTP/1.1
        raise HTTPError(414, "Request-URI too long")
    if method == b"CONNECT":
        raise HTTPError(501, "Method Not Implemented")
    if not path or (path[0] != 47 and path != b"*"):  # origin-form, or * (RFC 9113 §8.3.1)
        raise HTTPError(400, "Invalid request target")
    check_target(method, path)
    if authority and not host:
        fields.insert(0, (b"host", authority))
    _, expect, _, proxied = check_head("2", fields)
    scope = build_scope(method, path, "2", fields, server, client, scheme, options.root_path, options.lifespan_state)
    scope["extensions"] = (EXTENSIONS if extensions is None else extensions).copy()
    if proxied and trust_proxy_headers:
        from uvworker.proxy import apply_proxy_headers

        apply_proxy_headers(scope, options.forwarded_allow)  # type: ignore[arg-type]
    return scope, expect


_LINE_EXTRA = len(b"  HTTP/1.1")  # an HTTP/1.1 request line's spaces and version, around method and target

# (name, value) pairs from apps → (lowercased name, value, kind), or None for a dropped field.
_PAIRS: dict[tuple[bytes, bytes], tuple[bytes, bytes, int] | None] = {}


class ResponseHead:
    """Turns an app's response head into h2's header list (one per connection: the Date it
    adds is the server's, refreshed once a second)."""

    __slots__ = ("defaults", "_second", "_pairs")

    def __init__(self, defaults: HeadDefaults) -> None:
        self.defaults = defaults
        self._second = -1
        self._pairs: Headers = []

    def encode(self, status: int, headers: Any) -> tuple[Headers, int | None]:
        """(h2 header list, the app's Content-Length or None); raises RuntimeError for a
        header that cannot be sent."""
        out = [(b":status", STATUSES[status])]
        length = None
        own = False
        cache = _PAIRS
        for pair in headers:
            try:
                entry = cache[pair]
            except (KeyError, TypeError):
                entry = check_pair(*pair)
                if type(pair) is tuple:
                    if len(cache) >= 4096:
                        cache.clear()
                    cache[pair] = entry
            if entry is None:
                continue
            name, value, kind = entry
            if kind:
                if kind == RESP_LENGTH:
                    length = int(value)
                elif kind == RESP_DEFAULTED:
                    own = True
            out.append((name, value))
        defaults = self.defaults.pairs
        if own:
            names = {name for name, _ in out}
            defaults = [pair for pair in defaults if pair[0] not in names]
        out += defaults
        return out, length


def check_pair(name: bytes, value: bytes) -> tuple[bytes, bytes, int] | None:
    _, kind = header_line(name, value)  # the HTTP/1.1 checks: token name, no CR/LF/NUL
    name = name.lower()
    if name in CONNECTION_FIELDS:
        return None
    return bytes(name), bytes(value).strip(b" \t"), kind


class FloodBudget:
    """A leaky bucket of unproductive frames: ``spend`` fills it (False once it overflows),
    ``earn`` (a response served) and the passing time empty it. ``capacity`` frames at once,
    refilled at ``rate`` per second: a client may reset every stream it may have open four
    times in a burst, but not keep resetting (CVE-2023-44487), pinging or re-sending SETTINGS."""

    __slots__ = ("capacity", "rate", "level", "since")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = 0.0
        self.since = now

    def spend(self, cost: float, now: float) -> bool:
        level = self.level - (now - self.since) * self.rate
        self.since = now
        self.level = level = (level if level > 0.0 else 0.0) + cost
        return level <= self.capacity

    def earn(self, amount: float) -> None:
        level = self.level - amount
        self.level = level if level > 0.0 else 0.0


class HeaderBlockTooLarge(DenialOfServiceError):
    """A header block (HEADERS and its CONTINUATION frames) beyond the header limits: the
    connection ends with ENHANCE_YOUR_CALM (it cannot be skipped: HPACK state would desync)."""


class BoundedFrameBuffer(FrameBuffer):
    """h2's FrameBuffer, with the bytes of one header block bounded by ``max_block``."""

    def __init__(self, max_block: int) -> None:
        super().__init__(server=True)
        self.max_block = max_block

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if self._headers_buffer and f is not None:
            size = sum(len(frame.data) for frame in self._headers_buffer) + len(getattr(f, "data", b""))
            if size > self.max_block:
                raise HeaderBlockTooLarge(f"Header block of {size} bytes or more: at most {self.max_block}")
        return super()._update_header_buffer(f)


class H2State(H2Connection):
    """h2's connection state machine, except for a client's GOAWAY (RFC 9113 §6.8): it
    refuses server pushes, none of which we send, and ends none of the client's streams. h2
    would close its state at once (the rest of a request body in flight then a PROTOCOL_ERROR,
    the response lost) and discard the frames it had queued (a SETTINGS or PING ACK). The
    connection closes once its streams are done (``ConnectionTerminated`` still reports it)."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Any]]:
        event = ConnectionTerminated()
        event.error_code = _error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def detach(self) -> None:
        """The connection is gone: drop h2's table of this object's own bound methods (one
        for each frame type), a reference cycle that only the cyclic collector would free."""
        del self._frame_dispatch_table


class FieldBlockError(ProtocolError):
    """A field block HPACK cannot decode: a connection error of type COMPRESSION_ERROR (RFC
    9113 §4.3), which h2 would report as PROTOCOL_ERROR."""

    error_code = ErrorCodes.COMPRESSION_ERROR


class FieldDecoder(Decoder):
    """hpack's decoder, its decoding errors raised as ``FieldBlockError``; an oversized list
    stays h2's denial of service (ENHANCE_YOUR_CALM)."""

    def decode(self, data: bytes, raw: bool = False) -> Any:
        try:
            return super().decode(data, raw)
        except OversizedHeaderListError:
            raise
        except (HPACKDecodingError, IndexError) as exc:
            raise FieldBlockError(f"Undecodable field block: {exc}") from None


_STATIC_PAIRS = {pair: i for i, pair in reversed(list(enumerate(HeaderTable.STATIC_TABLE, 1)))}
_STATIC_NAMES = {name: i for (name, _), i in sorted(_STATIC_PAIRS.items(), key=lambda item: -item[1])}
_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
_BLOCKS: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}  # stateless: shared by every connection


def _string(value: bytes) -> bytes:
    """An HPACK string literal (RFC 7541 §5.2): Huffman-coded when that is shorter."""
    coded = _huffman.encode(value)
    if len(coded) < len(value):
        length = encode_integer(len(coded), 7)
        length[0] |= 0x80
        return bytes(length) + coded
    return bytes(encode_integer(len(value), 7)) + value


def _field(name: bytes, value: bytes) -> bytes:
    index = _STATIC_PAIRS.get((name, value))
    if index is not None:  # indexed header field (§6.1); the static table has 61 entries
        return bytes((0x80 | index,))
    index = _STATIC_NAMES.get(name, 0)
    # Literal header field without indexing (§6.2.2): the name by static index, or as a string.
    prefix = bytes(encode_integer(index, 4))
    return prefix + _string(value) if index else prefix + _string(name) + _string(value)


class StatelessEncoder:
    """An HPACK encoder for h2 (``H2Connection.encoder``) that never adds to the dynamic table."""

    __slots__ = ("_size_update",)

    def __init__(self) -> None:
        self._size_update = b""

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, size: int) -> None:
        # The peer changed SETTINGS_HEADER_TABLE_SIZE: RFC 7541 §4.2 wants the next block to
        # start with a table size update; ours stays empty whatever the size.
        update = encode_integer(min(size, 4096), 5)
        update[0] |= 0x20
        self._size_update = bytes(update)

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        key = tuple(headers)
        block = _BLOCKS.get(key)
        if block is None:
            block = b"".join(_field(name, value) for name, value in key)
            if len(_BLOCKS) >= 1024:
                _BLOCKS.clear()
            _BLOCKS[key] = block
        if self._size_update:
            block, self._size_update = self._size_update + block, b""
        return block
