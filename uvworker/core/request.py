"""A request head, checked and turned into an ASGI scope: the same rules whichever parser read it.

Sans-I/O: plain functions of bytes and settings, no connection and no loaded Config. The
decisions these functions enforce are the agreement table in ``parsers.py``; this module holds
the grammar they share:

* ``check_version`` maps the request's version onto the one it is served as (the adapters
  already deliver "1.0" or "1.1").
* ``check_request_line`` and ``check_target`` read the request line (method, request target,
  version) by RFC 9112 §3; ``read_field_line`` reads one field line (head or trailer) by RFC
  9112 §5. The parser adapters use them for every head their parser does not take whole.
* ``check_head`` validates a head in one pass over its fields: Host, Content-Length and
  Transfer-Encoding rules that close request-smuggling gaps, fields that must not repeat; it
  also reads what the connection needs to know (keep-alive, ``Expect: 100-continue``, an
  upgrade, proxy headers present).
* ``split_target`` and ``decode_path`` turn the request target into ``raw_path``, ``path`` and
  ``query_string``; ``build_scope`` makes the ASGI ``http`` scope.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_to_bytes

from uvworker.errors import HTTPError

Headers = list[tuple[bytes, bytes]]

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}
# ``b"..." in data`` first tries the operand as an int and clears the error: 2-5x slower than
# ``data.find(b"...")``, or than testing for a single byte's value.
PERCENT, HASH = ord("%"), ord("#")
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}

# -- grammar (RFC 9110 §5.6.2, §5.5; RFC 9112 §3; RFC 3986 §3.2) ---------------------------------
TCHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+").fullmatch
_BAD_VALUE = re.compile(rb"[^\t\x20-\x7e\x80-\xff]").search  # field-vchar, SP, HTAB (obs-text kept)
_TARGET = re.compile(rb"[\x21-\x7e]+").fullmatch  # request-target bytes: printable ASCII
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])").fullmatch
# uri-host [ ":" port ] without userinfo (RFC 9110 §4.2.4: userinfo in a target is an error);
# IP-literal kept loose (hex, colons, dots and the IPvFuture characters).
_AUTHORITY = rb"(?:\[[0-9A-Za-z:._~!$&'()*+,;=-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)(?::[0-9]*)?"
_HOST = re.compile(_AUTHORITY).fullmatch
_ABSOLUTE = re.compile(rb"(?i:https?)://(" + _AUTHORITY + rb")([/?][\x21-\x7e]*)?").fullmatch

# The methods llhttp knows (it refuses any other token); CONNECT is refused by both (no tunnels).
KNOWN_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH "
    b"UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE "
    b"UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)


def check_version(http_version: str) -> str:
    """The version a request is served as: 1.0 or 1.1; raises HTTPError(505) for others."""
    if http_version == "1.1" or http_version == "1.0":
        return http_version
    if http_version[:2] != "1.":
        raise HTTPError(505, "HTTP Version Not Supported")
    return "1.1"  # RFC 9110 §2.5: a later 1.x minor version is served as 1.1


def check_request_line(line: bytes) -> tuple[bytes, bytes, str]:
    """``method SP request-target SP HTTP-version`` → (method, target, "1.0" | "1.1").

    Checked in this order: the three parts (400), the version (400; another major version
    505), the method (not a token 400; CONNECT or a token llhttp does not know 501), the
    target (400). A line read before is not checked again (its answer is kept, bounded).
    """
    known = _read_lines.get(line)
    if known is not None:
        return known
    read = _read_request_line(line)
    if len(_read_lines) >= 1024:
        _read_lines.clear()
    _read_lines[line] = read
    return read


_read_lines: dict[bytes, tuple[bytes, bytes, str]] = {}  # most requests repeat a few request lines
# check_request_line's answer for a line it read before, else None: a lookup without a call
# (the same dict however often it is cleared).
known_request_line = _read_lines.get


def _read_request_line(line: bytes) -> tuple[bytes, bytes, str]:
    parts = line.split(b" ")
    if len(parts) != 3 or not (parts[0] and parts[1] and parts[2]):
        raise HTTPError(400, "Invalid request line")
    method, target, version = parts
    match = _VERSION(version)
    if match is None:
        raise HTTPError(400, "Invalid HTTP version")
    if match[1] != b"1":
        raise HTTPError(505, "HTTP Version Not Supported")
    if not _TOKEN(method):
        raise HTTPError(400, "Invalid method")
    if method not in KNOWN_METHODS:
        raise HTTPError(501, "Method Not Implemented")
    check_target(method, target)
    return method, target, "1.0" if match[2] == b"0" else "1.1"


def check_target(method: bytes, target: bytes) -> None:
    """The request target's form (RFC 9112 §3.2): origin-form, absolute-form for http(s) with
    an authority, or ``*`` for OPTIONS. Authority-form is CONNECT's, which is refused before."""
    if not _TARGET(target):
        raise HTTPError(400, "Invalid request target")
    first = target[0]
    if first == 47:  # "/"
        return
    if target == b"*":
        if method != b"OPTIONS":
            raise HTTPError(400, "Asterisk-form request target is for OPTIONS only")
        return
    match = _ABSOLUTE(target)
    if match is None or not match[1] or match[1][:1] == b":":
        raise HTTPError(400, "Invalid request target")


