"""The ASGI extensions on HTTP/1.1 as clients see them, on both parsers: 103 Early Hints,
response trailers, which extensions a scope lists. Raw sockets show the bytes; curl, a client
we did not write, shows what it makes of them. The framing decisions themselves are pinned
down without sockets in test_asgi_extensions_core.py.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import httpx
import pytest

from tests.http_client import Conn, build_request, capture_log

HINTS = [b"</style.css>; rel=preload; as=style", b"</app.js>; rel=preload; as=script"]
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-s", "--max-time", "10", *args], capture_output=True, timeout=20)


# -- which extensions a scope lists ------------------------------------------------------------------
def scope_app(seen: list[dict[str, Any]]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_extensions_listed_by_http_version(serve: Any) -> None:
    seen: list[dict[str, Any]] = []
    with serve(scope_app(seen)) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        assert conn.read_response().status == 200
        conn.send(build_request(version="1.0", headers=[("Connection", "keep-alive")]))
        assert conn.read_response().status == 200
    assert set(seen[0]["extensions"]) >= {"http.response.early_hint", "http.response.trailers"}
    assert "tls" not in seen[0]["extensions"]  # plaintext
    assert not {"http.response.early_hint", "http.response.trailers"} & set(seen[1]["extensions"])


# -- early hints -----------------------------------------------------------------------------------
def hint_app(when: str = "before") -> Any:
    """Sends its hint before the response starts, after (the head waits for the first body
    piece: the 103 still goes first), or after a body piece (the final head is out: dropped,
    never in the middle of the body)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        hint = {"type": "http.response.early_hint", "links": HINTS}
        streaming = when == "streaming"
        if when == "before":
            await send(hint)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"link", b"</style.css>; rel=preload")]})
        if when == "after_start":
            await send(hint)
        if streaming:
            await send({"type": "http.response.body", "body": b"he", "more_body": True})
            await send(hint)
        await send({"type": "http.response.body", "body": b"llo" if streaming else b"hello"})

    return app


@pytest.mark.parametrize("when", ["before", "after_start"])
def test_early_hints_come_before_the_response(serve: Any, when: str) -> None:
    with serve(hint_app(when)) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(2):
            conn.send(build_request())
            hints = conn.read_response()
            assert (hints.status, hints.reason) == (103, "Early Hints")
            assert hints.get_all("link") == [h.decode() for h in HINTS]
            final = conn.read_response()
            assert final.status == 200 and final.body == b"hello"
        conn.assert_open()


def test_a_late_early_hint_is_dropped(serve: Any) -> None:
    with serve(hint_app("streaming")) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        final = conn.read_response()
        assert final.status == 200 and final.body == b"hello" and b"103" not in final.head
        conn.assert_open()


def test_no_early_hints_to_an_http10_client(serve: Any) -> None:
    with serve(hint_app()) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(version="1.0"))
        resp = conn.read_response()
        assert resp.status == 200 and resp.body == b"hello"


def test_early_hint_links_are_checked(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.early_hint", "links": [b"</a>\r\nset-cookie: x=1"]})

    with serve(app) as srv, capture_log() as records, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response()
        assert resp.status == 500 and b"set-cookie" not in resp.head
    assert any("Invalid early hint link" in str(r.exc_info[1]) for r in records if r.exc_info)


@needs_curl
def test_curl_sees_the_103(serve: Any) -> None:
    with serve(hint_app()) as srv:
        out = curl("-v", "--http1.1", srv.url + "/")
    assert out.returncode == 0 and out.stdout == b"hello"
    err = out.stderr.decode()
    assert "< HTTP/1.1 103 Early Hints" in err and "< link: </app.js>; rel=preload; as=script" in err
    assert err.index("103 Early Hints") < err.index("< HTTP/1.1 200 OK")


def test_httpx_skips_the_103(serve: Any) -> None:
    with serve(hint_app()) as srv:
        resp = httpx.get(srv.url + "/")
    assert resp.status_code == 200 and resp.text == "hello"


# -- trailers ----------------------------------------------------------------------------------------
def trailers_app(headers: list[tuple[bytes, bytes]] | None = None, pieces: tuple[bytes, ...] = (b"hel", b"lo"),
                 send_trailers: bool = True) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "trailers": True,
                    "headers": [(b"trailer", b"x-checksum, x-status")] + (headers or [])})
        for i, piece in enumerate(pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": i < len(pieces) - 1})
        if send_trailers:
            await send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"abc")], "more_trailers": True})
            await send({"type": "http.response.trailers", "headers": [(b"x-status", b"ok")]})

    return app


def test_trailers_reach_a_client_that_accepts_them(serve: Any) -> None:
    with serve(trailers_app()) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(2):
            conn.send(build_request(headers=[("TE", "trailers")]))
            resp = conn.read_response()
            assert resp.chunked and resp.body == b"hello"
            assert resp.trailers == [("x-checksum", "abc"), ("x-status", "ok")]
        conn.assert_open()


def test_without_te_trailers_they_are_dropped_and_the_response_completes(serve: Any) -> None:
    with serve(trailers_app(pieces=(b"hello",))) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(2):
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.chunked and resp.body == b"hello" and resp.trailers == []
        conn.assert_open()
        resp = httpx.get(srv.url + "/")
        assert resp.status_code == 200 and resp.text == "hello"


def test_a_content_length_response_has_no_room_for_trailers(serve: Any) -> None:
    with serve(trailers_app([(b"content-length", b"5")])) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(headers=[("TE", "trailers")]))
        resp = conn.read_response()
        assert not resp.chunked and resp.body == b"hello"
        conn.assert_open()


def test_announced_trailers_never_sent_cut_the_response(serve: Any) -> None:
    with serve(trailers_app(send_trailers=False)) as srv, capture_log() as records, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(headers=[("TE", "trailers")]))
        data = conn.read_until_close()
        assert data.startswith(b"HTTP/1.1 200") and not data.endswith(b"0\r\n\r\n")
    assert any("without sending the trailers" in r.getMessage() for r in records)


def test_trailers_before_the_last_body_piece_are_an_error(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.trailers", "headers": [(b"x-a", b"1")]})

    with serve(app) as srv, capture_log(), Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(headers=[("TE", "trailers")]))
        assert conn.read_response().status == 500


@needs_curl
def test_curl_raw_shows_the_trailers(serve: Any) -> None:
    with serve(trailers_app()) as srv:
        out = curl("--raw", "-H", "TE: trailers", srv.url + "/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"3\r\nhel\r\n2\r\nlo\r\n0\r\nx-checksum: abc\r\nx-status: ok\r\n\r\n"
