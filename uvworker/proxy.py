"""Trusted proxies: X-Forwarded-For/-Proto and RFC 7239 Forwarded headers, and the PROXY protocol.

Rules kept here:
- Proxy headers change scope["client"]/["scheme"] only when the peer itself is trusted.
- A peer on a Unix socket (client None or "") is trusted: only local processes allowed by the
  socket file's permissions can connect, and a reverse proxy is the usual one (Gunicorn agrees).
- A parseable Forwarded header wins; X-Forwarded-For/-Proto are then ignored. Mixing two
  descriptions of the same chain would let either contradict the other.
- Chains are walked from the right (the hop our peer added) past trusted proxies; the first
  untrusted hop is the client. If every hop is trusted, the leftmost is the client.
- The client port is 0 when the proxy does not say; "unknown" and obfuscated identifiers
  ("_hidden") are kept as the client host.

The PROXY protocol parser is sans-I/O: it looks at the bytes received so far and says "need
more", "malformed", or what the header says and how many bytes it took.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Iterable
from typing import Any, NamedTuple

_CACHE_SIZE = 1024  # hop addresses come from clients: keep the cache bounded


class TrustedHosts:
    """The proxies we believe: IP addresses and networks (v4 and v6), or "*" for everyone.

    ``spec`` is a comma-separated string or a list of such strings. ``host in trusted``
    takes a host string (or None for a Unix-socket peer, which is trusted)."""

    def __init__(self, spec: str | Iterable[str]) -> None:
        items = [
            item.strip()
            for part in ([spec] if isinstance(spec, str) else spec)
            for item in part.split(",")
            if item.strip()
        ]
        self.always = "*" in items
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in items:
            if item == "*":
                continue
            try:
                self._networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(
                    f"{item!r} in the trusted proxy list is not an IP address or network."
                ) from None
        self._cache: dict[str, bool] = {}

    def __contains__(self, host: str | None) -> bool:
        if self.always or not host:
            return True
        trusted = self._cache.get(host)
        if trusted is None:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            trusted = self._cache[host] = self._match(host)
        return trusted

    def _match(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False  # "unknown", obfuscated names, garbage: never a trusted proxy
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
        return any(ip in network for network in self._networks)


_PROXY_HEADERS = frozenset((b"forwarded", b"x-forwarded-for", b"x-forwarded-proto"))
_SECURE = {"http": False, "https": True, "ws": False, "wss": True}
# One Forwarded list item: an optional name=value pair (value a token or a quoted string),
# then ";" (next pair, same element), "," (next element) or the end.
_FORWARDED_PAIR = re.compile(r'\s*(?:([^=;,\s]+)=("(?:[^"\\]|\\.)*"|[^;,\s"]*)\s*)?([;,]|\Z)')
_QUOTED_PAIR = re.compile(r"\\(.)")

_Hop = tuple[str | None, int, str | None]  # client host (None: not given), port, proto


def apply_proxy_headers(scope: dict[str, Any], trusted: TrustedHosts) -> None:
    """Set scope["client"] and scope["scheme"] from the proxy headers, if the peer is trusted."""
    client = scope.get("client")
    if (client[0] if client else None) not in trusted:
        return
    found: dict[bytes, bytes] | None = None
    for name, value in scope["headers"]:
        if name in _PROXY_HEADERS:
            found = found or {}
            found[name] = found[name] + b"," + value if name in found else value
    if found is None:
        return
    hop = _forwarded_hop(found[b"forwarded"], trusted) if b"forwarded" in found else None
    if hop is None:
        xff, xfp = found.get(b"x-forwarded-for"), found.get(b"x-forwarded-proto")
        hop = _x_forwarded_hop(xff, xfp, trusted)
    host, port, proto = hop
    if host is not None:
        scope["client"] = (host, port)
    if proto is not None and proto.lower() in _SECURE:
        secure = _SECURE[proto.lower()]
        if scope["type"] == "websocket":
            scope["scheme"] = "wss" if secure else "ws"
        else:
            scope["scheme"] = "https" if secure else "http"


def _forwarded_hop(value: bytes, trusted: TrustedHosts) -> _Hop | None:
    """The client's hop from a Forwarded header, or None if it is malformed or empty.

    An element without for= is a hop we know nothing about, so it counts as untrusted."""
    elements = _parse_forwarded(value.decode("latin-1"))
    if not elements:
        return None
    for element in reversed(elements):
        node = element.get("for")
        if node is None or _node(node)[0] not in trusted:
            break
    host, port = _node(element["for"]) if "for" in element else (None, 0)
    return host, port, element.get("proto")


def _parse_forwarded(text: str) -> list[dict[str, str]] | None:
    elements: list[dict[str, str]] = [{}]
    pos = 0
    while pos < len(text):
        match = _FORWARDED_PAIR.match(text, pos)
        if match is None:
            return None
        name, value, separator = match.groups()
        if name is not None:
            if value.startswith('"'):
                value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
            elements[-1][name.lower()] = value
        if separator == ",":
            elements.append({})
        pos = match.end()
    return [element for element in elements if element]


def _x_forwarded_hop(xff: bytes | None, xfp: bytes | None, trusted: TrustedHosts) -> _Hop:
    """The client's hop from X-Forwarded-For/-Proto. Each proxy appends to both, so the
    scheme is the X-Forwarded-Proto entry as far from the right as the chosen address (or
    the leftmost one, when that list is shorter)."""
    host, port, index = None, 0, 0
    if xff:
        hops = [_node(item) for item in xff.decode("latin-1").split(",") if item.strip()]
        for index, (host, port) in enumerate(reversed(hops)):
            if host not in trusted:
                break  # else the loop ends on the leftmost hop, which is what we want
    if not xfp:
        return host, port, None
    protos = [item.strip() for item in xfp.decode("latin-1").split(",")]
    return host, port, protos[max(len(protos) - 1 - index, 0)]


def _node(value: str) -> tuple[str, int]:
    """Split "host", "host:port", "[v6]", "[v6]:port" or a bare IPv6 address."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    return host, _port(port) or 0


