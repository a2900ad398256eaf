"""HTTP/2 under Gunicorn (issue 12): h2 by ALPN over Gunicorn's certfile/keyfile and h2c on its
plain listener, with Gunicorn's hooks and access log; --no-http2 through the environment."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

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
        assert '"GET /hello HTTP/2" 200' in server.log
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
