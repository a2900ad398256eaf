"""The agreement table (``uvworker/core/parsers.py``) as a client sees it, over real sockets, on
both parsers: for each class of input, the status of the answer, that the connection closes
after a refusal, and that a request pipelined behind a refused one is never served.

Each case comes from the raw-request corpus (``agreement_corpus.py``), which also pins its
outcome; the sans-I/O differential tests are in ``test_parser_agreement.py``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.agreement_corpus import CORPUS
from tests.http_client import Conn, parse_responses

FOLLOW = b"GET /follow HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"


class EchoApp:
    """Answers 200 with what it read: method, path, query string, body; keeps the scopes."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.scopes.append(scope)
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        text = b"%s %s ?%s %s" % (scope["method"].encode(), scope["path"].encode(), scope["query_string"], body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(text))]})
        await send({"type": "http.response.body", "body": text})

    @property
    def paths(self) -> list[str]:
        return [scope["path"] for scope in self.scopes]


def expected_statuses(outcome: tuple[object, ...]) -> list[int]:
    """The answers a client gets for a corpus outcome, followed by FOLLOW (served after accepted
    requests, never after a refusal)."""
    *requests, end = outcome
    statuses = [200 for state in requests if state == "ok"]
    return [*statuses, end] if isinstance(end, int) else [*statuses, 200]


def answers(srv: Any, raw: bytes, timeout: float = 5.0) -> list[Any]:
    with Conn.open(srv.host, srv.port) as conn:
        conn.send(raw + FOLLOW)
        data = conn.read_until_close(timeout)
    return parse_responses(data)


