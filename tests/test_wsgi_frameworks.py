"""The Flask and Django examples served as WSGI apps (issue 4), on both parsers; and the Flask
example under Gunicorn with uvworker's worker class."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def flask_app() -> Any:
    pytest.importorskip("flask")
    from examples.flask_app import app

    return app


def django_app() -> Any:
    pytest.importorskip("django")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")
    from examples.django_app.wsgi import application

    return application


APPS = {"flask": flask_app, "django": django_app}
SOURCES = {"flask": ROOT / "examples" / "flask_app.py", "django": ROOT / "examples" / "django_app" / "views.py"}


@pytest.fixture(params=list(APPS))
def framework(request: pytest.FixtureRequest) -> str:
    return request.param


def test_hello_echo_and_auto_detection(serve: Any, framework: str) -> None:
    with serve(APPS[framework]()) as srv:  # interface "auto": detected as WSGI
        resp = httpx.get(srv.url + "/")
        assert resp.status_code == 200 and resp.json()["hello"] == "world"
        resp = httpx.post(srv.url + "/echo", content=b"echo me", headers={"Content-Type": "text/plain"})
        assert resp.content == b"echo me"
        assert resp.headers["content-length"] == "7"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_streaming_upload(serve: Any, framework: str, chunked: bool) -> None:
    payload = hashlib.sha256(b"seed").digest() * (3 * MiB // 32)
    content: Any = iter([payload[i : i + 100_000] for i in range(0, len(payload), 100_000)]) if chunked else payload
    with serve(APPS[framework]()) as srv:
        resp = httpx.post(srv.url + "/upload", content=content, timeout=20)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def test_expect_continue_upload(serve: Any, framework: str) -> None:
    with serve(APPS[framework]()) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", "/upload", headers=[
            ("Host", "127.0.0.1"), ("Expect", "100-continue"), ("Content-Length", "5"),
        ]))
        assert conn.read_head().status == 100
        conn.send(b"12345")
        resp = conn.read_response()
    assert resp.status == 200 and json.loads(resp.body)["bytes"] == 5


def test_streamed_response_and_file(serve: Any, framework: str) -> None:
    with serve(APPS[framework](), http="h11") as srv:
        resp = httpx.get(srv.url + "/stream?n=4")
        assert resp.text == "".join(f"line {i}\n" for i in range(4))
        resp = httpx.get(srv.url + "/file")
        assert resp.content == SOURCES[framework].read_bytes()
        assert resp.headers["content-length"] == str(len(resp.content))


def test_script_name_from_root_path(serve: Any) -> None:
    with serve(django_app(), root_path="/mounted") as srv:
        resp = httpx.get(srv.url + "/")
    assert resp.json() == {"hello": "world", "path": "/mounted/", "script_name": "/mounted"}


@contextlib.contextmanager
def gunicorn(app: str, *args: str) -> Iterator[str]:
    """``gunicorn -k uvworker.Worker app`` on a socket bound here (fd://), until killed."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    host, port = sock.getsockname()
    command = [sys.executable, "-m", "gunicorn", "-k", "uvworker.Worker", "--bind", f"fd://{sock.fileno()}",
               "--workers", "1", *args, app]
    proc = subprocess.Popen(command, cwd=ROOT, pass_fds=[sock.fileno()], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sock.close()
    try:
        url = f"http://{host}:{port}"

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"gunicorn exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                return httpx.get(url + "/", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=20, interval=0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_flask_under_gunicorn_worker() -> None:
    pytest.importorskip("flask")
    pytest.importorskip("gunicorn")
    payload = b"u" * (2 * MiB + 3)
    with gunicorn("examples.flask_app:app", "--threads", "2") as url:
        resp = httpx.post(url + "/upload", content=iter([payload[: MiB], payload[MiB:]]), timeout=20)
        assert resp.json() == {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        assert httpx.get(url + "/stream?n=2").text == "line 0\nline 1\n"
