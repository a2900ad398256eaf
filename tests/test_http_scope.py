"""The ASGI ``http`` scope as built from real requests (issue 2: scope per ASGI 3.0, spec 2.4+)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.http_client import Conn, build_request, respond


class ScopeApp:
    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # only used with lifespan="on" below
            return
        self.scopes.append(copy.copy(scope))
        await respond(send, body=b"ok")


def scope_for(serve: Any, raw: bytes, **settings: Any) -> tuple[dict[str, Any], Any]:
    app = ScopeApp()
    with serve(app, **settings) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(raw)
        assert conn.read_response().status == 200
        local = conn.sock.getsockname()
        (scope,) = app.scopes
        return scope, (srv, local)


def test_basic_scope_fields(serve: Any) -> None:
    scope, (srv, local) = scope_for(serve, build_request("GET", "/a/b?x=1"))
    assert scope["type"] == "http"
    assert scope["asgi"]["version"] == "3.0"
    spec = tuple(int(p) for p in scope["asgi"]["spec_version"].split("."))
    assert spec >= (2, 4)
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/a/b"
    assert scope["raw_path"] == b"/a/b"
    assert scope["query_string"] == b"x=1"
    assert scope["root_path"] == ""
    assert tuple(scope["client"]) == ("127.0.0.1", local[1])
    assert tuple(scope["server"]) == ("127.0.0.1", srv.port)
    assert isinstance(scope["headers"], list)
    assert all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in scope["headers"])


def test_path_percent_decoded_raw_path_as_sent(serve: Any) -> None:
    scope, _ = scope_for(serve, build_request("GET", "/caf%C3%A9/a%2Fb/%20x?q=%20y&r=caf%C3%A9"))
    assert scope["path"] == "/café/a/b/ x"
    assert scope["raw_path"] == b"/caf%C3%A9/a%2Fb/%20x"
    assert scope["query_string"] == b"q=%20y&r=caf%C3%A9"  # never decoded


def test_empty_query_string(serve: Any) -> None:
    scope, _ = scope_for(serve, build_request("GET", "/p?"))
    assert scope["path"] == "/p"
    assert scope["query_string"] == b""


def test_absolute_form_target(serve: Any) -> None:
    raw = build_request("GET", "http://example.com:8080/p%20q/r?a=b", headers=[("Host", "example.com:8080")])
    scope, _ = scope_for(serve, raw)
    assert scope["path"] == "/p q/r"
    assert scope["raw_path"] == b"/p%20q/r"
    assert scope["query_string"] == b"a=b"


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("http://example.com", "/", b""),
        ("http://example.com?a=1", "/", b"a=1"),
        ("http://example.com:80/x?y", "/x", b"y"),
    ],
)
def test_absolute_form_edge_cases(serve: Any, target: str, path: str, query: bytes) -> None:
    scope, _ = scope_for(serve, build_request("GET", target, headers=[("Host", "example.com")]))
    assert (scope["path"], scope["query_string"]) == (path, query)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_method(serve: Any, method: str) -> None:
    scope, _ = scope_for(serve, build_request(method, "/m", body=b"x" if method != "OPTIONS" else b""))
    assert scope["method"] == method


def test_http10_version(serve: Any) -> None:
    scope, _ = scope_for(serve, b"GET /old HTTP/1.0\r\n\r\n")
    assert scope["http_version"] == "1.0"
    assert scope["path"] == "/old"


def test_headers_lowercased_trimmed_and_in_order(serve: Any) -> None:
    raw = (
        b"GET / HTTP/1.1\r\n"
        b"Host: example.org\r\n"
        b"X-Custom-Header:   padded value \t\r\n"
        b"X-Dup: one\r\n"
        b"ACCEPT: */*\r\n"
        b"x-dup: two\r\n"
        b"X-Empty:\r\n"
        b"\r\n"
    )
    scope, _ = scope_for(serve, raw)
    assert scope["headers"] == [
        (b"host", b"example.org"),
        (b"x-custom-header", b"padded value"),
        (b"x-dup", b"one"),
        (b"accept", b"*/*"),
        (b"x-dup", b"two"),
        (b"x-empty", b""),
    ]


def test_root_path(serve: Any) -> None:
    scope, _ = scope_for(serve, build_request("GET", "/items?x=1"), root_path="/api")
    assert scope["root_path"] == "/api"
    # ASGI leaves servers two readings; uvicorn (and Starlette >= 0.33) put root_path in path.
    assert scope["path"] in ("/items", "/api/items")
    assert scope["raw_path"] in (b"/items", b"/api/items")
    assert scope["query_string"] == b"x=1"


def test_lifespan_state_is_shallow_copied_per_request(serve: Any) -> None:
    seen: list[dict[str, Any]] = []
    startup_state: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    scope["state"]["db"] = "connection"
                    scope["state"]["shared"] = []
                    startup_state["ref"] = scope["state"]
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        state = scope["state"]
        seen.append(dict(state))
        state["per_request"] = scope["path"]  # must not leak into the next request
        state["shared"].append(scope["path"])  # the same list object: shallow copy
        await respond(send, body=b"ok")

    with serve(app, lifespan="on") as srv, Conn.open(srv.host, srv.port) as conn:
        for path in ("/one", "/two"):
            conn.send(build_request(target=path))
            assert conn.read_response().status == 200
    assert seen[0]["db"] == "connection"
    assert "per_request" not in seen[1]
    assert seen[1]["shared"] == ["/one", "/two"]
    assert "per_request" not in startup_state["ref"]


def test_scope_is_fresh_per_request(serve: Any) -> None:
    app = ScopeApp()
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(target="/1", headers=[("X-N", "1")]) + build_request(target="/2"))
        conn.read_response()
        conn.read_response()
    first, second = app.scopes
    assert (first["path"], second["path"]) == ("/1", "/2")
    assert (b"x-n", b"1") in first["headers"] and (b"x-n", b"1") not in second["headers"]
    assert first["client"] == second["client"]


@pytest.mark.parametrize("root_path", ["", "/api"])
def test_repeated_targets_read_alike(serve: Any, root_path: str) -> None:
    """Targets read once are kept (core.request.read_target): each later request with the same
    target, on this connection or another, gets the same path, raw_path and query_string as
    the first, root_path applied once; a fragment is dropped; absolute-form targets are read
    every time (their authority becomes Host)."""
    targets = [
        ("/caf%C3%A9?q=%20", "/café", b"/caf%C3%A9", b"q=%20"),
        ("/a/b?x=1", "/a/b", b"/a/b", b"x=1"),
        ("/f#frag", "/f", b"/f", b""),
        ("http://example.com/a/b?x=1", "/a/b", b"/a/b", b"x=1"),
    ]
    app = ScopeApp()
    with serve(app, root_path=root_path) as srv:
        for _ in range(2):
            with Conn.open(srv.host, srv.port) as conn:
                for _ in range(2):
                    for target, *_ in targets:
                        conn.send(build_request("GET", target))
                        assert conn.read_response().status == 200
    assert len(app.scopes) == 4 * len(targets)
    for n, scope in enumerate(app.scopes):
        _, path, raw_path, query = targets[n % len(targets)]
        assert (scope["path"], scope["raw_path"], scope["query_string"]) == (
            root_path + path, root_path.encode() + raw_path, query,
        )
        assert scope["root_path"] == root_path
        host = dict(scope["headers"])[b"host"]
        assert host == (b"example.com" if n % len(targets) == 3 else b"testserver")


@pytest.mark.parametrize("root_path", ["", "/api"])
def test_request_lines_on_one_target_each_get_their_own_scope(serve: Any, root_path: str) -> None:
    """A request line's scope is kept for the requests that repeat it (a ScopeTemplate's
    lines, keyed by target): a request with another method or version to the same target
    gets its own method and version, on any connection, and what an app does to its scope's
    values is seen by no later request."""
    lines = [("GET", "1.1"), ("POST", "1.1"), ("GET", "1.0"), ("HEAD", "1.1"), ("GET", "1.1")]
    seen: list[tuple[str, str, str, bytes, bytes]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["method"], scope["http_version"], scope["path"], scope["raw_path"], scope["query_string"]))
        scope.update(method="PUT", http_version="2", path="/x", raw_path=b"/x", query_string=b"y")
        await respond(send, body=b"ok")

    with serve(app, root_path=root_path) as srv:
        for _ in range(2):
            with Conn.open(srv.host, srv.port) as conn:
                for _ in range(3):
                    for method, version in lines:
                        headers = [("Connection", "keep-alive")] if version == "1.0" else None
                        conn.send(build_request(method, "/same?q=1", version=version, headers=headers))
                        assert conn.read_response(method).status == 200
    path = root_path + "/same"
    assert seen == [(method, version, path, path.encode(), b"q=1") for method, version in lines] * 6


def test_scope_dicts_changed_by_the_app_are_not_the_next_requests(serve: Any) -> None:
    """scope["asgi"], ["extensions"] and ["state"] are the request's own: what an app does to
    them is not seen by the next request on the connection."""
    seen: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((dict(scope["asgi"]), dict(scope["extensions"]), dict(scope["state"])))
        for key in ("asgi", "extensions", "state"):
            scope[key]["changed"] = True
        scope["asgi"]["version"] = "2.0"
        await respond(send, body=b"ok")

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(3):
            conn.send(build_request())
            assert conn.read_response().status == 200
    assert seen[0][0] == {"version": "3.0", "spec_version": "2.4"}
    assert "changed" not in seen[0][1] and seen[0][2] == {}
    assert seen[1] == seen[2] == seen[0]


def test_connections_share_no_scope(serve: Any) -> None:
    """What two connections' scopes have in common is kept once per process (a template each
    request copies): each request still gets its own connection's client, and what an app does
    to its scope is seen by no request after it, on its connection or on another."""
    seen: list[tuple[Any, Any, str, str]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["client"], scope["server"], scope["scheme"], scope["root_path"]))
        scope.update(client=("192.0.2.1", 1), server=("192.0.2.2", 2), scheme="https", root_path="/x")
        await respond(send, body=b"ok")

    with serve(app) as srv, Conn.open(srv.host, srv.port) as one, Conn.open(srv.host, srv.port) as two:
        clients = []
        for _ in range(3):
            for conn in (one, two):
                conn.send(build_request())
                assert conn.read_response().status == 200
                clients.append(tuple(conn.sock.getsockname()))
    assert [client for client, _, _, _ in seen] == clients
    assert clients[0] != clients[1]
    assert {(server, scheme, root) for _, server, scheme, root in seen} == {((srv.host, srv.port), "http", "")}
