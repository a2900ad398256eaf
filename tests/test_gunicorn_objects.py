"""The ``req`` and ``resp`` Gunicorn's hooks get, compared with what Gunicorn's gthread worker gives.

One hook configuration records every attribute of Gunicorn's Request and Response that hook code
reads (their type and value) in pre_request and post_request; the same requests go to real
Gunicorn processes, first with gthread, then with our worker classes (a WSGI app, and the same
app in ASGI), on TCP and on a Unix socket; the records must be the same.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request
from tests.test_gunicorn import run_gunicorn

DUMP_HOOKS = '''
import json, os

REQUEST = ("method", "uri", "path", "query", "fragment", "version", "headers", "trailers", "scheme",
           "peer_addr", "remote_addr", "req_number", "proxy_protocol_info", "must_close", "limit_request_line",
           "limit_request_fields", "limit_request_field_size", "max_buffer_headers")
RESPONSE = ("status", "status_code", "headers", "sent", "response_length", "chunked", "headers_sent",
            "must_close", "upgrade")


def _show(value):
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
        value = (value[0], "port")  # a peer address: its port differs from run to run
    return [type(value).__name__, value]


def _record(line):
    with open(os.environ["EVENTS"], "a") as events:
        events.write(json.dumps(line) + "\\n")


def pre_request(worker, req):
    line = {"hook": "pre", **{name: _show(getattr(req, name, "MISSING")) for name in REQUEST}}
    line["should_close()"] = req.should_close()
    line["body.read"] = callable(getattr(req.body, "read", None))
    line["cfg"] = getattr(req, "cfg", None) is worker.cfg
    line["force_close"] = callable(getattr(req, "force_close", None))
    _record(line)


def post_request(worker, req, environ, resp):
    line = {"hook": "post", **{name: _show(getattr(req, name, "MISSING")) for name in REQUEST}}
    line.update({"resp." + name: _show(getattr(resp, name, "MISSING")) for name in RESPONSE})
    line["should_close()"] = req.should_close()
    line["resp.should_close()"] = resp.should_close()
    line["body"] = [repr(req.body.read()), repr(req.body.readline()), repr(list(req.body))]
    _record(line)
'''

WSGI_APP = '''
def app(environ, start_response):
    body = environ["wsgi.input"].read()
    path = environ["PATH_INFO"]
    if path == "/stream":  # no length, two pieces
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (piece for piece in (b"one", b"two"))
    if path == "/empty":
        start_response("204 No Content", [])
        return [b""]
    data = b"hello " + body
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
'''

ASGI_APP = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"Content-Type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        await send({"type": "http.response.body", "body": b"two"})
        return
    if scope["path"] == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    data = b"hello " + body
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"Content-Type", b"text/plain"), (b"Content-Length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
'''

FORWARDED = [("X-Forwarded-For", "10.1.2.3"), ("X-Forwarded-Proto", "https")]


def _connect(server: Any) -> Conn:
    if server.uds is None:
        return Conn.open("127.0.0.1", server.port)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(server.uds))
    return Conn(sock)


def _exchange(server: Any) -> list[dict[str, Any]]:
    """The same requests each time; the hooks' records, in order."""
    with _connect(server) as conn:  # four requests on one connection: req_number 1 to 4
        for method, target, headers, body in [
            ("GET", "/a?x=1", [], b""),
            ("POST", "/p", [("Content-Type", "text/plain")], b"abc"),
            ("GET", "/stream", [], b""),
            ("GET", "/empty", [("Connection", "close")], b""),
        ]:
            conn.send(build_request(method, target, headers=headers, body=body))
            assert conn.read_response(method).status in (200, 204)
    with _connect(server) as conn:
        conn.send(build_request("GET", "/old", version="1.0"))
        assert conn.read_response().status == 200
    with _connect(server) as conn:
        conn.send(build_request("GET", "/forwarded", headers=FORWARDED))
        assert conn.read_response().status == 200
    wait_for(lambda: len(server.events('{"hook": "post"')) == 6)
    return [json.loads(line) for line in server.events()]


