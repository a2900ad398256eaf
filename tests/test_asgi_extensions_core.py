"""The framing decisions behind the ASGI extensions, in the sans-I/O HTTP/1.1 core: no sockets.
Which extensions a request scope lists, the bytes of a 103 Early Hints, the last chunk with
trailer fields (and when there is no room for them), the file framing of pathsend. The
black-box tests (test_asgi_extensions.py) check the same through real connections.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.http_client import build_request, parse_responses
from tests.test_h1_core import make
from uvworker.core.h1 import CLOSE, NEXT, BodyLengthError
from uvworker.core.request import accepts_trailers

HINTS = [b"</style.css>; rel=preload; as=style", b"</app.js>; rel=preload; as=script"]


@pytest.fixture(params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest) -> str:
    return request.param


def test_scope_lists_the_extensions_an_http11_request_can_use(parser: str) -> None:
    core, rec = make(parser)
    core.feed(build_request() + build_request())
    first = rec.scope()
    assert set(first["extensions"]) == {"http.response.pathsend", "http.response.early_hint", "http.response.trailers"}
    first["extensions"]["mine"] = {}  # an app's change stays in its own scope
    core.start(200, [])
    core.body(b"", False)
    core.next_request()
    assert "mine" not in rec.scope(1)["extensions"]
    core, rec = make(parser)
    core.feed(b"GET / HTTP/1.0\r\n\r\n")
    assert rec.scope()["extensions"] == {"http.response.pathsend": {}}  # no 1xx, no chunked trailers


def test_early_hint_is_a_103_with_one_link_field_per_value(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    data = core.early_hint(HINTS)
    (resp,) = parse_responses(data)
    assert (resp.status, resp.reason, resp.version) == (103, "Early Hints", "HTTP/1.1")
    assert resp.get_all("link") == [h.decode() for h in HINTS] and resp.headers == [("link", h.decode()) for h in HINTS]
    core.start(200, [])
    (final,) = parse_responses(core.body(b"ok", False))
    assert final.status == 200 and final.body == b"ok" and core.after == NEXT


def test_no_early_hint_for_an_http10_client(parser: str) -> None:
    core, _ = make(parser)
    core.feed(b"GET / HTTP/1.0\r\n\r\n")
    assert core.early_hint(HINTS) == b""


def respond_with_trailers(core: Any, headers: list[tuple[bytes, bytes]], pieces: list[bytes],
                          fields: list[tuple[bytes, bytes]], accepted: bool) -> bytes:
    """The stream's calls for a response started with trailers: every body piece says more,
    the trailers come, then the end (a last, empty piece)."""
    core.start(200, headers)
    out = [core.body(piece, True) for piece in pieces]
    out.append(core.trailers(fields, accepted))
    out.append(core.body(b"", False))
    return b"".join(part if type(part) is bytes else b"".join(part) for part in out)


def test_trailers_go_in_the_last_chunk_when_the_client_accepts_them(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request(headers=[("TE", "trailers")]))
    data = respond_with_trailers(core, [(b"trailer", b"x-checksum")], [b"hel", b"lo"], [(b"x-checksum", b"abc")], True)
    assert data.endswith(b"2\r\nlo\r\n0\r\nx-checksum: abc\r\n\r\n")
    (resp,) = parse_responses(data)
    assert resp.chunked and resp.body == b"hello" and resp.trailers == [("x-checksum", "abc")]
    assert core.after == NEXT


def test_one_piece_with_trailers_is_chunked_not_length_framed(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    data = respond_with_trailers(core, [], [b"hello"], [(b"x-checksum", b"abc")], True)
    (resp,) = parse_responses(data)
    assert resp.chunked and resp.body == b"hello" and resp.trailers == [("x-checksum", "abc")]


def test_trailers_are_dropped_when_not_accepted_and_the_message_still_ends(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    data = respond_with_trailers(core, [], [b"hello"], [(b"x-checksum", b"abc")], False)
    assert data.endswith(b"5\r\nhello\r\n0\r\n\r\n")
    (resp,) = parse_responses(data)
    assert resp.body == b"hello" and resp.trailers == [] and core.after == NEXT


def test_no_room_for_trailers_with_a_content_length_or_for_head(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    data = respond_with_trailers(core, [(b"content-length", b"5")], [b"hello"], [(b"x-a", b"1")], True)
    (resp,) = parse_responses(data)
    assert not resp.chunked and resp.body == b"hello" and core.after == NEXT
    core, _ = make(parser)
    core.feed(build_request("HEAD"))
    data = respond_with_trailers(core, [], [b"hello"], [(b"x-a", b"1")], True)
    assert data.endswith(b"\r\n\r\n") and b"hello" not in data and core.after == NEXT


def test_a_body_short_of_its_length_when_the_trailers_come_is_cut(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    core.start(200, [(b"content-length", b"10")])
    core.body(b"hello", True)
    assert core.trailers([], True) == b""
    with pytest.raises(BodyLengthError):
        core.body(b"", False)
    assert core.after == CLOSE


def test_a_file_is_framed_by_its_size(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request() + build_request("HEAD") + build_request())
    core.start(200, [])
    prefix, suffix = core.file(1000, False)
    assert prefix.endswith(b"content-length: 1000\r\n\r\n") and suffix == b"" and core.body(b"", False) == b""
    assert core.after == NEXT
    core.next_request()
    core.start(200, [])  # HEAD: the length a GET would get, and no body
    prefix, _ = core.file(1000, False)
    assert core.body(b"", False) == b"" and core.after == NEXT
    assert prefix.endswith(b"content-length: 1000\r\n\r\n") and prefix.count(b"content-length") == 1
    core.next_request()
    core.start(200, [])  # trailers follow: the file is one chunk
    prefix, suffix = core.file(1000, True)
    assert prefix.endswith(b"transfer-encoding: chunked\r\n\r\n3e8\r\n") and suffix == b"\r\n"
    assert core.trailers([(b"x-a", b"1")], True) == b"0\r\nx-a: 1\r\n\r\n"


def test_a_file_must_match_the_apps_content_length(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    core.start(200, [(b"content-length", b"1000")])
    prefix, _ = core.file(1000, False)
    assert prefix.count(b"content-length") == 1 and core.remaining == 0
    core, _ = make(parser)
    core.feed(build_request())
    core.start(200, [(b"content-length", b"10")])
    with pytest.raises(BodyLengthError) as info:
        core.file(1000, False)
    assert not info.value.committed and core.after == CLOSE  # nothing is out: the caller answers 500
    core, _ = make(parser)
    core.feed(build_request())
    core.start(304, [])
    prefix, _ = core.file(1000, False)
    assert b"content-length" not in prefix and prefix.endswith(b"\r\n\r\n")


def test_trailer_fields_are_checked_like_header_lines(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    core.start(200, [])
    core.body(b"hello", True)
    with pytest.raises(RuntimeError):
        core.trailers([(b"x-a", b"1\r\nx-injected: 1")], True)


@pytest.mark.parametrize(
    ("te", "expected"),
    [("trailers", True), ("gzip, trailers", True), ("Trailers", True), (" deflate;q=0.5 ,trailers ", True),
     ("gzip", False), ("trailersx", False), (None, False)],
)
def test_accepts_trailers_reads_the_te_list(te: str | None, expected: bool) -> None:
    headers = [(b"host", b"a")] + ([(b"te", te.encode())] if te is not None else [])
    assert accepts_trailers(headers) is expected
