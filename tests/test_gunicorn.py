"""uvworker under Gunicorn (issue 5): real ``gunicorn -k uvworker.Worker`` processes on loopback.

Each test writes an app module and a gunicorn.conf.py into its tmp dir, binds 127.0.0.1:0
itself and hands the listening socket to Gunicorn as ``fd://N`` (no port race), then talks
HTTP to it. The app and the server hooks append lines to an events file, so tests can see
what ran in which process. This file covers the settings mapping, logging and hooks;
test_gunicorn_lifecycle.py covers signals, recycling and the heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gunicorn.config import Config as GunicornConfig
import httpx
import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request
from uvworker.config import ConfigError
from uvworker.settings import SETTINGS
from uvworker.gunicorn_settings import UNSUPPORTED, settings_from_gunicorn

REPO = Path(__file__).resolve().parent.parent
WORKERS = ["uvworker.Worker", "uvworker.H11Worker"]

APP = '''
import asyncio, json, os, time

IMPORTED_BY = os.getpid()


def record(line):
    with open(os.environ["EVENTS"], "a") as events:
        events.write(line + "\\n")


def stuck_here():
    time.sleep(30)  # blocks the event loop


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if os.environ.get("FAIL_STARTUP"):
                    await send({"type": "lifespan.startup.failed", "message": "no database"})
                    return
                record(f"startup {os.getpid()}")
                await send({"type": "lifespan.startup.complete"})
            else:
                record(f"shutdown {os.getpid()}")
                await send({"type": "lifespan.shutdown.complete"})
                return
    path, query = scope["path"], scope["query_string"].decode()
    if path == "/slow":
        await asyncio.sleep(float(query or 1))
    elif path == "/block":
        stuck_here()
    elif path == "/hold":  # blocks the event loop until the test creates the file EVENTS.go
        record(f"holding {os.getpid()}")
        deadline = time.monotonic() + 10
        while not os.path.exists(os.environ["EVENTS"] + ".go") and time.monotonic() < deadline:
            time.sleep(0.005)
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            await send({"type": "http.response.body", "body": b"tick\\n", "more_body": True})
            await asyncio.sleep(0.05)
    info = {
        "pid": os.getpid(), "imported_by": IMPORTED_BY, "scheme": scope["scheme"],
        "client": scope["client"], "root_path": scope["root_path"],
        "loop": type(asyncio.get_running_loop()).__module__, "uid": os.getuid(), "gid": os.getgid(),
    }
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"x-app", b"yes")]})
    await send({"type": "http.response.body", "body": json.dumps(info).encode()})
'''

HOOKS = '''
import os


def _record(line):
    with open(os.environ["EVENTS"], "a") as events:
        events.write(line + "\\n")


def post_worker_init(worker):
    _record(f"post_worker_init {os.getpid()}")


def pre_request(worker, req):
    _record(f"pre_request {os.getpid()} {req.method} {req.path}")


def post_request(worker, req, environ, resp):
    method = environ["REQUEST_METHOD"]
    _record(f"post_request {os.getpid()} {req.method} {req.path} {resp.status_code} {method}")


def worker_int(worker):
    _record(f"worker_int {os.getpid()}")


def worker_abort(worker):
    _record(f"worker_abort {os.getpid()}")


def worker_exit(server, worker):
    _record(f"worker_exit {worker.pid}")
'''


class Gunicorn:
    """A gunicorn master started by a test, in its own session, on a socket bound here."""

    def __init__(
        self, directory: Path, proc: subprocess.Popen[bytes], port: int, workers: int, uds: Path | None
    ) -> None:
        self.dir = directory
        self.proc = proc
        self.port = port
        self.workers = workers
        self.uds = uds
        self.url = f"http://127.0.0.1:{port}"

    @property
    def log(self) -> str:
        return (self.dir / "gunicorn.log").read_text(errors="replace")

    def events(self, prefix: str = "") -> list[str]:
        path = self.dir / "events"
        lines = path.read_text().splitlines() if path.exists() else []
        return [line for line in lines if line.startswith(prefix)]

    def get(self, path: str = "/", timeout: float = 5.0, **kwargs: Any) -> httpx.Response:
        if self.uds is not None:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.uds))) as client:
                return client.get("http://localhost" + path, timeout=timeout, **kwargs)
        return httpx.get(self.url + path, timeout=timeout, **kwargs)

    def info(self, path: str = "/", **kwargs: Any) -> dict[str, Any]:
        response = self.get(path, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_ready(self, count: int | None = None, timeout: float = 10.0) -> None:
        """Until ``count`` workers (in all) have logged that they listen."""
        count = self.workers if count is None else count

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log}")
            return self.log.count("Listening on ") >= count

        wait_for(ready, timeout=timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"gunicorn did not exit within {timeout} s:\n{self.log}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session this test started
                self.proc.wait(5)


@contextlib.contextmanager
def run_gunicorn(
    tmp_path: Path,
    worker_class: str = "uvworker.Worker",
    conf: str = "",
    *,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    workers: int = 1,
    app: str = APP,
    wait: bool = True,
    uds: Path | None = None,
) -> Iterator[Gunicorn]:
    """Gunicorn serving APP on a loopback socket bound here (or on the Unix socket ``uds``,
    which Gunicorn binds), configured by ``conf`` (gunicorn.conf.py lines)."""
    (tmp_path / "app.py").write_text(app)
    (tmp_path / "gunicorn.conf.py").write_text(
        textwrap.dedent(
            f"""
            control_socket_disable = True
            graceful_timeout = 5
            workers = {workers}
            """
        )
        + textwrap.dedent(conf)
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    bind = f"unix:{uds}" if uds is not None else f"fd://{sock.fileno()}"
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]),
        "EVENTS": str(tmp_path / "events"),
        **(env or {}),
    }
    with open(tmp_path / "gunicorn.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-k", worker_class,
             "-b", bind, *args, "app:app"],
            cwd=tmp_path, env=environ, stdout=log, stderr=subprocess.STDOUT,
            pass_fds=(sock.fileno(),), start_new_session=True,
        )
    sock.close()
    server = Gunicorn(tmp_path, proc, port, workers, uds)
    try:
        if wait:
            server.wait_ready()
        yield server
    finally:
        server.stop()


# -- the mapping, without processes -------------------------------------------------------------
def test_every_gunicorn_slot_names_a_gunicorn_setting() -> None:
    known = GunicornConfig().settings
    slots = [s.gunicorn for s in SETTINGS if s.gunicorn]
    assert slots and all(slot in known for slot in slots), [s for s in slots if s not in known]


# Every Gunicorn setting is honoured or refused: mapped by a row of the settings table, handed on
# by the worker, applied by Gunicorn itself, or refused when set (gunicorn_settings.UNSUPPORTED).
HANDED_ON = {  # by the worker class: hooks, loggers, TLS, proxy rules (uvworker.workers, gunicorn_hooks)
    "secure_scheme_headers", "root_path", "pre_request", "post_request", "worker_int", "worker_abort", "ssl_context",
    "accesslog", "errorlog", "logger_class", "logconfig", "logconfig_dict", "logconfig_json", "syslog",
    "syslog_addr", "syslog_prefix", "syslog_facility", "disable_redirect_access_to_syslog", "statsd_host",
    "statsd_prefix", "dogstatsd_tags",
}
GUNICORN_APPLIES = {  # the arbiter, the base worker (init_process, notify), the application loader
    "config", "wsgi_app", "bind", "worker_class", "reload_engine", "reload_extra_files", "spew",
    "check_config", "print_config", "reuse_port", "chdir", "daemon", "raw_env", "worker_tmp_dir", "initgroups",
    "capture_output", "enable_stdio_inheritance", "enable_backlog_metric", "proc_name", "default_proc_name",
    "pythonpath", "paste", "raw_paste_global_conf", "on_starting", "on_reload", "when_ready", "pre_fork",
    "post_fork", "post_worker_init", "pre_exec", "child_exit", "worker_exit", "nworkers_changed", "on_exit",
    "dirty_apps", "dirty_workers", "dirty_timeout", "dirty_threads", "dirty_graceful_timeout",
    "on_dirty_starting", "dirty_post_fork", "dirty_worker_init", "dirty_worker_exit", "control_socket",
    "control_socket_mode", "control_socket_disable",
    # Gunicorn itself does nothing with these (or ignores them: ssl_version is deprecated)
    "tmp_upload_dir", "ssl_version", "suppress_ragged_eofs",
    # asyncio's TLS handshakes on connect; sendfile: wsgi.file_wrapper never uses sendfile() here
    "do_handshake_on_connect", "sendfile",
    "uwsgi_allow_ips",  # for protocol = "uwsgi" only, which is refused
}
# A value other than the default for each refused setting.
UNSUPPORTED_VALUES = {
    "protocol": "uwsgi", "http_parser": "python", "header_map": "dangerous", "forwarder_headers": "REMOTE_USER",
    "permit_obsolete_folding": True, "strip_header_spaces": True, "permit_unconventional_http_method": True,
    "permit_unconventional_http_version": True, "casefold_http_method": True,
    "http2_initial_window_size": 1 << 20, "http2_max_frame_size": 1 << 15, "http2_max_header_list_size": 1 << 17,
    "asgi_disconnect_grace_period": 10, "http2_cleartext": "upgrade",
}


def test_every_gunicorn_setting_is_honoured_or_refused() -> None:
    """A Gunicorn upgrade that adds a setting fails here until it is sorted into a group."""
    known = set(GunicornConfig().settings)
    mapped = {s.gunicorn for s in SETTINGS if s.gunicorn}
    groups = [mapped, HANDED_ON, GUNICORN_APPLIES, set(UNSUPPORTED)]
    assert sum(len(group) for group in groups) == len(set().union(*groups)), "a setting in two groups"
    assert set().union(*groups) == known, (known - set().union(*groups), set().union(*groups) - known)
    assert set(UNSUPPORTED_VALUES) == set(UNSUPPORTED)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_an_unsupported_gunicorn_setting_that_is_set_is_refused(name: str) -> None:
    cfg = GunicornConfig()
    settings_from_gunicorn(cfg, {})  # at its default: accepted
    cfg.set(name, UNSUPPORTED_VALUES[name])
    with pytest.raises(ConfigError, match=rf"^Gunicorn setting {name}=.* is not supported by uvworker: .+\.$"):
        settings_from_gunicorn(cfg, {})


def test_http2_cleartext_prior_knowledge_is_what_uvworker_does() -> None:
    cfg = GunicornConfig()
    cfg.set("http2_cleartext", "prior-knowledge")
    settings_from_gunicorn(cfg, {})


def test_websocket_max_message_size_maps_to_ws_max_size() -> None:
    cfg = GunicornConfig()
    cfg.set("websocket_max_message_size", 4096)
    assert settings_from_gunicorn(cfg, {})["ws_max_size"] == 4096


def test_gunicorn_defaults_map_to_uvworker_settings() -> None:
    settings = settings_from_gunicorn(GunicornConfig(), {})
    assert settings["timeout_keep_alive"] == 2.0
    assert settings["limit_concurrency"] == 1000
    assert settings["limit_request_line"] == 4094
    assert settings["forwarded_allow_ips"] == "127.0.0.1,::1"
    assert settings["proxy_protocol"] is False
    assert settings["timeout_graceful_shutdown"] == 29.0  # a second left for lifespan shutdown
    assert settings["log_level"] == "info"
    assert settings["wsgi_threads"] == 10  # Gunicorn's threads=1 would serialise WSGI requests


def test_gunicorn_values_are_adapted() -> None:
    cfg = GunicornConfig()
    for name, value in [("keepalive", 0), ("limit_request_line", 0), ("limit_request_field_size", 0),
                        ("limit_request_fields", 100000), ("proxy_protocol", "v2"), ("loglevel", "DEBUG"),
                        ("worker_connections", 3), ("graceful_timeout", 2), ("threads", 4)]:
        cfg.set(name, value)
    settings = settings_from_gunicorn(cfg, {})
    assert settings["timeout_keep_alive"] == 0.0
    assert settings["limit_request_line"] == 1 << 20  # Gunicorn's "unlimited" stays bounded
    assert settings["limit_request_field_size"] == 8188  # Gunicorn's 8190, which counts the CRLF
    assert settings["limit_request_fields"] == 32768
    assert settings["limit_request_head"] == 0  # no head bound beyond Gunicorn's three limits
    assert settings["proxy_protocol"] is True
    assert settings["log_level"] == "debug"
    assert settings["limit_concurrency"] == 3
    assert settings["timeout_graceful_shutdown"] == 1.6
    assert settings["wsgi_threads"] == 4


def test_environment_fills_in_what_gunicorn_leaves_at_its_default() -> None:
    cfg = GunicornConfig()
    environ = {"UVWORKER_TIMEOUT_KEEP_ALIVE": "9", "UVWORKER_TIMEOUT_REQUEST_HEADER": "3",
               "UVWORKER_APP": "ignored:app"}
    settings = settings_from_gunicorn(cfg, environ)
    assert settings["timeout_keep_alive"] == 9.0  # Gunicorn's keepalive is at its default
    assert settings["timeout_request_header"] == 3.0  # no Gunicorn setting for it
    assert "app" not in settings
    cfg.set("keepalive", 4)
    assert settings_from_gunicorn(cfg, environ)["timeout_keep_alive"] == 4.0  # set: Gunicorn wins


def test_standalone_only_settings_are_left_out() -> None:
    # Nothing under Gunicorn serves --metrics-bind: it must not turn the counting on either.
    settings = settings_from_gunicorn(GunicornConfig(), {"UVWORKER_METRICS_BIND": "127.0.0.1:9"})
    assert "metrics_bind" not in settings


def test_invalid_environment_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="UVWORKER_LIFESPAN"):
        settings_from_gunicorn(GunicornConfig(), {"UVWORKER_LIFESPAN": "sometimes"})


def test_importing_uvworker_does_not_import_gunicorn() -> None:
    code = (
        "import sys, uvworker; assert 'gunicorn' not in sys.modules; "
        "w = uvworker.Worker; assert 'gunicorn' in sys.modules; "
        "print(w.__name__, uvworker.H11Worker.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["Worker", "H11Worker"]


# -- real gunicorn ------------------------------------------------------------------------------
@pytest.mark.parametrize("worker_class", WORKERS)
def test_serves_with_the_worker_class_loop_and_logs_access(tmp_path: Path, worker_class: str) -> None:
    conf = """
        accesslog = "-"
        access_log_format = (
            'ACCESS %(h)s "%(r)s" %(s)s %(b)s %(D)s %({x-trace}i)s %({x-app}o)s %(m)s %(U)s %(q)s'
        )
        """
    with run_gunicorn(tmp_path, worker_class, conf) as server:
        response = server.get("/some/path?a=1", headers={"X-Trace": "t-42"})
        info = response.json()
        assert info["loop"].split(".")[0] == ("asyncio" if "H11" in worker_class else "uvloop")
        assert info["pid"] != server.proc.pid
        line = wait_for(lambda: next((ln for ln in server.log.splitlines() if ln.startswith("ACCESS")), None))
        atoms = line.split()
        assert atoms[:4] == ["ACCESS", "127.0.0.1", '"GET', "/some/path?a=1"]
        assert atoms[5:7] == ["200", str(len(response.content))]
        assert atoms[7].isdigit() and int(atoms[7]) < 5_000_000  # %(D)s: microseconds
        assert atoms[8:] == ["t-42", "yes", "GET", "/some/path", "a=1"]
        assert "[ERROR]" not in server.log


def test_custom_logger_class_gets_gunicorn_objects(tmp_path: Path) -> None:
    conf = """
        import os
        from gunicorn.glogging import Logger

        class RecordingLogger(Logger):  # as statsd-style loggers do: read, then log as usual
            def access(self, resp, req, environ, request_time):
                with open(os.environ["EVENTS"], "a") as events:
                    events.write(f"access {resp.status} {resp.sent} {req.method} {req.uri} "
                                 f"{environ['RAW_URI']} {environ['HTTP_X_TRACE']} "
                                 f"{request_time.total_seconds() < 5}\\n")
                super().access(resp, req, environ, request_time)

        logger_class = RecordingLogger
        accesslog = "-"
        access_log_format = 'ACCESS %(h)s "%(r)s" %(s)s %(B)s %({x-trace}i)s %({x-app}o)s'
        """
    with run_gunicorn(tmp_path, conf=conf) as server:
        length = len(server.get("/x?y=1", headers={"X-Trace": "t-7"}).content)
        line = wait_for(lambda: next((ln for ln in server.log.splitlines() if ln.startswith("ACCESS")), None))
    assert line == f'ACCESS 127.0.0.1 "GET /x?y=1 HTTP/1.1" 200 {length} t-7 yes'
    assert server.events("access") == [f"access 200 OK {length} GET /x?y=1 /x?y=1 t-7 True"]


@pytest.mark.parametrize("worker_class", WORKERS)
def test_worker_connections_sheds_load_with_503(tmp_path: Path, worker_class: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    conf = "worker_connections = 2\n"
    with run_gunicorn(tmp_path, worker_class, conf) as server, ThreadPoolExecutor(3) as pool:
        started = time.monotonic()
        statuses = sorted(pool.map(lambda _: server.get("/slow?1").status_code, range(3)))
        assert statuses == [200, 200, 503]
        assert time.monotonic() - started < 3


@pytest.mark.parametrize("worker_class", WORKERS)
def test_request_limits_answer_414_and_431(tmp_path: Path, worker_class: str) -> None:
    conf = """
        limit_request_line = 200
        limit_request_fields = 8
        limit_request_field_size = 100
        """
    with run_gunicorn(tmp_path, worker_class, conf) as server:
        assert server.get("/" + "a" * 300).status_code == 414
        assert server.get("/", headers={f"x-{i}": "1" for i in range(4)}).status_code == 431  # httpx adds 5
        assert server.get("/", headers={"x-big": "b" * 150}).status_code == 431
        assert server.get("/", headers={"x-ok": "b" * 50}).status_code == 200


@pytest.mark.parametrize("worker_class", WORKERS)
def test_keepalive_maps_to_the_idle_timeout_and_zero_disables_it(tmp_path: Path, worker_class: str) -> None:
    with run_gunicorn(tmp_path, worker_class, "keepalive = 1\n") as server:
        with Conn.open("127.0.0.1", server.port) as conn:
            conn.send(build_request())
            assert conn.read_response().get("connection") is None
            started = time.monotonic()
            conn.closed_within(3)
            assert 0.5 < time.monotonic() - started < 2.5
    with run_gunicorn(tmp_path, worker_class, "keepalive = 0\n") as server:
        with Conn.open("127.0.0.1", server.port) as conn:
            conn.send(build_request())
            assert conn.read_response().has_token("connection", "close")


def test_hooks_run_in_the_worker(tmp_path: Path) -> None:
    with run_gunicorn(tmp_path, conf=HOOKS) as server:
        pid = server.info("/hello")["pid"]
        os.kill(pid, signal.SIGWINCH)  # ignored by workers
        assert server.info("/again")["pid"] == pid
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
    assert server.events("post_worker_init") == [f"post_worker_init {pid}"]
    assert server.events("pre_request") == [f"pre_request {pid} GET /hello", f"pre_request {pid} GET /again"]
    assert server.events("post_request") == [
        f"post_request {pid} GET /hello 200 GET", f"post_request {pid} GET /again 200 GET"]
    assert server.events("worker_exit") == [f"worker_exit {pid}"]
    assert server.events("shutdown") == [f"shutdown {pid}"]


def test_post_request_gets_the_environ_a_wsgi_app_gets(tmp_path: Path) -> None:
    """One environ builder: the hook sees what the WSGI app saw (headers with "_" dropped
    against spoofing, repeated fields joined with ",", cookies with "; "), plus RAW_URI."""
    conf = """
        import json, os

        def post_request(worker, req, environ, resp):
            strings = {k: v for k, v in environ.items() if isinstance(v, str)}
            with open(os.environ["EVENTS"], "a") as events:
                events.write("environ " + json.dumps(strings) + "\\n")
        """
    wsgi = (
        "import json\n"
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'application/json')])\n"
        "    return [json.dumps({k: v for k, v in environ.items() if isinstance(v, str)}).encode()]\n"
    )
    headers = [("X-Trace", "real"), ("X_Trace", "spoofed"), ("Cookie", "a=1"), ("Cookie", "b=2"),
               ("Accept", "text/html"), ("Accept", "text/plain"), ("Content-Type", "text/plain")]
    with run_gunicorn(tmp_path, conf=conf, app=wsgi) as server:
        with Conn.open("127.0.0.1", server.port) as conn:
            conn.send(build_request("POST", "/p%20q?x=1", headers=headers, body=b"hi"))
            seen_by_app = json.loads(conn.read_response().body)
        line = wait_for(lambda: server.events("environ "))[0]
    seen_by_hook = json.loads(line.removeprefix("environ "))
    assert seen_by_hook.pop("RAW_URI") == "/p%20q?x=1"
    assert seen_by_hook == seen_by_app
    assert seen_by_hook["HTTP_X_TRACE"] == "real"
    assert seen_by_hook["HTTP_COOKIE"] == "a=1; b=2"
    assert seen_by_hook["HTTP_ACCEPT"] == "text/html,text/plain"
    assert (seen_by_hook["CONTENT_TYPE"], seen_by_hook["CONTENT_LENGTH"]) == ("text/plain", "2")
    assert (seen_by_hook["PATH_INFO"], seen_by_hook["QUERY_STRING"]) == ("/p q", "x=1")


def test_exception_in_pre_request_is_a_500(tmp_path: Path) -> None:
    conf = """
        def pre_request(worker, req):
            if req.path == "/forbidden":
                raise RuntimeError("refused by pre_request")
        """
    with run_gunicorn(tmp_path, conf=conf) as server:
        assert server.get("/forbidden").status_code == 500
        assert server.get("/").status_code == 200
        assert "refused by pre_request" in server.log


def test_forwarded_allow_ips_and_secure_scheme_headers(tmp_path: Path) -> None:
    conf = """
        forwarded_allow_ips = "127.0.0.1"
        secure_scheme_headers = {"X-SCHEME": "secure", "X-FORWARDED-PROTO": "https"}
        """
    with run_gunicorn(tmp_path, conf=conf) as server:
        assert server.info()["scheme"] == "http"
        assert server.info(headers={"X-Scheme": "secure"})["scheme"] == "https"
        assert server.info(headers={"X-Scheme": "plain"})["scheme"] == "http"
        info = server.info(headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
        assert (info["client"][0], info["scheme"]) == ("203.0.113.9", "https")
        contradiction = server.get("/", headers={"X-Scheme": "secure", "X-Forwarded-Proto": "http"})
        assert contradiction.status_code == 400
    untrusted = 'forwarded_allow_ips = "10.0.0.1"\nsecure_scheme_headers = {"X-SCHEME": "on"}\n'
    with run_gunicorn(tmp_path, conf=untrusted) as server:
        info = server.info(headers={"X-Scheme": "on", "X-Forwarded-For": "203.0.113.9"})
        assert (info["client"][0], info["scheme"]) == ("127.0.0.1", "http")  # peer not trusted


def test_proxy_protocol_v1_and_v2(tmp_path: Path) -> None:
    import struct

    conf = 'proxy_protocol = "auto"\nproxy_allow_ips = "127.0.0.1"\n'
    v2_addresses = (
        socket.inet_aton("198.51.100.7") + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 4321, 80)
    )
    v2 = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(v2_addresses)) + v2_addresses
    with run_gunicorn(tmp_path, conf=conf) as server:
        for header, client in [(b"PROXY TCP4 192.0.2.1 127.0.0.1 1234 80\r\n", ["192.0.2.1", 1234]),
                               (v2, ["198.51.100.7", 4321])]:
            with Conn.open("127.0.0.1", server.port) as conn:
                conn.send(header + build_request())
                assert json.loads(conn.read_response().body)["client"] == client


def test_tls_with_the_ssl_context_hook(tmp_path: Path) -> None:
    from tests.test_tls import make_cert

    certfile, keyfile = make_cert(tmp_path)
    conf = f"""
        certfile = {str(certfile)!r}
        keyfile = {str(keyfile)!r}

        def ssl_context(config, default_ssl_context_factory):
            import os, ssl
            context = default_ssl_context_factory()
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            with open(os.environ["EVENTS"], "a") as events:
                events.write("ssl_context\\n")
            return context
        """
    with run_gunicorn(tmp_path, conf=conf) as server:
        response = httpx.get(f"https://127.0.0.1:{server.port}/", verify=False, timeout=5)
        assert response.json()["scheme"] == "https"
        assert server.events("ssl_context")
        import ssl

        old = ssl.create_default_context()
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(httpx.ConnectError):  # the hook's minimum version is in force
            httpx.get(f"https://127.0.0.1:{server.port}/", verify=old, timeout=5)


def test_preload_app_imports_in_the_master(tmp_path: Path) -> None:
    with run_gunicorn(tmp_path, conf="preload_app = True\n") as server:
        info = server.info()
        assert info["imported_by"] == server.proc.pid != info["pid"]
    with run_gunicorn(tmp_path) as server:
        info = server.info()
        assert info["imported_by"] == info["pid"]


def test_reload_restarts_the_worker_on_new_code(tmp_path: Path) -> None:
    source = tmp_path / "app.py"

    def change_to(code: str, check: Any) -> httpx.Response:
        # Gunicorn's polling reloader compares against what it saw at its first scan, which a
        # new worker makes a moment after it starts serving: keep writing until one notices.
        def changed() -> httpx.Response | None:
            # Replaced whole: a worker booting meanwhile must not import a half-written file
            # (it found no app in it, and Gunicorn stopped: "App failed to load").
            fresh = tmp_path / "app.py.new"
            fresh.write_text(code)
            fresh.replace(source)
            return response if check(response := server.get("/")) else None

        return wait_for(changed, timeout=10, interval=0.3)

    with run_gunicorn(tmp_path, conf="reload = True\n") as server:
        first = server.info()
        reloaded = APP.replace('"x-app", b"yes"', '"x-app", b"reloaded"')
        response = change_to(reloaded, lambda r: r.headers.get("x-app") == "reloaded")
        assert response.json()["pid"] != first["pid"]
        response = change_to(APP + "\ndef broken(:\n", lambda r: r.status_code == 500)
        assert "SyntaxError" in response.text  # served by the new worker until the file is fixed
        change_to(APP, lambda r: r.status_code == 200)

def test_user_group_and_umask_as_gunicorn_applies_them() -> None:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    import grp
    import pwd
    import shutil
    import tempfile

    user = pwd.getpwnam("nobody")
    group = grp.getgrgid(user.pw_gid)
    directory = Path(tempfile.mkdtemp(prefix="uvworker-gunicorn-"))  # pytest's tmp dirs are 0700
    try:
        directory.chmod(0o777)  # the worker imports the app and writes events as nobody
        uds = directory / "app.sock"
        conf = f"user = {user.pw_name!r}\ngroup = {group.gr_name!r}\numask = 0o077\n"
        with run_gunicorn(directory, conf=conf, uds=uds) as server:
            info = server.info()
            assert (info["uid"], info["gid"]) == (user.pw_uid, group.gr_gid)
            assert uds.exists(), server.log
            assert uds.stat().st_mode & 0o777 == 0o700  # the arbiter bound it under the umask
    finally:
        shutil.rmtree(directory)


def test_example_configuration_serves(tmp_path: Path) -> None:
    example = (REPO / "examples" / "gunicorn.conf.py").read_text()
    with run_gunicorn(tmp_path, conf=example, env={"WEB_CONCURRENCY": "2"}, workers=2) as server:
        assert server.get("/").status_code == 200  # -b on the command line wins over its bind
        wait_for(lambda: '"GET / HTTP/1.1" 200' in server.log)
        assert "[ERROR]" not in server.log


def test_wsgi_application(tmp_path: Path) -> None:
    wsgi = (
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [environ['wsgi.url_scheme'].encode(), b' ', environ['PATH_INFO'].encode()]\n"
    )
    with run_gunicorn(tmp_path, app=wsgi, args=("--threads", "4")) as server:
        assert server.get("/wsgi/path").text == "http /wsgi/path"


@pytest.mark.parametrize("worker_class", WORKERS)
def test_wsgi_behind_the_rules_refusals_and_hooks(tmp_path: Path, worker_class: str) -> None:
    """A WSGI app behind Gunicorn's per-request rules (served without a task over HTTP/1.1):
    the scheme and client a trusted proxy gives, its contradiction a 400, a pre_request that
    raises a 500 with its error logged, and the budget counted by every request that passed."""
    wsgi = (
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [environ['wsgi.url_scheme'].encode(), b' ', environ['REMOTE_ADDR'].encode()]\n"
    )
    conf = """
        forwarded_allow_ips = "127.0.0.1"
        secure_scheme_headers = {"X-SCHEME": "secure", "X-FORWARDED-PROTO": "https"}
        def pre_request(worker, req):
            if req.path == "/forbidden":
                raise RuntimeError("refused by pre_request")
        def post_request(worker, req, environ, resp):
            worker.log.info("served %s nr=%d", req.path, worker.nr)
        """
    with run_gunicorn(tmp_path, worker_class, conf, app=wsgi, args=("--log-level", "info")) as server:
        assert server.get("/").text == "http 127.0.0.1"
        assert server.get("/", headers={"X-Scheme": "secure", "X-Forwarded-For": "203.0.113.9"}).text == "https 203.0.113.9"
        assert server.get("/", headers={"X-Scheme": "secure", "X-Forwarded-Proto": "http"}).status_code == 400
        assert server.get("/forbidden").status_code == 500
        assert server.get("/again").text == "http 127.0.0.1"
        deadline = time.monotonic() + 10
        while "served /again nr=3" not in server.log and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "refused by pre_request" in server.log
        assert "served /again nr=3" in server.log  # the refused ones did not count


def test_uvworker_options_from_raw_env(tmp_path: Path) -> None:
    with run_gunicorn(tmp_path, conf='raw_env = ["UVWORKER_ROOT_PATH=/api"]\n') as server:
        assert server.info()["root_path"] == "/api"
    with run_gunicorn(tmp_path, args=("--env", "UVWORKER_ROOT_PATH=/v2")) as server:
        assert server.info()["root_path"] == "/v2"


def test_metrics_bind_in_the_environment_is_ignored_with_a_warning(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with run_gunicorn(tmp_path, env={"UVWORKER_METRICS_BIND": f"127.0.0.1:{port}"}) as server:
        assert server.get().status_code == 200
        assert ("uvworker: UVWORKER_METRICS_BIND is ignored: the metrics listener is the standalone "
                "server's (uvworker --metrics-bind); under Gunicorn use its statsd_host.") in server.log
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_invalid_uvworker_setting_stops_gunicorn_with_one_line(tmp_path: Path) -> None:
    with run_gunicorn(tmp_path, env={"UVWORKER_LIFESPAN": "sometimes"}, wait=False) as server:
        assert server.wait_exit() != 0
        assert "Error: uvworker: UVWORKER_LIFESPAN: 'sometimes' is not one of auto, on, off" in server.log
        assert "Traceback" not in server.log


def test_an_unsupported_gunicorn_setting_stops_gunicorn_with_one_line(tmp_path: Path) -> None:
    with run_gunicorn(tmp_path, conf="permit_obsolete_folding = True\n", wait=False) as server:
        assert server.wait_exit() != 0
        assert ("Error: uvworker: Gunicorn setting permit_obsolete_folding=True is not supported by uvworker: "
                "uvworker's HTTP/1.1 parsers have no such leniency.") in server.log
        assert "Traceback" not in server.log


def test_lifespan_startup_failure_stops_gunicorn(tmp_path: Path) -> None:
    with run_gunicorn(tmp_path, env={"FAIL_STARTUP": "1"}, wait=False) as server:
        assert server.wait_exit() == 3  # Gunicorn's "Worker failed to boot."
        assert "no database" in server.log