def _records(tmp_path: Path, worker_class: str, app: str, transport: str) -> list[dict[str, Any]]:
    directory = tmp_path / f"{worker_class}-{len(app)}"
    directory.mkdir()
    uds = directory / "s" if transport == "unix" else None
    with run_gunicorn(directory, worker_class, DUMP_HOOKS, app=app, uds=uds, wait=False) as server:
        wait_for(lambda: "Booting worker" in server.log, timeout=10)
        records = _exchange(server)
        assert "A Gunicorn hook read req.body" not in server.log  # read in post_request only
        return records


def _assert_same(expected: list[dict[str, Any]], got: list[dict[str, Any]], label: str) -> None:
    for want, line in zip(expected, got, strict=True):
        differ = {key: (want.get(key), line.get(key)) for key in want.keys() | line.keys() if want.get(key) != line.get(key)}
        assert not differ, f"{label}, {want['hook']} {want['uri'][1]}: {differ}"


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_hooks_get_the_request_and_response_gthread_gives(tmp_path: Path, transport: str) -> None:
    expected = _records(tmp_path, "gthread", WSGI_APP, transport)
    assert [line["hook"] for line in expected] == ["pre", "post"] * 6
    for worker_class, app in [("uvworker.Worker", WSGI_APP), ("uvworker.H11Worker", WSGI_APP),
                              ("uvworker.Worker", ASGI_APP)]:
        got = _records(tmp_path, worker_class, app, transport)
        _assert_same(expected, got, f"{worker_class} ({'ASGI' if app is ASGI_APP else 'WSGI'})")


H1_LIMITS = ("limit_request_line", "limit_request_fields", "limit_request_field_size", "max_buffer_headers")
DEFAULT_LIMITS = dict(zip(H1_LIMITS, (4094, 100, 8190, 819204), strict=True))


def _h2_records(tmp_path: Path, worker_class: str, app: str) -> list[dict[str, Any]]:
    from tests.h2_client import H2Client

    directory = tmp_path / f"h2-{worker_class}-{len(app)}"
    directory.mkdir()
    conf = DUMP_HOOKS + '\nhttp_protocols = "h2,h1"\nhttp2_cleartext = "prior-knowledge"\n'
    with run_gunicorn(directory, worker_class, conf, app=app, wait=False) as server:
        wait_for(lambda: "Booting worker" in server.log, timeout=10)
        client = H2Client("127.0.0.1", server.port)
        try:
            for method, path, body in [("GET", "/a?x=1", None), ("POST", "/p", b"abc"), ("GET", "/stream", None)]:
                headers = [("content-type", "text/plain")] + ([("content-length", str(len(body)))] if body else [])
                stream = client.request(method, path, headers=headers, body=body)
                assert client.response(stream).status == 200
        finally:
            client.sock.close()
        wait_for(lambda: len(server.events('{"hook": "post"')) == 3)
        return [json.loads(line) for line in server.events()]


def test_hooks_get_the_request_and_response_gthread_gives_over_h2c(tmp_path: Path) -> None:
    """The same over cleartext HTTP/2 (prior knowledge): version (2, 0), req_number the stream id.
    One value differs on purpose: Gunicorn's resp.should_close() applies HTTP/1's rule and says
    True for a body streamed without a length, but an HTTP/2 connection stays open (False here).
    Gunicorn's HTTP/2 request has no limit_request_* attributes; ours has them, as over HTTP/1.1."""
    expected = _h2_records(tmp_path, "gthread", WSGI_APP)
    for line in expected:
        if line["uri"] == ["str", "/stream"] and line["hook"] == "post":
            assert line["resp.should_close()"] is True
            line["resp.should_close()"] = False
        for name in H1_LIMITS:
            assert line[name] == ["str", "MISSING"]
            line[name] = ["int", DEFAULT_LIMITS[name]]
    assert [line["req_number"] for line in expected] == [["int", n] for n in (1, 1, 3, 3, 5, 5)]
    for worker_class, app in [("uvworker.Worker", WSGI_APP), ("uvworker.Worker", ASGI_APP)]:
        got = _h2_records(tmp_path, worker_class, app)
        _assert_same(expected, got, f"{worker_class} ({'ASGI' if app is ASGI_APP else 'WSGI'})")


