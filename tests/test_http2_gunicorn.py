"""HTTP/2 under Gunicorn (issue 12): h2 by ALPN over Gunicorn's certfile/keyfile and h2c on its
plain listener, with Gunicorn's hooks and access log; --no-http2 through the environment."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request
from tests.test_gunicorn import HOOKS, WORKERS, run_gunicorn
from tests.test_http2 import needs_curl
from tests.test_tls import make_cert


@pytest.mark.parametrize("worker_class", WORKERS)
def test_h2_over_gunicorn_tls_with_hooks_and_access_log(tmp_path: Path, worker_class: str) -> None:
    certfile, keyfile = make_cert(tmp_path)
    conf = HOOKS + f'\ncertfile = "{certfile}"\nkeyfile = "{keyfile}"\naccesslog = "-"\n'
    with run_gunicorn(tmp_path, worker_class, conf) as server:
        url = f"https://127.0.0.1:{server.port}"
        with httpx.Client(http2=True, verify=False, timeout=5) as client:
            r = client.get(url + "/hello")
            assert r.http_version == "HTTP/2" and r.status_code == 200
            assert r.json()["scheme"] == "https" and r.headers["x-app"] == "yes"
        pid = r.json()["pid"]
        assert server.events("pre_request") == [f"pre_request {pid} GET /hello"]
        assert server.events("post_request") == [f"post_request {pid} GET /hello 200 GET"]
        assert '"GET /hello HTTP/2.0" 200' in server.log  # SERVER_PROTOCOL, as gthread's
        with httpx.Client(verify=False, timeout=5) as client:  # http/1.1 still by ALPN
            assert client.get(url + "/").http_version == "HTTP/1.1"


@needs_curl
def test_curl_h2c_and_no_http2_env(tmp_path: Path) -> None:
    with run_gunicorn(tmp_path) as server:
        out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-w", " %{http_version}", server.url + "/"],
                             capture_output=True, text=True, timeout=20)
        assert out.stdout.endswith(" 2"), out.stderr
    off = tmp_path / "off"
    off.mkdir()
    with run_gunicorn(off, env={"UVWORKER_HTTP2": "0"}) as server:
        out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", server.url + "/"],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode != 0 or '"pid"' not in out.stdout


def test_h2c_with_proxy_protocol_as_gthread(tmp_path: Path) -> None:
    """Gunicorn's proxy_protocol with h2c by prior knowledge: a connection without a PROXY
    header speaks HTTP/2, under gthread and our workers. Before, proxy_protocol turned h2c off
    in our workers (no response to the HTTP/2 preface). One with a header speaks HTTP/1.1 in
    our workers (gthread answers it 400, "Expected HTTP/2 connection preface": not compared)."""
    conf = 'http_protocols = "h2,h1"\nhttp2_cleartext = "prior-knowledge"\nproxy_protocol = "auto"\nproxy_allow_ips = "*"\n'
    answers = {}
    for worker_class in ["gthread", *WORKERS]:
        directory = tmp_path / worker_class
        directory.mkdir()
        with run_gunicorn(directory, worker_class, conf, app=WSGI_VERSION, wait=False) as server:
            wait_for(lambda: "Booting worker" in server.log, timeout=10)
            with httpx.Client(http1=False, http2=True, timeout=5) as client:
                response = wait_for(lambda: _get_or_none(client, server.url + "/"), timeout=10)
                got = [response.http_version, response.text]
            if worker_class != "gthread":
                with Conn.open("127.0.0.1", server.port) as conn:
                    conn.send(b"PROXY TCP4 10.9.8.7 127.0.0.1 5555 80\r\n" + build_request(headers=[("Connection", "close")]))
                    got.append(conn.read_response().body.decode())
            answers[worker_class] = got
    assert answers.pop("gthread") == ["HTTP/2", "HTTP/2.0 127.0.0.1"]
    assert answers == {worker_class: ["HTTP/2", "HTTP/2.0 127.0.0.1", "HTTP/1.1 10.9.8.7"] for worker_class in WORKERS}


WSGI_VERSION = '''
def app(environ, start_response):
    version = environ["SERVER_PROTOCOL"]
    data = f"{version} {environ['REMOTE_ADDR']}".encode()
    start_response("200 OK", [("Content-Length", str(len(data)))])
    return [data]
'''


def _get_or_none(client: httpx.Client, url: str) -> httpx.Response | None:
    try:
        return client.get(url)
    except httpx.TransportError:
        return None