# Each class of the table, by the corpus cases that show it.
CLASSES: dict[str, list[str]] = {
    "empty-lines-before-request": ["leading-crlf", "leading-crlf-many", "crlf-between-requests"],
    "bare-lf-or-cr-in-head": [
        "leading-bare-lf", "leading-bare-cr", "bare-lf-everywhere", "bare-lf-field", "bare-lf-end-of-head",
        "bare-cr-request-line", "bare-cr-in-value", "bare-lf-in-value-looks-like-field",
    ],
    "first-byte-cannot-start-a-request": ["tls-client-hello", "binary-first-byte", "space-first"],
    "request-line-not-three-parts": [
        "http09-form", "two-spaces-before-target", "two-spaces-before-version", "trailing-space",
        "htab-separator", "extra-token", "space-in-target",
    ],
    "protocol-not-http": ["version-rtsp", "version-ice", "version-lowercase", "version-1", "version-1.10"],
    "later-http1-minor-served-as-1.1": ["version-1.2", "version-1.9", "version-1.2-keeps-alive"],
    "other-major-versions-505": ["version-2.0", "version-3.0", "version-0.9", "http2-preface", "version-2.0-bad-field"],
    "method-not-a-token-400": ["method-not-token", "method-at", "method-8bit"],
    "method-unknown-token-501": ["method-lowercase", "method-unknown-token", "method-pri-http11", "method-rtsp-only"],
    "connect-501": ["method-connect-authority", "method-connect-origin", "method-connect-with-body"],
    "target-bytes-and-forms": [
        "target-del", "target-8bit", "target-asterisk-get", "target-asterisk-path", "target-authority-form-get",
        "target-relative", "absolute-form-userinfo", "absolute-form-empty-host", "absolute-form-ftp",
        "absolute-form-fragment-after-host", "target-odd-ascii", "options-asterisk", "absolute-form",
    ],
    "absolute-form-authority-and-host": [
        "absolute-form-default-port", "absolute-form-port", "absolute-form-other-host", "absolute-form-other-port",
    ],
    "host-grammar": [
        "host-space-slash", "host-slash", "host-userinfo", "host-bad-port", "host-two-ports", "host-8bit",
        "host-empty", "host-ipv6", "host-empty-port",
    ],
    "host-missing-or-twice": ["host-missing", "host-twice-same", "host-twice-other"],
    "field-names": [
        "field-space-before-colon", "field-htab-before-colon", "te-space-before-colon", "field-no-colon",
        "field-empty-name", "field-name-8bit", "field-name-nul", "field-name-del", "field-token-specials-name",
    ],
    "obsolete-line-folding": ["obs-fold-space", "obs-fold-htab", "obs-fold-first-field", "obs-fold-te"],
    "control-bytes-in-values": [
        "field-value-nul", "field-value-soh", "field-value-del", "field-value-vt", "field-value-esc",
        "field-8bit-value", "field-htab-in-value",
    ],
    "single-fields-repeated": [
        "content-type-twice-different", "authorization-twice-different", "origin-twice-different",
        "content-type-repeated-same",
    ],
    "content-length-grammar": [
        "cl-plus", "cl-minus", "cl-list-same", "cl-list-different", "cl-two-numbers", "cl-hex", "cl-empty",
        "cl-20-digits", "cl-leading-zeros", "cl-leading-space",
    ],
    "content-length-twice": ["cl-duplicate-same", "cl-duplicate-different"],
    "content-length-with-transfer-encoding": ["cl-te", "te-cl", "cl-te-gzip", "cl-te-obfuscated-name", "cl-te-folded"],
    "transfer-encoding-other-than-chunked-501": [
        "te-gzip", "te-identity", "te-gzip-chunked", "te-chunked-gzip", "te-unknown", "te-xchunked",
        "te-chunked-param", "te-empty", "te-8bit-lookalike",
    ],
    "chunked-twice-or-in-http10-400": ["te-chunked-twice-list", "te-chunked-twice-fields", "te-http10"],
    "chunked-coding-spellings": ["post-chunked-coding-case", "post-chunked-coding-ows", "te-uppercase-name"],
    "chunk-size": [
        "chunk-size-leading-zeros", "chunk-size-many-zeros", "chunk-size-17-digits", "chunk-size-overflow-wraps-to-5",
        "chunk-size-negative", "chunk-size-0x", "chunk-size-empty", "chunk-size-trailing-junk",
    ],
    "whitespace-in-chunk-lines": [
        "chunk-size-trailing-space", "last-chunk-trailing-space", "chunk-size-leading-space",
        "chunk-ext-bws-before-semicolon", "chunk-ext-bws-after-semicolon", "chunk-ext-bws-around-equals",
    ],
    "chunk-extensions": [
        "chunk-ext-token", "chunk-ext-token-value", "chunk-ext-quoted", "chunk-ext-empty", "chunk-ext-empty-name",
        "chunk-ext-empty-value", "chunk-ext-unclosed-quote", "chunk-ext-quote-then-junk", "chunk-ext-8bit-token",
        "chunk-ext-too-long",
    ],
    "bare-cr-lf-in-chunked-framing": [
        "chunk-size-bare-lf", "last-chunk-bare-lf", "chunk-size-bare-cr", "chunk-ext-bare-cr", "chunk-ext-bare-lf",
        "chunk-data-no-crlf", "chunk-data-bare-lf", "chunk-data-short-then-request",
    ],
    "trailers": [
        "trailer-ok", "trailer-then-request", "trailer-content-length", "trailer-transfer-encoding", "trailer-host",
        "trailer-authorization", "trailer-obs-fold", "trailer-bare-lf", "cl-te-in-trailer",
    ],
    "upgrade-request-bodies": ["upgrade-body-length", "upgrade-body-chunked", "upgrade-body-then-request", "upgrade-h2c-then-request"],
    "limits": [
        "limit-request-line-at", "limit-request-line-over", "limit-field-at", "limit-field-over", "limit-fields-at",
        "limit-fields-over", "limit-over-beats-bad-byte", "limit-oversize-bad-line", "limit-head-bound",
    ],
}