def read_field_line(line: bytes | bytearray) -> tuple[bytes, bytes]:
    """``field-name ":" OWS field-value OWS`` → (lowercased name, value), or 400: obsolete line
    folding, whitespace before the colon, a name that is not a token, control bytes in the
    value (HTAB and obs-text are allowed)."""
    if line[:1] in (b" ", b"\t"):
        raise HTTPError(400, "Obsolete line folding")
    colon = line.find(b":")
    name = line[:colon]
    if colon <= 0 or not _TOKEN(name):
        raise HTTPError(400, "Invalid header field name")
    value = line[colon + 1 :].strip(b" \t")
    if _BAD_VALUE(value):
        raise HTTPError(400, "Invalid header field value")
    return bytes(name.lower()), bytes(value)


# -- the head's fields ------------------------------------------------------------------------------
_HOST_FIELD, _LENGTH, _ENCODING, _CONNECTION, _EXPECT, _UPGRADE, _PROXY = range(7)
_HEADS = {
    b"host": _HOST_FIELD,
    b"content-length": _LENGTH,
    b"transfer-encoding": _ENCODING,
    b"connection": _CONNECTION,
    b"expect": _EXPECT,
    b"upgrade": _UPGRADE,
    b"forwarded": _PROXY,
    b"x-forwarded-for": _PROXY,
    b"x-forwarded-proto": _PROXY,
}
# Fields whose grammar has no list form (RFC 9110 §5.3): a second one with another value cannot
# be combined, and two readers could each pick a different one.
SINGLE_FIELDS = (
    b"content-type", b"authorization", b"proxy-authorization", b"origin", b"referer", b"range",
    b"if-range", b"if-modified-since", b"if-unmodified-since", b"max-forwards",
)
_SINGLE = 1 << 8  # the kinds of single fields are bits from here on: a repeat shows as a set bit
_HEADS.update({name: _SINGLE << i for i, name in enumerate(SINGLE_FIELDS)})
MAX_LENGTH_DIGITS = 19  # Content-Length up to 10**19 - 1: fits both parsers' 64-bit counters

_valid_hosts: set[bytes] = set()  # Host values seen to be valid (most requests repeat a few)


def check_head(http_version: str, headers: Headers) -> tuple[bool, bool, bytes | None, bool]:
    """Validate a request head in one pass over its fields.

    Returns (keep_alive, expect_continue, upgrade protocol or None, has proxy headers); raises
    HTTPError for heads that two readers could frame or route two ways (request smuggling):
    400, or 501 for a transfer coding other than chunked (RFC 9112 §6.1).
    """
    lengths = singles = 0
    host = encodings = None
    expect = proxied = connection_upgrade = False
    keep_alive = http_version == "1.1"
    upgrade: bytes | None = None
    get = _HEADS.get
    for name, value in headers:
        kind = get(name)
        if kind is None:
            continue
        if kind == _HOST_FIELD:
            if host is not None:
                raise HTTPError(400, "Duplicate Host header")
            host = value
        elif kind >= _SINGLE:
            if singles & kind:
                _check_single_fields(headers)
            singles |= kind
        elif kind == _LENGTH:
            lengths += 1
            if not value.isdigit() or len(value) > MAX_LENGTH_DIGITS:
                raise HTTPError(400, "Invalid Content-Length")
        elif kind == _CONNECTION:
            tokens = value.lower()  # find(), not `in`: see PERCENT
            if tokens.find(b"close") >= 0:
                keep_alive = False
            elif tokens.find(b"keep-alive") >= 0:
                keep_alive = True
            connection_upgrade = tokens.find(b"upgrade") >= 0
        elif kind == _ENCODING:
            encodings = value if encodings is None else encodings + b"," + value
        elif kind == _EXPECT:
            expect = value.lower() == b"100-continue"
        elif kind == _UPGRADE:
            upgrade = value.lower()
        else:
            proxied = True
    if lengths > 1:
        raise HTTPError(400, "Duplicate Content-Length")
    if encodings is not None:
        if lengths:
            raise HTTPError(400, "Content-Length together with Transfer-Encoding")
        if http_version != "1.1":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        check_chunked(encodings)
    if host is None:
        if http_version == "1.1":
            raise HTTPError(400, "Missing Host header")
    elif host not in _valid_hosts:
        _check_host(host)
    return keep_alive, expect and http_version != "1.0", upgrade if connection_upgrade else None, proxied  # no 1xx to 1.0


