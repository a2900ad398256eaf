"""The sans-I/O HTTP/1.1 core (``uvworker.core.h1``) driven with bytes, on both parsers: no
sockets, no event loop. The black-box tests (test_http_*.py) check the same rules through real
connections; these pin down the decisions themselves: events, scope, framing, keep-alive,
100-continue, pipelining, refusals, unread bodies, the PROXY header.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.http_client import build_request, parse_responses
from uvworker.core.h1 import CLOSE, CONTINUE, DISCARD, MAX_DISCARD, NEXT, BodyLengthError, H1Core, H1Options
from uvworker.core.parsers import Limits
from uvworker.core.response import HeadDefaults
from uvworker.errors import HTTPError
from uvworker.proxy import TrustedHosts

CLIENT, SERVER = ("10.0.0.7", 50000), ("127.0.0.1", 8000)


class Recorder:
    """The handler: records every event the core produces. A request whose body is complete
    when it is delivered (a bodiless head read whole: no on_end follows) is recorded with its
    end, as a request and then its end would be; ``whole`` counts those."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.core: H1Core | None = None
        self.whole = 0

    def on_request(self, scope: dict[str, Any]) -> None:
        self.events.append(("request", scope))
        if self.core is not None and self.core.body_complete:
            self.whole += 1
            self.events.append(("end", None))

    def on_upgrade(self, scope: dict[str, Any]) -> None:
        self.events.append(("upgrade", scope))

    def on_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def on_end(self) -> None:
        self.events.append(("end", None))

    def on_refused(self, error: HTTPError) -> None:
        self.events.append(("refused", error.status))

    def on_discarded(self, reusable: bool) -> None:
        self.events.append(("discarded", reusable))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    def body(self) -> bytes:
        return b"".join(data for kind, data in self.events if kind == "body")

    def scope(self, index: int = 0) -> dict[str, Any]:
        return [value for kind, value in self.events if kind in ("request", "upgrade")][index]


@pytest.fixture(params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest) -> str:
    return request.param


def make(parser: str, **options: Any) -> tuple[H1Core, Recorder]:
    recorder = Recorder()
    defaults = HeadDefaults([(b"server", b"uvworker")], date=False)
    options.setdefault("limits", Limits(8190, 100, 8190))
    core = recorder.core = H1Core(H1Options(parser=parser, **options), recorder, defaults, CLIENT, SERVER, "http")
    return core, recorder


def respond(core: H1Core, status: int = 200, headers: Any = (), pieces: tuple[bytes, ...] = (b"hello",)) -> bytes:
    """What the core writes for a response sent as ``pieces`` (the last ends it)."""
    core.start(status, list(headers))
    out = []
    for index, piece in enumerate(pieces):
        data = core.body(piece, index < len(pieces) - 1)
        out.append(data if type(data) is bytes else b"".join(data))
    return b"".join(out)


# -- requests in --------------------------------------------------------------------------------
def test_connections_keep_one_copy_of_the_same_fields(parser: str) -> None:
    """Cores whose clients send the same field block keep one copy of it, per process: the
    block and the fields read from it, and one verdict of them, which the cores share, so that
    what a repeat reads is no connection's own (at 1024 connections, what each kept was cold). Each
    request still gets its own list, and its own connection's client."""
    head = b"GET /%d HTTP/1.1\r\nHost: shared.example\r\nX-Kept: %d\r\n\r\n"
    cores = []
    for n in range(3):
        core, rec = make(parser)
        core.client = ("192.0.2.1", 1000 + n)
        for i in range(3):  # kept from the second head on
            core.feed(head % (i, 7))
            core.next_request()
        scopes = [rec.scope(i) for i in range(3)]
        assert [scope["path"] for scope in scopes] == ["/0", "/1", "/2"]
        assert all(scope["client"] == ("192.0.2.1", 1000 + n) for scope in scopes)
        assert all(scope["headers"] == [(b"host", b"shared.example"), (b"x-kept", b"7")] for scope in scopes)
        assert len({id(scope["headers"]) for scope in scopes}) == 3
        cores.append(core)
    first = cores[0].parser
    for core in cores:
        assert core.parser._fields is first._fields and core.parser._fields_read is first._fields_read
        assert core._checked[1] is first._fields_read
        assert core._checked is cores[0]._checked  # one verdict kept for them all


