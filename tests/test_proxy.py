"""Trusted proxies, X-Forwarded-*/Forwarded headers and the PROXY protocol (pure functions)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from uvworker.proxy import (
    ProxyInfo,
    ProxyProtocolError,
    TrustedHosts,
    apply_proxy_headers,
    parse_proxy_protocol,
)

# --- TrustedHosts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, host, expected",
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.2", False),
        ("10.0.0.0/8", "10.200.3.4", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("10.1.2.3/8", "10.9.9.9", True),  # host bits set: still the /8 network
        ("::1", "::1", True),
        ("2001:db8::/32", "2001:db8:cafe::17", True),
        ("2001:db8::/32", "2001:db9::1", False),
        ("127.0.0.1", "::ffff:127.0.0.1", True),  # IPv4 peer on a dual-stack socket
        ("192.168.0.1, 10.0.0.0/8", "10.0.0.5", True),
        (["192.168.0.1", "::1,10.0.0.1"], "10.0.0.1", True),
        ("*", "203.0.113.9", True),
        ("*", "unknown", True),
        ("127.0.0.1", "unknown", False),
        ("127.0.0.1", "_hidden", False),
        ("127.0.0.1", None, True),  # Unix-socket peer
        ("127.0.0.1", "", True),
    ],
)
def test_trusted_hosts(spec: str | list[str], host: str | None, expected: bool) -> None:
    trusted = TrustedHosts(spec)
    assert (host in trusted) is expected
    assert (host in trusted) is expected  # answered from the cache the second time


def test_trusted_hosts_rejects_names() -> None:
    with pytest.raises(ValueError, match="'localhost' in the trusted proxy list"):
        TrustedHosts("127.0.0.1,localhost")


# --- proxy headers -----------------------------------------------------------------------

PROXY = ("10.0.0.1", 40000)


def scope_with(*headers: tuple[str, str], client: Any = PROXY, kind: str = "http") -> dict:
    return {
        "type": kind,
        "scheme": "ws" if kind == "websocket" else "http",
        "client": client,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }


def apply(scope: dict, spec: str = "10.0.0.0/8") -> tuple[Any, str]:
    apply_proxy_headers(scope, TrustedHosts(spec))
    return scope["client"], scope["scheme"]


def test_untrusted_peer_is_ignored() -> None:
    scope = scope_with(("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "https"))
    assert apply(scope, "127.0.0.1") == (PROXY, "http")


def test_no_proxy_headers_leave_scope_alone() -> None:
    assert apply(scope_with(("Host", "example.com"))) == (PROXY, "http")


def test_unix_socket_peer_is_trusted() -> None:
    scope = scope_with(("X-Forwarded-For", "1.2.3.4"), client=None)
    assert apply(scope, "127.0.0.1") == (("1.2.3.4", 0), "http")


@pytest.mark.parametrize(
    "xff, client",
    [
        ("1.2.3.4", ("1.2.3.4", 0)),
        ("1.2.3.4:5678", ("1.2.3.4", 5678)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("2001:db8::1", ("2001:db8::1", 0)),
        ("6.6.6.6, 1.2.3.4, 10.0.0.7, 10.0.0.8", ("1.2.3.4", 0)),  # skip trusted hops
        ("10.0.0.5, 10.0.0.7", ("10.0.0.5", 0)),  # all trusted: the leftmost
        ("unknown", ("unknown", 0)),
        ("1.2.3.4, , 10.0.0.7", ("1.2.3.4", 0)),
    ],
)
def test_x_forwarded_for(xff: str, client: tuple[str, int]) -> None:
    assert apply(scope_with(("X-Forwarded-For", xff)))[0] == client


def test_repeated_x_forwarded_for_headers_form_one_chain() -> None:
    scope = scope_with(("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-For", "10.0.0.9"))
    assert apply(scope)[0] == ("1.2.3.4", 0)


@pytest.mark.parametrize(
    "proto, kind, scheme",
    [
        ("https", "http", "https"),
        ("HTTPS", "http", "https"),
        ("http", "http", "http"),
        ("https", "websocket", "wss"),
        ("wss", "websocket", "wss"),
        ("http", "websocket", "ws"),
        ("gopher", "http", "http"),  # not a scheme we know: ignored
    ],
)
def test_x_forwarded_proto(proto: str, kind: str, scheme: str) -> None:
    scope = scope_with(("X-Forwarded-Proto", proto), kind=kind)
    assert apply(scope) == (PROXY, scheme)


@pytest.mark.parametrize(
    "xff, xfp, expected",
    [
        ("1.2.3.4, 10.0.0.2", "https, http", ("1.2.3.4", "https")),  # aligned lists
        ("1.2.3.4, 10.0.0.2", "https", ("1.2.3.4", "https")),  # one proto for the chain
        ("10.0.0.5, 1.2.3.4", "https, http", ("1.2.3.4", "http")),
    ],
)
def test_proto_follows_the_chosen_hop(xff: str, xfp: str, expected: tuple[str, str]) -> None:
    client, scheme = apply(scope_with(("X-Forwarded-For", xff), ("X-Forwarded-Proto", xfp)))
    assert (client[0], scheme) == expected


@pytest.mark.parametrize(
    "forwarded, client, scheme",
    [
        ("for=1.2.3.4", ("1.2.3.4", 0), "http"),
        ("for=1.2.3.4;proto=https", ("1.2.3.4", 0), "https"),
        ('For="1.2.3.4:8080"; Proto=HTTPS', ("1.2.3.4", 8080), "https"),
        ('for="[2001:db8:cafe::17]:4711"', ("2001:db8:cafe::17", 4711), "http"),
        ('for="[2001:db8:cafe::17]"', ("2001:db8:cafe::17", 0), "http"),
        ("for=unknown", ("unknown", 0), "http"),
        ("for=_hidden;proto=https", ("_hidden", 0), "https"),
        ('for="_a\\"b"', ('_a"b', 0), "http"),  # quoted-pair
        ('for=1.2.3.4;by="x,y";proto=https', ("1.2.3.4", 0), "https"),  # comma inside quotes
        ("for=6.6.6.6, for=1.2.3.4;proto=https, for=10.0.0.3", ("1.2.3.4", 0), "https"),
        ("for=10.0.0.4;proto=https, for=10.0.0.3", ("10.0.0.4", 0), "https"),  # all trusted
        ("for=1.2.3.4,", ("1.2.3.4", 0), "http"),  # empty list element
        ("proto=https", PROXY, "https"),  # no for=: the client stays the peer
    ],
)
def test_forwarded(forwarded: str, client: tuple[str, int], scheme: str) -> None:
    assert apply(scope_with(("Forwarded", forwarded))) == (client, scheme)


def test_forwarded_wins_over_x_forwarded() -> None:
    scope = scope_with(
        ("X-Forwarded-For", "5.5.5.5"),
        ("Forwarded", "for=1.2.3.4;proto=https"),
        ("X-Forwarded-Proto", "http"),
    )
    assert apply(scope) == (("1.2.3.4", 0), "https")


@pytest.mark.parametrize("forwarded", ["for", "for=1.2.3.4 proto=https", 'for="1.2.3.4', ""])
def test_malformed_forwarded_falls_back_to_x_forwarded(forwarded: str) -> None:
    scope = scope_with(("Forwarded", forwarded), ("X-Forwarded-For", "5.5.5.5"))
    assert apply(scope)[0] == ("5.5.5.5", 0)


# --- PROXY protocol ----------------------------------------------------------------------

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIG + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


V2_TCP4 = v2(1, 0x11, bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 5000, 443))
V2_TCP6 = v2(
    1,
    0x21,
    bytes.fromhex("20010db8" + "00" * 11 + "01")
    + bytes.fromhex("20010db8" + "00" * 11 + "02")
    + struct.pack("!HH", 6000, 8443),
)
V2_INFO = ProxyInfo(28, ("192.0.2.1", 5000), ("198.51.100.2", 443))
TLV = bytes([0x04]) + struct.pack("!H", 3) + b"abc"  # a PP2_TYPE_NOOP TLV


@pytest.mark.parametrize(
    "data, info",
    [
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\nGET /",
            ProxyInfo(44, ("192.0.2.1", 5000), ("198.51.100.2", 443)),
        ),
        (
            b"PROXY TCP6 2001:DB8:0:0::1 ::1 65535 0\r\n",
            ProxyInfo(40, ("2001:db8::1", 65535), ("::1", 0)),
        ),
        (b"PROXY UNKNOWN\r\nGET", ProxyInfo(15, None, None)),
        (b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n", ProxyInfo(31, None, None)),
        (V2_TCP4 + b"GET /", V2_INFO),
        (V2_TCP6, ProxyInfo(52, ("2001:db8::1", 6000), ("2001:db8::2", 8443))),
        (v2(1, 0x11, V2_TCP4[16:] + TLV), ProxyInfo(34, *V2_INFO[1:])),  # TLVs skipped
        (v2(0, 0x00, b"") + b"GET", ProxyInfo(16, None, None)),  # LOCAL
        (v2(0, 0x11, V2_TCP4[16:]), ProxyInfo(28, None, None)),  # LOCAL ignores addresses
        (v2(1, 0x00, TLV), ProxyInfo(22, None, None)),  # AF_UNSPEC
        (v2(1, 0x31, b"/a".ljust(108, b"\0") * 2), ProxyInfo(232, None, None)),  # AF_UNIX
    ],
)
def test_proxy_protocol_valid(data: bytes, info: ProxyInfo) -> None:
    assert parse_proxy_protocol(data) == info
    assert parse_proxy_protocol(bytearray(data)) == info


@pytest.mark.parametrize(
    "header",
    [b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n", V2_TCP4, v2(1, 0x11, V2_TCP4[16:] + TLV)],
)
def test_proxy_protocol_needs_more_bytes(header: bytes) -> None:
    for size in range(len(header)):
        assert parse_proxy_protocol(header[:size]) is None, size


@pytest.mark.parametrize(
    "data, message",
    [
        (b"GET / HTTP/1.1\r\n", "did not start with a PROXY"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\n", "CRLF"),
        (b"PROXY TCP4 " + b"1" * 100, "longer than 107"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 5000\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.1  198.51.100.2 5000 443\r\n", "malformed"),
        (b"PROXY TCP4 2001:db8::1 ::1 5000 443\r\n", "malformed"),
        (b"PROXY TCP6 192.0.2.1 198.51.100.2 5000 443\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 65536\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 443\r\n", "malformed"),
        (b"PROXY UDP4 192.0.2.1 198.51.100.2 5000 443\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.\xff 198.51.100.2 5000 443\r\n", "malformed"),
        (V2_SIG + bytes([0x11, 0x11, 0, 0]), "version or command"),
        (V2_SIG + bytes([0x22, 0x11, 0, 0]), "version or command"),
        (V2_SIG + bytes([0x21, 0x41, 0, 0]), "address family"),
        (v2(1, 0x11, b"\0" * 11), "truncated"),
        (v2(1, 0x21, V2_TCP4[16:]), "truncated"),
    ],
)
def test_proxy_protocol_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_protocol(data)
    assert issubclass(ProxyProtocolError, ValueError)