def test_proxy_protocol_info_and_the_peer_behind_a_proxy_protocol_header(tmp_path: Path) -> None:
    """A connection that begins with a PROXY header (v1 and v2): req.remote_addr stays the peer
    that sent it, proxy_protocol_info says what it said, as under gthread. (Gunicorn parses the
    header for the connection's first request only, and leaves proxy_protocol_info None on the
    next ones; here every request of the connection has it: they are not compared.)"""
    from tests.test_proxy import V2_TCP6

    v1 = b"PROXY TCP4 10.9.8.7 127.0.0.1 5555 80\r\n"
    records = {}
    for worker_class in ("gthread", "uvworker.Worker", "uvworker.H11Worker"):
        directory = tmp_path / worker_class
        directory.mkdir()
        conf = DUMP_HOOKS + '\nproxy_protocol = "auto"\n'
        with run_gunicorn(directory, worker_class, conf, app=WSGI_APP, wait=False) as server:
            wait_for(lambda: "Booting worker" in server.log, timeout=10)
            for header in (v1, V2_TCP6):
                with Conn.open("127.0.0.1", server.port) as conn:
                    conn.send(header + build_request("GET", "/proxied", headers=[("Connection", "close")]))
                    assert conn.read_response().status == 200
            wait_for(lambda: len(server.events('{"hook": "post"')) == 2)
            records[worker_class] = [json.loads(line) for line in server.events()]
    expected = records.pop("gthread")
    assert expected[1]["proxy_protocol_info"][1]["client_addr"] == "10.9.8.7"
    assert expected[3]["proxy_protocol_info"][1]["client_addr"] == "2001:db8::1"
    for worker_class, got in records.items():
        _assert_same(expected, got, worker_class)


@pytest.mark.parametrize("app", ["wsgi", "asgi"])
def test_a_hook_reading_req_body_does_not_take_the_app_s_body(tmp_path: Path, app: str) -> None:
    """Under Gunicorn a pre_request that reads req.body takes it from the app. Here the body
    streams to the app, which alone reads it: req.body reads as empty, and the first read of a
    request that has a body logs one warning (a read in post_request, after the app, does not:
    Gunicorn gives the rest the app left, most often nothing, there too)."""
    conf = '''
import os

def pre_request(worker, req):
    with open(os.environ["EVENTS"], "a") as events:
        events.write(f"pre {req.path} {req.body.read()!r} {req.body.readline()!r}\\n")

def post_request(worker, req, environ, resp):
    with open(os.environ["EVENTS"], "a") as events:
        events.write(f"post {req.path} {req.body.read()!r}\\n")
'''
    with run_gunicorn(tmp_path, "uvworker.Worker", conf, app=WSGI_APP if app == "wsgi" else ASGI_APP) as server:
        for body in (b"abc", b"defg"):
            assert httpx.post(server.url + "/p", content=body, timeout=5).text == "hello " + body.decode()
        assert server.get("/g").text == "hello "
        wait_for(lambda: len(server.events("post")) == 3)
        assert server.events("pre") == ["pre /p b'' b''", "pre /p b'' b''", "pre /g b'' b''"]
        assert server.events("post") == ["post /p b''", "post /p b''", "post /g b''"]
        assert server.log.count("A Gunicorn hook read req.body") == 1, server.log


MOUNT_WSGI = '''
def app(environ, start_response):
    data = f"{environ['SCRIPT_NAME']}|{environ['PATH_INFO']}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
'''

MOUNT_ASGI = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    root = scope["root_path"]
    data = f"{root}|{scope['path'][len(root):]}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": data})