def test_a_request_is_one_request_event_then_its_end(parser: str) -> None:
    core, rec = make(parser, root_path="/api", lifespan_state={"db": 1})
    core.feed(b"GET /items/%C3%A9?x=1 HTTP/1.1\r\nHost: example.com\r\nX-A: b\r\n\r\n")
    assert rec.kinds() == ["request", "end"]
    scope = rec.scope()
    assert scope["type"] == "http" and scope["method"] == "GET" and scope["http_version"] == "1.1"
    assert (scope["path"], scope["raw_path"], scope["query_string"]) == ("/api/items/é", b"/api/items/%C3%A9", b"x=1")
    assert (scope["root_path"], scope["scheme"], scope["client"], scope["server"]) == ("/api", "http", CLIENT, SERVER)
    assert scope["headers"] == [(b"host", b"example.com"), (b"x-a", b"b")]
    assert scope["state"] == {"db": 1}


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_split_anywhere_arrives_whole(parser: str, framing: str) -> None:
    body = bytes(range(256)) * 3
    if framing == "length":
        request = build_request("POST", body=body)
    else:
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:100], body[100:]))
        request = build_request("POST", headers=[("Transfer-Encoding", "chunked")]) + chunks + b"0\r\n\r\n"
    for cut in range(1, len(request), 37):
        core, rec = make(parser)
        core.feed(request[:cut])
        core.feed(request[cut:])
        assert rec.body() == body and rec.kinds()[0] == "request" and rec.kinds()[-1] == "end", cut


def test_pipelined_requests_are_held_until_the_next_request_may_start(parser: str) -> None:
    core, rec = make(parser)
    core.feed(build_request(target="/1") + build_request(target="/2") + build_request(target="/3"))
    assert rec.kinds() == ["request", "end"] and core.holding_input
    for expected in ("/2", "/3"):
        respond(core)
        assert core.after == NEXT
        core.next_request()
        assert rec.scope(-1)["path"] == expected
    assert not core.holding_input


