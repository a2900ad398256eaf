"""Response heads for HTTP/1.1: status lines, checked and encoded header lines, the server's
own error answers. Sans-I/O: bytes in, bytes out.
"""

from __future__ import annotations

import email.utils
import re
import time
from http import HTTPStatus
from typing import Any

_TOKEN = is_token = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_BAD_VALUE = re.compile(rb"[\x00\r\n]").search


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}


# What a response header from the app means to the framing (0: nothing, pass it on).
RESP_LENGTH, RESP_CONNECTION, RESP_ENCODING, RESP_DEFAULTED = range(1, 5)
RESPONSE_HEADS = {
    b"content-length": RESP_LENGTH,
    b"connection": RESP_CONNECTION,
    b"transfer-encoding": RESP_ENCODING,
    b"server": RESP_DEFAULTED,
    b"date": RESP_DEFAULTED,
}
# Validated, encoded response header lines, keyed by the app's (name, value) tuple: most apps
# send the same few headers on every response. Bounded: cleared when full. The entry is
# (line, kind, Content-Length as an int, else 0): int(b"13") is ~1k instructions a response.
HEADER_LINES: dict[tuple[bytes, bytes], tuple[bytes, int, int]] = {}


def header_line(name: bytes, value: bytes) -> tuple[bytes, int]:
    """Validate one response header from the app; return its wire line and what it means to us."""
    if not _TOKEN(name):
        raise RuntimeError(f"Invalid HTTP header name {name!r}")
    if _BAD_VALUE(value):
        raise RuntimeError(f"Invalid HTTP header value {value!r}")
    kind = RESPONSE_HEADS.get(name.lower(), 0)
    if kind == RESP_LENGTH and not value.strip().isdigit():
        raise RuntimeError(f"Invalid Content-Length {value!r}")
    return b"%s: %s\r\n" % (name, value), kind


def error_response(status: int, reason: str, defaults: bytes, extra: bytes = b"") -> bytes:
    """A complete plain-text answer from the server itself, closing the connection."""
    body = reason.encode()
    return b"%s%s%scontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
        STATUS_LINES[status], defaults, extra, len(body), body
    )


class HeadDefaults:
    """The headers the server adds to every response — Server, the --header ones, Date —
    pre-encoded once (``encoded`` for HTTP/1.1, ``pairs`` for HTTP/2); ``refresh`` renews the
    Date line when the second changes."""

    __slots__ = ("fixed", "with_date", "encoded", "pairs", "_date", "_second")

    def __init__(self, fixed: list[tuple[bytes, bytes]], date: bool, now: float = 0.0) -> None:
        self.fixed = fixed
        self.with_date = date
        self.encoded = b""
        self._date: list[tuple[bytes, bytes]] = []
        self._second = -1
        self.refresh(now or time.time())

    def refresh(self, now: float) -> None:
        second = int(now)
        if second != self._second:
            self._second = second
            if self.with_date:
                self._date = [(b"date", email.utils.formatdate(second, usegmt=True).encode())]
            self.pairs = [(name.lower(), value) for name, value in self.fixed + self._date]
            self.encoded = b"".join(b"%s: %s\r\n" % pair for pair in self.fixed + self._date)

    def without(self, app_headers: Any) -> bytes:
        """The default lines, less those the app sets itself (Server, Date)."""
        own = {name.lower() for name, _ in app_headers}
        return b"".join(b"%s: %s\r\n" % pair for pair in self.fixed + self._date if pair[0] not in own)