'''


def test_script_name_from_the_environment_and_a_trusted_proxy_s_header(tmp_path: Path) -> None:
    """Gunicorn's SCRIPT_NAME, the app's mount point: from the environment (``SCRIPT_NAME=/app
    gunicorn ...``, a common recipe), or from a trusted proxy's SCRIPT_NAME header (Gunicorn's
    forwarder_headers). The path keeps it (the proxy does not strip it); WSGI apps get it as
    SCRIPT_NAME and the rest as PATH_INFO, ASGI apps as root_path; a path outside it is a 500.
    Before, both were ignored: '|/app/x'."""
    answers = {}
    for worker_class, app in [("gthread", MOUNT_WSGI), ("uvworker.Worker", MOUNT_WSGI),
                              ("uvworker.H11Worker", MOUNT_WSGI), ("uvworker.Worker", MOUNT_ASGI)]:
        directory = tmp_path / f"{worker_class}-{len(app)}"
        directory.mkdir()
        with run_gunicorn(directory, worker_class, app=app, env={"SCRIPT_NAME": "/app"}, wait=False) as server:
            wait_for(lambda: "Booting worker" in server.log, timeout=10)
            got = []
            for path, headers in [("/app/x", {}), ("/app", {}), ("/other", {}), ("/pre/y", {"SCRIPT_NAME": "/pre"})]:
                response = server.get(path, headers=headers)
                got.append((response.status_code, response.text if response.status_code == 200 else ""))
            answers[(worker_class, app)] = got
    expected = answers.pop(("gthread", MOUNT_WSGI))
    assert expected == [(200, "/app|/x"), (200, "/app|"), (500, ""), (200, "/pre|/y")]
    for (worker_class, app), got in answers.items():
        assert got == expected, (worker_class, "ASGI" if app is MOUNT_ASGI else "WSGI")


def test_root_path_as_gunicorn_s_asgi_worker_gives_it(tmp_path: Path) -> None:
    """Gunicorn's root_path setting: the scope's root_path, the path as it came (Gunicorn's asgi
    worker). Before, it was uvworker's --root-path, which prefixes the path (uvicorn's meaning):
    /api/x became /api/api/x."""
    app = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    data = f"{scope['root_path']}|{scope['path']}|{scope['raw_path'].decode()}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": data})
'''
    answers = {}
    for worker_class in ("asgi", "uvworker.Worker", "uvworker.H11Worker"):
        directory = tmp_path / worker_class
        directory.mkdir()
        with run_gunicorn(directory, worker_class, 'root_path = "/api"\n', app=app, wait=False) as server:
            wait_for(lambda: "Booting worker" in server.log, timeout=10)
            answers[worker_class] = [server.get(path).text for path in ("/api/x", "/x")]
    assert answers.pop("asgi") == ["/api|/api/x|/api/x", "/api|/x|/x"]
    assert answers == {"uvworker.Worker": ["/api|/api/x|/api/x", "/api|/x|/x"],
                       "uvworker.H11Worker": ["/api|/api/x|/api/x", "/api|/x|/x"]}


CLOSING_HOOKS = """
import os

def pre_request(worker, req):
    with open(os.environ["EVENTS"], "a") as events:
        limits = (req.limit_request_line, req.limit_request_fields, req.limit_request_field_size,
                  req.max_buffer_headers)
        events.write(f"{req.path} {limits} {req.cfg is worker.cfg}\\n")
    if req.path == "/force":
        req.force_close()
    elif req.path == "/must":
        req.must_close = True

limit_request_line = 0
limit_request_fields = 0
limit_request_field_size = 200
"""


@pytest.mark.parametrize("target", ["/force", "/must"])
def test_a_pre_request_hook_closing_the_connection(tmp_path: Path, target: str) -> None:
    """A pre_request hook calling req.force_close() (or setting req.must_close) closes the
    connection after the response, which says Connection: close, as under gthread; for a GET
    and for a POST. Before, force_close was missing (AttributeError: a 500) and must_close did
    nothing: the connection stayed open. A request the hook leaves alone is kept alive. The
    hook also reads req.cfg and Gunicorn's limits (clamped as Gunicorn clamps them; before,
    AttributeError)."""
    answers = {}
    for worker_class in ("gthread", "uvworker.Worker", "uvworker.H11Worker"):
        directory = tmp_path / worker_class
        directory.mkdir()
        with run_gunicorn(directory, worker_class, CLOSING_HOOKS, app=WSGI_APP, wait=False) as server:
            wait_for(lambda: "Booting worker" in server.log, timeout=10)
            got = []
            for method, body in [("GET", b""), ("POST", b"abc")]:
                for path in (target, "/other"):
                    with Conn.open("127.0.0.1", server.port) as conn:
                        conn.send(build_request(method, path, body=body))
                        response = conn.read_response(method)
                        if path == target:
                            assert conn.read_until_close() == b""
                        else:
                            conn.assert_open(0.2)
                        got.append((response.status, response.has_token("connection", "close"), response.body))
            wait_for(lambda: len(server.events()) == 4)
            answers[worker_class] = (got, server.events())
    expected = answers.pop("gthread")
    assert expected == ([(200, True, b"hello "), (200, False, b"hello "), (200, True, b"hello abc"),
                         (200, False, b"hello abc")],
                        [f"{path} (0, 32768, 200, 6619140) True" for path in (target, "/other") * 2])
    assert answers == {"uvworker.Worker": expected, "uvworker.H11Worker": expected}