@pytest.mark.parametrize("table_class", list(CLASSES))
def test_table_class(serve: Any, table_class: str) -> None:
    app = EchoApp()
    with serve(app, http2=False) as srv:  # the HTTP/1 table: the h2c preface is HTTP/2's (test_http2.py)
        for name in CLASSES[table_class]:
            raw, outcome = CORPUS[name]
            responses = answers(srv, raw)
            expected = expected_statuses(outcome)
            assert [r.status for r in responses] == expected, (name, responses)
            if expected[-1] != 200:
                assert responses[-1].has_token("connection", "close"), (name, responses[-1].headers)
    assert "/smuggled" not in app.paths
    refused = sum(expected_statuses(CORPUS[name][1])[-1] != 200 for name in CLASSES[table_class])
    assert app.paths.count("/follow") == len(CLASSES[table_class]) - refused


def test_every_class_has_a_corpus_case() -> None:
    names = {name for names in CLASSES.values() for name in names}
    assert names <= CORPUS.keys(), names - CORPUS.keys()


def test_what_the_app_reads(serve: Any) -> None:
    """Accepted odd requests reach the app as the table says: fragments dropped, 1.x served as
    1.1, trailers never merged, absolute-form reduced to path and query."""
    app = EchoApp()
    with serve(app) as srv:
        for raw in (
            b"GET /a?b=1#frag?x HTTP/1.1\r\nHost: example.com\r\n\r\n",
            b"GET /c#d?e=1 HTTP/1.2\r\nHost: example.com\r\n\r\n",
            b"GET HTTP://Example.COM:80/p%20q?r HTTP/1.1\r\nHost: example.com\r\n\r\n",
            b"POST /t HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=\"a b\"\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n",
        ):
            responses = answers(srv, raw)
            assert [r.status for r in responses] == [200, 200], responses
            assert responses[0].version == "HTTP/1.1"
    a, c, p, t = app.scopes[0], app.scopes[2], app.scopes[4], app.scopes[6]
    assert (a["path"], a["raw_path"], a["query_string"]) == ("/a", b"/a", b"b=1")
    assert (c["path"], c["query_string"], c["http_version"]) == ("/c", b"", "1.1")
    assert (p["path"], p["raw_path"], p["query_string"]) == ("/p q", b"/p%20q", b"r")
    assert t["path"] == "/t" and all(name != b"x-checksum" for name, _ in t["headers"])


@pytest.mark.parametrize(
    "chunks",
    [b"0 \r\n\r\n", b"5\nhello\r\n0\r\n\r\n", b"0\n\n", b"5;a\rb\r\nhello\r\n0\r\n\r\n", b"5;\r\nhello\r\n0\r\n\r\n"],
    ids=["space-after-size", "bare-lf-chunk-line", "bare-lf-last-chunk", "bare-cr-in-extension", "empty-extension"],
)
def test_bad_chunk_lines_are_answered_at_once(serve: Any, chunks: bytes) -> None:
    # The client sends nothing more: the answer must not wait for the body timeout.
    app = EchoApp()
    head = b"POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    with serve(app, timeout_request_body=30.0) as srv, Conn.open(srv.host, srv.port) as conn:
        started = time.monotonic()
        conn.send(head + chunks)
        data = conn.read_until_close(timeout=3.0)
        assert time.monotonic() - started < 3.0
    assert [r.status for r in parse_responses(data)] == [400], data


def test_request_split_byte_by_byte_gets_the_same_answer(serve: Any) -> None:
    app = EchoApp()
    cases = ["method-unknown-token", "version-2.0", "te-gzip-chunked", "chunk-ext-quoted", "limit-fields-over", "host-space-slash"]
    with serve(app) as srv:
        for name in cases:
            raw, outcome = CORPUS[name]
            with Conn.open(srv.host, srv.port) as conn:
                for i in range(len(raw)):
                    conn.send(raw[i : i + 1])
                conn.send(FOLLOW)
                responses = parse_responses(conn.read_until_close(5.0))
            assert [r.status for r in responses] == expected_statuses(outcome), name