def test_refused_input_raises_from_feed_and_is_an_event_from_receive_data(parser: str) -> None:
    core, rec = make(parser)
    with pytest.raises(HTTPError) as info:
        core.feed(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert info.value.status == 400
    core, rec = make(parser)
    core.receive_data(b"GET / HTTP/1.1\r\n\r\n")  # no Host
    assert rec.kinds() == ["refused"] and rec.events[0][1] == 400
    (resp,) = parse_responses(core.error(400, "Missing Host header"))
    assert resp.status == 400 and resp.has_token("connection", "close") and resp.body == b"Missing Host header"
    assert core.after == CLOSE


def test_a_pipelined_bad_request_is_refused_only_after_the_good_one(parser: str) -> None:
    core, rec = make(parser)
    core.feed(build_request() + b"BAD\r\n\r\n")
    assert rec.kinds() == ["request", "end"]
    respond(core)
    with pytest.raises(HTTPError):
        core.next_request()


def test_an_upgrade_request_is_an_upgrade_event_with_the_bytes_behind_it(parser: str) -> None:
    core, rec = make(parser)
    head = build_request(headers=[("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                  ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")])
    core.feed(head + b"\x81\x05hello")
    assert rec.kinds()[0] == "upgrade" and rec.scope()["path"] == "/"
    assert core.trailing_data == b"\x81\x05hello"
    core, rec = make(parser, websocket=False)
    core.feed(head)
    assert rec.kinds()[0] == "request"  # --ws none: served as plain HTTP


def test_proxy_protocol_header_sets_the_client(parser: str) -> None:
    core, rec = make(parser, proxy_protocol=True, proxy_allow=TrustedHosts("10.0.0.0/8"))
    core.feed(b"PROXY TCP4 192.0.2.1 198.51.100.2 1234 443\r\n" + build_request()[:10])
    core.feed(build_request()[10:])
    assert rec.scope()["client"] == ("192.0.2.1", 1234) and rec.scope()["server"] == ("198.51.100.2", 443)
    core, rec = make(parser, proxy_protocol=True, proxy_allow=TrustedHosts("192.168.0.0/16"))
    core.receive_data(b"PROXY TCP4 192.0.2.1 198.51.100.2 1234 443\r\n" + build_request())
    assert rec.kinds() == ["refused"]  # the peer may not send one


def test_proxy_headers_only_from_trusted_peers(parser: str) -> None:
    request = build_request(headers=[("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "https")])
    core, rec = make(parser, proxy_headers=True, forwarded_allow=TrustedHosts("10.0.0.7"))
    core.feed(request)
    assert rec.scope()["client"] == ("203.0.113.9", 0) and rec.scope()["scheme"] == "https"
    core, rec = make(parser, proxy_headers=True, forwarded_allow=TrustedHosts("127.0.0.1"))
    core.feed(request)
    assert rec.scope()["client"] == CLIENT and rec.scope()["scheme"] == "http"


# -- responses out ---------------------------------------------------------------------------------
def test_one_piece_gets_a_content_length_and_keeps_the_connection(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    (resp,) = parse_responses(respond(core, headers=[(b"content-type", b"text/plain")]))
    assert (resp.status, resp.body, resp.get("content-length")) == (200, b"hello", "5")
    assert resp.get("server") == "uvworker" and resp.get("connection") is None
    assert core.after == NEXT


def test_several_pieces_are_chunked_on_http11(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    (resp,) = parse_responses(respond(core, pieces=(b"hel", b"", b"lo", b"")))
    assert resp.chunked and resp.body == b"hello" and core.after == NEXT


def test_http10_without_length_is_close_delimited(parser: str) -> None:
    core, _ = make(parser)
    core.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    data = respond(core, pieces=(b"hel", b"lo"))
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head and b"connection: close" in head and body == b"hello"
    assert core.after == CLOSE


def test_http10_keep_alive_with_a_length(parser: str) -> None:
    core, _ = make(parser)
    core.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    (resp,) = parse_responses(respond(core))
    assert resp.has_token("connection", "keep-alive") and core.after == NEXT


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_no_body_for_head_204_and_304(parser: str, method: str, status: int) -> None:
    core, _ = make(parser)
    core.feed(build_request(method))
    data = respond(core, status, headers=[(b"content-length", b"5")], pieces=(b"hello",))
    assert data.endswith(b"\r\n\r\n") and b"hello" not in data
    assert core.after == NEXT


@pytest.mark.parametrize(
    ("request_headers", "response_headers"),
    [([("Connection", "close")], []), ([], [(b"connection", b"close")])],
    ids=["client-asks", "app-asks"],
)
def test_connection_close_from_either_side(parser: str, request_headers: Any, response_headers: Any) -> None:
    core, _ = make(parser)
    core.feed(build_request(headers=request_headers))
    (resp,) = parse_responses(respond(core, headers=response_headers))
    assert resp.get_all("connection") == ["close"] and core.after == CLOSE


def test_a_retiring_connection_answers_with_close(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    core.keep_alive_allowed = False
    (resp,) = parse_responses(respond(core))
    assert resp.has_token("connection", "close") and core.after == CLOSE


def test_large_pieces_come_back_by_reference(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    core.start(200, [])
    big = b"x" * (64 * 1024)
    first = core.body(big, True)
    assert type(first) is tuple and first[1] is big  # not copied next to its framing
    last = core.body(bytearray(b"y" * 70000), False)
    assert type(last) is tuple and type(last[1]) is bytes  # an app's bytearray is copied once


def test_100_continue_once_and_only_while_the_body_is_awaited(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request("POST", headers=[("Expect", "100-continue"), ("Content-Length", "5")]))
    assert core.continue_() == CONTINUE
    assert core.continue_() == b""
    core.feed(b"hello")
    (resp,) = parse_responses(respond(core))
    assert core.after == NEXT and not resp.has_token("connection", "close")


def test_answering_before_taking_an_expected_body_closes(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request("POST", headers=[("Expect", "100-continue"), ("Content-Length", "5")]))
    (resp,) = parse_responses(respond(core, 417))
    assert resp.has_token("connection", "close") and core.after == CLOSE


# -- a body that contradicts its Content-Length -----------------------------------------------------------
@pytest.mark.parametrize("pieces", [(b"hello world",), (b"hel",), (b"",)], ids=["long", "short", "empty"])
def test_length_mismatch_before_anything_is_out(parser: str, pieces: tuple[bytes, ...]) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    core.start(200, [(b"content-length", b"5")])
    with pytest.raises(BodyLengthError) as info:
        core.body(pieces[0], False)
    assert not info.value.committed  # the caller answers 500 instead
    (resp,) = parse_responses(core.error(500, "Internal Server Error"))
    assert resp.status == 500 and core.after == CLOSE


def test_length_mismatch_after_the_head_writes_at_most_the_declared_bytes(parser: str) -> None:
    core, _ = make(parser)
    core.feed(build_request())
    core.start(200, [(b"content-length", b"5")])
    first = core.body(b"hel", True)
    with pytest.raises(BodyLengthError) as info:
        core.body(b"lo world", False)
    assert info.value.committed and info.value.data == b"lo" and core.after == CLOSE
    assert (first + info.value.data).endswith(b"\r\n\r\nhello")


# -- a body the app did not read ---------------------------------------------------------------------
def test_an_unread_body_is_discarded_then_the_connection_goes_on(parser: str) -> None:
    core, rec = make(parser)
    request = build_request("POST", body=b"x" * 1000)
    core.feed(request[: len(request) - 600])
    respond(core)
    assert core.after == DISCARD
    core.discard_body()
    core.feed(request[len(request) - 600 :] + build_request(target="/next"))
    assert ("discarded", True) in rec.events and "x" * 600 not in rec.body().decode()
    core.next_request()
    assert rec.scope(-1)["path"] == "/next"


def test_too_much_unread_body_ends_the_connection(parser: str) -> None:
    core, rec = make(parser)
    core.feed(build_request("POST", headers=[("Content-Length", str(MAX_DISCARD * 2))]))
    respond(core)
    core.discard_body()
    piece = b"x" * 65536
    while ("discarded", False) not in rec.events:
        core.feed(piece)
    assert rec.events.count(("discarded", False)) == 1


def test_per_connection_objects_have_slots(parser: str) -> None:
    """A core and its parser adapter keep their attributes in slots: no dict (CPython 3.11
    keeps at most 30 names in the keys a class's instances share, and a 31st gave every core
    a dict of its own and slower access to all its attributes: a hello-world request on a
    keep-alive connection, 1.3k instructions more, callgrind), one block each."""
    core, _ = make(parser)
    core.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    respond(core, headers=[(b"content-length", b"5")])
    core.next_request()
    for obj in (core, core.parser):
        assert not hasattr(obj, "__dict__"), type(obj).__name__


class _Quiet:
    """A handler that keeps nothing of the events (for what a core itself keeps)."""

    def on_request(self, scope: dict[str, Any]) -> None:
        pass

    on_upgrade = on_request

    def on_body(self, data: bytes) -> None:
        pass

    def on_end(self) -> None:
        pass

    def on_refused(self, error: HTTPError) -> None:
        raise AssertionError(error)

    def on_discarded(self, reusable: bool) -> None:
        pass


HELLO = b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"


def _serve(core: H1Core, requests: int) -> None:
    for _ in range(requests):
        core.feed(HELLO)
        respond(core, headers=[(b"content-length", b"5")])
        core.next_request()


def test_a_single_request_leaves_nothing_kept(parser: str) -> None:
    """What a connection keeps to serve a repeated head faster (check_head's verdict, a scope
    base, the parser's fields) it keeps from its second head on: after one request, a core
    and its parser hold what they held before it (by tracemalloc; a connection that served one
    and idles, or closes: 2,000 idle connections of the memory rows). Before, they held 520
    bytes more.

    Traced from before the cores exist, with the object free lists emptied (a full collection
    does that) before each snapshot: a block a core lets go of counts as freed, whichever
    object takes its place (a list the interpreter kept from another use would otherwise
    count as new, and one it reuses as nothing)."""
    import gc
    import tracemalloc

    warm, _ = make(parser)
    _serve(warm, 3)  # the process-wide caches (request lines, Host values, response fields)
    gc.collect()
    tracemalloc.start()
    try:
        cores = [make(parser)[0] for _ in range(100)]
        for core in cores:
            core.handler = _Quiet()
        gc.collect()
        before = tracemalloc.take_snapshot()
        for core in cores:
            _serve(core, 1)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown / len(cores) < 32, grown / len(cores)


def test_head_kept_from_the_second(parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """check_head runs for a connection's first two heads, not for the same head after them;
    every scope has the connection's addresses."""
    from uvworker.core import h1

    calls = []
    check = h1.check_head
    monkeypatch.setattr(h1, "check_head", lambda *args: calls.append(1) or check(*args))
    core, rec = make(parser)
    _serve(core, 4)
    assert len(calls) == 2
    scopes = [value for kind, value in rec.events if kind == "request"]
    assert len(scopes) == 4 and all(s["client"] == CLIENT and s["server"] == SERVER for s in scopes)
    assert len({id(s) for s in scopes}) == 4 and scopes[2]["headers"] is not scopes[3]["headers"]


def test_repeated_head_is_the_whole_request(parser: str) -> None:
    """From a connection's third identical bodiless head on (the adapter's repeat path), the
    request comes as one event: on_request with body_complete already true, no on_end; the
    first two come as a request and then its end. Either way no 100 Continue is due."""
    core, rec = make(parser)
    for _ in range(4):
        core.feed(HELLO)
        assert core.body_complete and core.continue_() == b""
        respond(core, headers=[(b"content-length", b"5")])
        core.next_request()
    assert rec.whole == 2 and rec.kinds() == ["request", "end"] * 4  # two of the ends recorded as whole


def test_response_fields_kept_per_process(parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoded lines of the last response's fields serve any connection's response with
    equal fields, a new connection's first too; connections sending other fields in turn
    each get their own framing."""
    calls = []
    lines = H1Core._header_lines
    monkeypatch.setattr(H1Core, "_header_lines", lambda self, headers: calls.append(1) or lines(self, headers))
    first, _ = make(parser)
    first.feed(HELLO)
    assert b"content-length: 5\r\n" in respond(first, headers=[(b"content-length", b"5")])
    calls.clear()
    second, _ = make(parser)
    second.feed(HELLO)
    assert b"content-length: 5\r\n" in respond(second, headers=[(b"content-length", b"5")])
    assert calls == []
    first.next_request()
    second.next_request()
    for n in range(4):
        core, length = (first, 2) if n % 2 else (second, 3)
        core.feed(HELLO)
        out = respond(core, headers=[(b"content-length", b"%d" % length), (b"x-n", b"%d" % n)], pieces=(b"h" * length,))
        responses = parse_responses(out)
        assert len(responses) == 1 and responses[0].get_all("content-length") == [str(length)], out
        assert responses[0].get("x-n") == str(n) and responses[0].body == b"h" * length
        core.next_request()