def _check_host(host: bytes) -> None:
    if not _HOST(host):
        raise HTTPError(400, "Invalid Host header")
    if len(_valid_hosts) >= 1024:
        _valid_hosts.clear()
    _valid_hosts.add(host)


def _check_single_fields(headers: Headers) -> None:
    first: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in SINGLE_FIELDS and first.setdefault(name, value) != value:
            raise HTTPError(400, f"Conflicting {name.decode()} header fields")


def check_chunked(encodings: bytes) -> None:
    """The Transfer-Encoding list (all fields joined) must be exactly ``chunked``: 400 when it
    names chunked twice, 501 for any other coding (RFC 9112 §6.1). Empty elements are ignored."""
    if encodings.lower().strip(b" \t") == b"chunked":
        return
    codings = [c.strip(b" \t") for c in encodings.lower().split(b",")]
    codings = [c for c in codings if c]
    if codings == [b"chunked"]:
        return
    if codings.count(b"chunked") > 1:
        raise HTTPError(400, "Chunked transfer coding applied twice")
    raise HTTPError(501, "Transfer-Encoding other than chunked is not implemented")


def accepts_trailers(headers: Headers) -> bool:
    """Whether the request's TE fields list ``trailers`` (RFC 9110 §10.1.4): the client takes
    trailer fields in a chunked response."""
    for name, value in headers:
        if name == b"te":
            for member in value.lower().split(b","):
                if member.partition(b";")[0].strip(b" \t") == b"trailers":
                    return True
    return False