def _port(text: str) -> int | None:
    if text.isascii() and text.isdigit() and int(text) <= 65535:
        return int(text)
    return None


# --- PROXY protocol ----------------------------------------------------------------------

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# v2 address families: the layout of their address block and the socket family.
_V2_FAMILIES: dict[int, tuple[struct.Struct, int] | None] = {
    0x0: None,  # AF_UNSPEC: no addresses
    0x1: (struct.Struct("!4s4sHH"), socket.AF_INET),
    0x2: (struct.Struct("!16s16sHH"), socket.AF_INET6),
    0x3: (struct.Struct("!108s108s"), socket.AF_UNIX),
}


class ProxyProtocolError(ValueError):
    """The connection does not start with a valid PROXY protocol header."""


class ProxyInfo(NamedTuple):
    """What a PROXY header says. ``client``/``server`` are None when the proxy does not give
    IP addresses (v1 UNKNOWN, v2 LOCAL — e.g. the proxy's own health checks — AF_UNSPEC and
    AF_UNIX); the connection's own addresses apply then."""

    consumed: int  # header length: the request starts at this offset
    client: tuple[str, int] | None
    server: tuple[str, int] | None


# The extension a connection that began with a PROXY header lists in its scopes: the peer that
# sent the header and what it said, in Gunicorn's words (its req.proxy_protocol_info).
PROXY_EXTENSION = "uvworker.proxy_protocol"


def proxy_extension(peer: tuple[str, int | None] | None, info: ProxyInfo) -> dict[str, Any]:
    """The PROXY_EXTENSION dict of a connection from ``peer`` whose header said ``info``."""
    client, server = info.client or ("", 0), info.server or ("", 0)
    return {
        "peer": peer,
        "info": {
            "proxy_protocol": "TCP6" if ":" in client[0] else "TCP4",
            "client_addr": client[0], "client_port": client[1],
            "proxy_addr": server[0], "proxy_port": server[1],
        },
    }


def parse_proxy_protocol(buf: bytes | bytearray) -> ProxyInfo | None:
    """Parse a PROXY v1 or v2 header at the start of ``buf``: None means more bytes are
    needed (at most 107 for v1, 16 + 65535 for v2); malformed input raises
    ProxyProtocolError."""
    if buf[:6] == V1_PREFIX:
        return _parse_v1(buf)
    if buf[:12] == V2_SIGNATURE:
        return _parse_v2(buf)
    if V1_PREFIX.startswith(buf[:6]) or V2_SIGNATURE.startswith(buf[:12]):
        return None
    raise ProxyProtocolError("The connection did not start with a PROXY protocol header.")


def _parse_v1(buf: bytes | bytearray) -> ProxyInfo | None:
    end = buf.find(b"\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(buf) < V1_MAX_LENGTH:
            return None
        raise ProxyProtocolError("The PROXY v1 header is longer than 107 bytes.")
    line = bytes(buf[len(V1_PREFIX) : end])
    if not line.endswith(b"\r"):
        raise ProxyProtocolError("The PROXY v1 header does not end with CRLF.")
    fields = line[:-1].split(b" ")
    if fields[0] == b"UNKNOWN":
        return ProxyInfo(end + 1, None, None)
    try:
        family, src, dst, sport, dport = (field.decode("ascii") for field in fields)
        version = {"TCP4": 4, "TCP6": 6}[family]
        client = (_ip(src, version), _strict_port(sport))
        server = (_ip(dst, version), _strict_port(dport))
    except (ValueError, KeyError):
        raise ProxyProtocolError(f"The PROXY v1 header {line[:-1]!r} is malformed.") from None
    return ProxyInfo(end + 1, client, server)


def _ip(text: str, version: int) -> str:
    ip = ipaddress.ip_address(text)
    if ip.version != version:
        raise ValueError(f"not an IPv{version} address")
    return str(ip)


def _strict_port(text: str) -> int:
    port = _port(text)
    if port is None:
        raise ValueError("invalid port")
    return port


def _parse_v2(buf: bytes | bytearray) -> ProxyInfo | None:
    if len(buf) < 16:
        return None
    version_command, family_transport, length = struct.unpack_from("!BBH", buf, 12)
    if version_command >> 4 != 2 or version_command & 0xF > 1:
        raise ProxyProtocolError("The PROXY v2 header has an unknown version or command.")
    family, transport = family_transport >> 4, family_transport & 0xF
    if family not in _V2_FAMILIES or transport > 2:
        raise ProxyProtocolError("The PROXY v2 header has an unknown address family.")
    end = 16 + length
    if len(buf) < end:
        return None
    layout = _V2_FAMILIES[family]
    if version_command & 0xF == 0 or layout is None:  # LOCAL, or PROXY without addresses
        return ProxyInfo(end, None, None)
    addresses, socket_family = layout
    if length < addresses.size:
        raise ProxyProtocolError("The PROXY v2 address block is truncated.")
    if socket_family == socket.AF_UNIX:
        return ProxyInfo(end, None, None)
    src, dst, sport, dport = addresses.unpack_from(buf, 16)  # TLVs after this are skipped
    client = (socket.inet_ntop(socket_family, src), sport)
    return ProxyInfo(end, client, (socket.inet_ntop(socket_family, dst), dport))