ENVIRON_WSGI = '''
def app(environ, start_response):
    environ["REMOTE_USER"] = "alice"  # what an authentication middleware does
    environ["myapp.route"] = "/items/<id>"
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
'''

ENVIRON_ASGI = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
'''

ENVIRON_CONF = '''
import os

accesslog = "-"
access_log_format = ("ENVIRON user=%({remote_user}e)s route=%({myapp.route}e)s real=%({HTTP_X_REAL_IP}e)s "
                     "scheme=%({wsgi.url_scheme}e)s raw=%({raw_uri}e)s path=%({PATH_INFO}e)s home=%({HOME}e)s")

def post_request(worker, req, environ, resp):
    with open(os.environ["EVENTS"], "a") as events:
        events.write(f"{environ.get('REMOTE_USER')} {environ.get('myapp.route')} {environ['PATH_INFO']}\\n")
'''


def test_the_environ_access_log_atoms_and_post_request_read(tmp_path: Path) -> None:
    """'{name}e' atoms in Gunicorn's access_log_format, and post_request's environ, are the
    request's WSGI environ, as under gthread: the keys a WSGI app set (a middleware's
    REMOTE_USER, a route) and the CGI ones (HTTP_*, wsgi.url_scheme, RAW_URI), names in any
    case; not the process environment (HOME: '-'). Before, the atoms read os.environ
    (user=- ... home=/root) and post_request got an environ rebuilt from the request, without
    the app's keys. An ASGI app has no environ of its own: the request's keys only."""
    lines = {}
    for worker_class, app in [("gthread", ENVIRON_WSGI), ("uvworker.Worker", ENVIRON_WSGI),
                              ("uvworker.H11Worker", ENVIRON_WSGI), ("uvworker.Worker", ENVIRON_ASGI),
                              ("uvworker.H11Worker", ENVIRON_ASGI)]:
        label = f"{worker_class} ({'ASGI' if app is ENVIRON_ASGI else 'WSGI'})"
        directory = tmp_path / f"{worker_class}-{len(app)}"
        directory.mkdir()
        with run_gunicorn(directory, worker_class, ENVIRON_CONF, app=app, wait=False,
                          env={"HOME": "/home/nobody"}) as server:
            wait_for(lambda: "Booting worker" in server.log, timeout=10)
            assert server.get("/items/7?x=1", headers={"X-Real-IP": "10.0.0.9"}).text == "ok"
            wait_for(lambda: "ENVIRON " in server.log and server.events())
            lines[label] = [line[line.index("ENVIRON "):] for line in server.log.splitlines() if "ENVIRON " in line]
            lines[label].extend(server.events())
    wsgi = ["ENVIRON user=alice route=/items/<id> real=10.0.0.9 scheme=http raw=/items/7?x=1 path=/items/7 home=-",
            "alice /items/<id> /items/7"]
    asgi = ["ENVIRON user=- route=- real=10.0.0.9 scheme=http raw=/items/7?x=1 path=/items/7 home=-",
            "None None /items/7"]
    assert lines == {"gthread (WSGI)": wsgi, "uvworker.Worker (WSGI)": wsgi, "uvworker.H11Worker (WSGI)": wsgi,
                     "uvworker.Worker (ASGI)": asgi, "uvworker.H11Worker (ASGI)": asgi}