# -- the scope ------------------------------------------------------------------------------------
def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Request target → (raw path, query string): the fragment, if a client sent one, is dropped;
    an absolute-form target loses scheme and authority (its authority becomes Host: ``absolute_form_host``)."""
    if HASH in target:
        target = target[: target.find(b"#")]
    if target[:1] != b"/" and target != b"*":
        start = target.find(b"//") + 2
        ends = [i for i in (target.find(b"/", start), target.find(b"?", start)) if i != -1]
        target = target[min(ends) :] if ends else b"/"
        if target[:1] != b"/":
            target = b"/" + target
    path, _, query = target.partition(b"?")
    return path, query


def absolute_form_host(target: bytes, headers: Headers) -> Headers:
    """RFC 9112 §3.2.2: an origin server routes an absolute-form request by the target's
    authority and ignores Host. Apps route by Host, so Host becomes that authority (added if the
    request had none): app and target then name one host, as a proxy in front read it."""
    _, _, rest = target.partition(b"://")
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        i = rest.find(stop)
        if 0 <= i < end:
            end = i
    authority = rest[:end]
    if (b"host", authority) in headers:
        return headers
    return [(name, value) for name, value in headers if name != b"host"] + [(b"host", authority)]


def decode_path(raw_path: bytes) -> str:
    """A path with percent-escapes or non-ASCII bytes: decoded as UTF-8 (bad bytes replaced)."""
    return unquote_to_bytes(raw_path).decode("utf-8", "replace")


def build_scope(
    method: bytes, target: bytes, http_version: str, headers: Headers,
    server: Any, client: Any, scheme: str, root_path: str, state: dict[str, Any],
) -> dict[str, Any]:
    """The ASGI ``http`` scope of a checked head; ``state`` is copied (lifespan state)."""
    return scope_template(server, scheme, root_path).scope(client, method, target, http_version, headers, state)


def fill_line(
    scope: dict[str, Any], method: bytes, http_version: str, target: tuple[bytes, str, bytes], root_path: str,
) -> None:
    """Store what the request line says in ``scope`` (a copy of a ScopeTemplate's base with
    this ``root_path``): ``target`` as read_target reads it."""
    raw_path, path, query = target
    if http_version != "1.1":
        scope["http_version"] = http_version
    scope["method"] = _METHODS.get(method) or method.decode("ascii")
    if root_path:
        scope["path"] = root_path + path
        scope["raw_path"] = root_path.encode() + raw_path
    else:
        scope["path"] = path
        scope["raw_path"] = raw_path
    scope["query_string"] = query


class ScopeTemplate:
    """What the scopes of the requests to one (server, scheme, root_path) share, kept per
    process (scope_template): a dict every connection copies stays in the CPU's caches, where
    one of each connection's own (464 bytes, its own keys table) is cold again by its next
    request when a thousand connections take turns.

    ``base`` has every key in the scope's order (a copy and the per-request stores cost less
    than building the whole dict), the server's values and no client's. ``lines`` keeps, for
    a target read before (short, origin-form: read_target kept it), the scope of its last
    request line without the request's own values: (method, version, scope), for a request
    with that line to copy and store its client, asgi, headers and state in (``scope``;
    H1Core.on_head does it inline, as a call costs ~1k instructions there). A target read
    once keeps nothing."""

    __slots__ = ("base", "root_path", "lines")

    def __init__(self, server: Any, scheme: str, root_path: str) -> None:
        self.base = base = _SCOPE_BASE.copy()  # cheaper than the literal
        base["server"], base["scheme"], base["root_path"] = server, scheme, root_path
        self.root_path = root_path
        self.lines: dict[bytes, tuple[bytes, str, dict[str, Any]]] = {}

    def scope(
        self, client: Any, method: bytes, target: bytes, http_version: str, headers: Headers, state: dict[str, Any],
    ) -> dict[str, Any]:
        """The scope of a checked head; ``state`` is copied (lifespan state)."""
        known = _targets.get(target)
        if known is None:  # read once, or not to be kept
            scope = self.base.copy()
            if target[0] != 47 and target != b"*":  # absolute-form
                headers = absolute_form_host(target, headers)
            fill_line(scope, method, http_version, read_target(target), self.root_path)
        else:
            lines = self.lines
            kept = lines.get(target)
            if kept is None or kept[0] != method or kept[1] != http_version:
                line = self.base.copy()
                fill_line(line, method, http_version, known, self.root_path)
                if len(lines) >= KEPT_LINES:
                    lines.clear()
                kept = lines[target] = method, http_version, line
            scope = kept[2].copy()
        scope["client"] = client
        scope["asgi"] = ASGI_VERSION.copy()  # a copy clones the table; the literal builds it
        scope["headers"] = headers
        scope["state"] = state.copy()
        return scope


def scope_template(server: Any, scheme: str, root_path: str) -> ScopeTemplate:
    """The ``ScopeTemplate`` of every connection with this server address, scheme and
    root_path (bounded; cleared when full)."""
    key = server, scheme, root_path
    template = _templates.get(key)
    if template is None:
        if len(_templates) >= 64:
            _templates.clear()
        template = _templates[key] = ScopeTemplate(server, scheme, root_path)
    return template


KEPT_LINES = 256  # request lines a ScopeTemplate keeps a scope of (~600 bytes each)
_templates: dict[tuple[Any, str, str], ScopeTemplate] = {}
_SCOPE_BASE: dict[str, Any] = {
    "type": "http", "asgi": None, "http_version": "1.1", "server": None, "client": None, "scheme": "http",
    "method": "", "root_path": "", "path": "", "raw_path": b"", "query_string": b"", "headers": None, "state": None,
}


def read_target(target: bytes) -> tuple[bytes, str, bytes]:
    """Request target → (raw path, path, query string); an origin-form one is kept (bounded):
    most requests repeat a few targets, and a lookup costs a fifth of the split and decode."""
    origin = target[0] == 47
    if origin and HASH not in target:  # no fragment: split here
        raw_path, _, query = target.partition(b"?")
    else:
        raw_path, query = split_target(target)
    path = raw_path.decode("ascii") if PERCENT not in raw_path and raw_path.isascii() else decode_path(raw_path)
    if origin and len(target) <= 256:
        if len(_targets) >= 1024:
            _targets.clear()
        _targets[target] = raw_path, path, query
    return raw_path, path, query


_targets: dict[bytes, tuple[bytes, str, bytes]] = {}  # short origin-form targets read (immutable parts)
