"""A request head, checked and turned into an ASGI scope: the same rules whichever parser read it.

Sans-I/O: plain functions of bytes and settings, no connection and no loaded Config.

* ``check_version`` maps the request's version onto the one it is served as.
* ``check_head`` validates a head in one pass over its fields: Host, Content-Length and
  Transfer-Encoding rules that close request-smuggling gaps; it also reads what the connection
  needs to know (keep-alive, ``Expect: 100-continue``, an upgrade, proxy headers present).
* ``split_target`` and ``decode_path`` turn the request target into ``raw_path``, ``path`` and
  ``query_string``.
* ``build_scope`` makes the ASGI ``http`` scope.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from uvworker.core.parsers import Headers
from uvworker.errors import HTTPError

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}

_HOST, _LENGTH, _ENCODING, _CONNECTION, _EXPECT, _UPGRADE, _PROXY = range(7)
_HEADS = {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _ENCODING,
    b"connection": _CONNECTION,
    b"expect": _EXPECT,
    b"upgrade": _UPGRADE,
    b"forwarded": _PROXY,
    b"x-forwarded-for": _PROXY,
    b"x-forwarded-proto": _PROXY,
}


def check_version(http_version: str) -> str:
    """The version a request is served as: 1.0 or 1.1; raises HTTPError(505) for others."""
    if http_version == "1.1" or http_version == "1.0":
        return http_version
    if http_version[:2] != "1.":
        raise HTTPError(505, "HTTP Version Not Supported")
    return "1.1"  # RFC 9110 §2.5: a later 1.x minor version is served as 1.1


def check_head(http_version: str, headers: Headers) -> tuple[bool, bool, bytes | None, bool]:
    """Validate a request head in one pass over its fields.

    Returns (keep_alive, expect_continue, upgrade protocol or None, has proxy headers); raises
    HTTPError(400) for heads that two parsers could frame two ways (request smuggling).
    """
    hosts = lengths = 0
    chunked = te = expect = proxied = connection_upgrade = False
    keep_alive = http_version == "1.1"
    upgrade: bytes | None = None
    get = _HEADS.get
    for name, value in headers:
        kind = get(name)
        if kind is None:
            continue
        if kind == _HOST:
            hosts += 1
        elif kind == _LENGTH:
            lengths += 1
            if not value.isdigit():
                raise HTTPError(400, "Invalid Content-Length")
        elif kind == _ENCODING:
            te = True
            chunked = value.lower().rstrip().endswith(b"chunked")
        elif kind == _CONNECTION:
            tokens = value.lower()  # find(), not `in`: see PERCENT
            if tokens.find(b"close") >= 0:
                keep_alive = False
            elif tokens.find(b"keep-alive") >= 0:
                keep_alive = True
            connection_upgrade = tokens.find(b"upgrade") >= 0
        elif kind == _EXPECT:
            expect = value.lower() == b"100-continue"
        elif kind == _UPGRADE:
            upgrade = value.lower()
        else:
            proxied = True
    if lengths > 1:
        raise HTTPError(400, "Duplicate Content-Length")
    if te:
        if lengths:
            raise HTTPError(400, "Content-Length together with Transfer-Encoding")
        if not chunked or http_version != "1.1":
            raise HTTPError(400, "Unsupported Transfer-Encoding")
    if http_version == "1.1" and hosts != 1:
        raise HTTPError(400, "Missing Host header" if not hosts else "Duplicate Host header")
    return keep_alive, expect and http_version == "1.1", upgrade if connection_upgrade else None, proxied


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Request target → (raw path, query string); absolute-form targets lose scheme and host."""
    if target[:1] != b"/":
        if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            authority = target.find(b"//") + 2
            ends = [i for i in (target.find(b"/", authority), target.find(b"?", authority)) if i != -1]
            target = target[min(ends) :] if ends else b"/"
            if target[:1] != b"/":
                target = b"/" + target
        elif target != b"*":
            raise HTTPError(400, "Invalid request target")
    path, _, query = target.partition(b"?")
    return path, query


# ``b"..." in data`` first tries the operand as an int and clears the error: 2-5x slower than
# ``data.find(b"...")``, or than testing for a single byte's value.
PERCENT = ord("%")


def decode_path(raw_path: bytes) -> str:
    if PERCENT not in raw_path and raw_path.isascii():
        return raw_path.decode("ascii")
    return unquote_to_bytes(raw_path).decode("utf-8", "replace")


def build_scope(
    method: bytes, target: bytes, http_version: str, headers: Headers,
    server: Any, client: Any, scheme: str, root_path: str, state: dict[str, Any],
) -> dict[str, Any]:
    """The ASGI ``http`` scope of a checked head; ``state`` is copied (lifespan state)."""
    raw_path, query = split_target(target)
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": http_version,
        "server": server,
        "client": client,
        "scheme": scheme,
        "method": _METHODS.get(method) or method.decode("ascii"),
        "root_path": root_path,
        "path": root_path + decode_path(raw_path) if root_path else decode_path(raw_path),
        "raw_path": root_path.encode() + raw_path if root_path else raw_path,
        "query_string": query,
        "headers": headers,
        "state": state.copy(),
    }
