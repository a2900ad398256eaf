"""Workers switched to another user need to read only the app (issue 11 item 7).

The process that forks the workers imports everything they may need (uvworker.warm_imports),
so that a worker running as ``nobody`` never imports from an installation it cannot read.

Setup, for real ``gunicorn -k uvworker.Worker`` and real ``uvworker --workers 2``:

* ``private_install``: copies of uvworker, supervisor and the packages a worker uses
  (gunicorn, h11, httptools, uvloop, websockets, ...) in a mode-0700 directory owned by root,
  which ``nobody`` cannot even list.
* The interpreter runs with ``-S``: no site-packages, so neither the test venv's nor the
  system's uvworker can stand in; ``PYTHONPATH`` is the private copy, then the app's
  world-writable directory.
* A launcher (``LAUNCHER``) wraps ``os.setuid`` to record ``sys.modules`` at the moment a
  worker switches user (as a non-root run has no switch: at the fork). The app reports every
  module imported since that it did not import itself, at its lifespan shutdown (ASGI) or on
  request (WSGI, one worker): after a run that served HTTP, a WebSocket, WSGI, proxy headers,
  the PROXY protocol, TLS, bad requests, an app error and the access log, that list must be
  empty. So a new lazy import anywhere on those paths — ours, the stdlib's, a package's —
  fails here even on a machine where everything is readable.

Without root, the servers run as the current user (no switch) and the import check still
applies; the ``nobody`` part is skipped.
"""

from __future__ import annotations

import ast
import contextlib
import grp
import importlib.metadata
import os
import pwd
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0
# What a worker may import, besides uvworker and supervisor (dependencies included).
PACKAGES = ("gunicorn", "packaging", "h11", "httptools", "uvloop", "websockets", "setproctitle", "python-dotenv")

LAUNCHER = '''
import os, runpy, sys

def snapshot(name):
    setattr(sys, name, set(sys.modules))

os.register_at_fork(after_in_child=lambda: snapshot("modules_at_fork"))
_setuid = os.setuid

def setuid(uid):  # from here on the worker reads only what its user may read
    snapshot("modules_at_switch")
    _setuid(uid)

os.setuid = setuid
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''

# Imports only what a server has surely loaded: the stdlib may be unreadable too (a pyenv
# Python under /root), and the point is what the *server* imports late.
COMMON = '''
import os, sys


def late_imports():
    before = getattr(sys, "modules_at_switch", None) or sys.modules_at_fork
    return sorted(set(sys.modules) - before - {__name__})


def report():
    try:
        with open(os.environ["PRIVATE_FILE"], "rb"):
            readable = "readable"
    except OSError as err:
        readable = type(err).__name__
    return f"late {os.getpid()} {os.getuid()} {readable} {' '.join(late_imports())}".rstrip()
'''

ASGI_APP = COMMON + '''

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                with open(os.environ["EVENTS"], "a") as events:
                    events.write(report() + "\\n")
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")})
    if scope["path"] == "/error":
        raise RuntimeError("a planned failure")
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    text = f"{os.getpid()} {os.getuid()} {scope['client'][0]} {scope['scheme']} {len(body)}\\n".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/stream":
        for _ in range(3):
            await send({"type": "http.response.body", "body": text, "more_body": True})
    await send({"type": "http.response.body", "body": text})
'''

WSGI_APP = COMMON + '''

def app(environ, start_response):
    if environ["PATH_INFO"] == "/error":
        raise RuntimeError("a planned failure")
    if environ["PATH_INFO"] == "/late":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [report().encode()]
    body = environ["wsgi.input"].read()
    text = f"{os.getpid()} {os.getuid()} {environ['REMOTE_ADDR']} {environ['wsgi.url_scheme']} {len(body)}\\n"
    start_response("200 OK", [("Content-Type", "text/plain")])
    if environ["PATH_INFO"] == "/stream":
        return iter([text.encode()] * 4)
    return [text.encode()]
'''


def private_install(root: Path) -> Path:
    """Copies of uvworker, supervisor and PACKAGES under ``root``; the directory to import from."""
    site = root / "site"
    for package in ("uvworker", "supervisor"):
        shutil.copytree(REPO / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in PACKAGES:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in dist.files or ():
            source = Path(str(dist.locate_file(file)))
            if file.parts[0] == ".." or "__pycache__" in file.parts or not source.is_file():
                continue  # scripts outside site-packages, bytecode
            (site / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, site / file)
    return site


@pytest.fixture(scope="module")
def private_site() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="uvworker-private-"))  # mode 0700, owned by us
    try:
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        yield private_install(root)
    finally:
        shutil.rmtree(root)


@pytest.fixture
def app_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="uvworker-app-"))  # pytest's tmp dirs are 0700
    try:
        directory.chmod(0o777)  # the worker imports the app and writes events as nobody
        yield directory
    finally:
        shutil.rmtree(directory)


class Running:
    def __init__(self, proc: subprocess.Popen[bytes], directory: Path, port: int, tls: bool) -> None:
        self.proc, self.dir, self.port, self.tls = proc, directory, port, tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    @property
    def log(self) -> str:
        return (self.dir / "server.log").read_text(errors="replace")

    def events(self) -> list[str]:
        path = self.dir / "events"
        return path.read_text().splitlines() if path.exists() else []

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session this test started
            self.proc.wait(5)
            raise AssertionError(f"the server did not stop within 20 s:\n{self.log}") from None


@contextlib.contextmanager
def serve(shape: str, site: Path, directory: Path, app: str, workers: int, tls: bool,
          worker_class: str = "uvworker.Worker") -> Iterator[Running]:
    """gunicorn or uvworker (``shape``) from ``site`` with ``python -S``, as nobody when root."""
    (directory / "app.py").write_text(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    user = pwd.getpwnam("nobody") if ROOT else None
    group = grp.getgrgid(user.pw_gid).gr_name if user else None
    tls_files: tuple[str, str] | None = None
    if tls:
        from tests.test_tls import make_cert

        certfile, keyfile = make_cert(directory)
        tls_files = (str(certfile), str(keyfile))
    if shape == "gunicorn":
        conf = textwrap.dedent(f"""
            control_socket_disable = True
            workers = {workers}
            graceful_timeout = 10
            accesslog = "-"
            proxy_protocol = "auto"
            proxy_allow_ips = "127.0.0.1"
            """)
        if user:
            conf += f"user = {user.pw_name!r}\ngroup = {group!r}\n"
        if tls_files:
            conf += f"certfile = {tls_files[0]!r}\nkeyfile = {tls_files[1]!r}\n"
        (directory / "gunicorn.conf.py").write_text(conf)
        args = ["gunicorn", "-c", "gunicorn.conf.py", "-k", worker_class, "-b", f"fd://{sock.fileno()}", "app:app"]
    else:
        (directory / "app.env").write_text("APP_GREETING=hello\n")  # loaded again in each worker
        args = ["uvworker", "app:app", "--fd", str(sock.fileno()), "--workers", str(workers),
                "--access-log", "--proxy-protocol", "--proxy-allow-ips", "127.0.0.1", "--env-file", "app.env"]
        if user:
            args += ["--user", user.pw_name, "--group", str(group)]
        if tls_files:
            args += ["--ssl-certfile", tls_files[0], "--ssl-keyfile", tls_files[1]]
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env |= {
        "PYTHONPATH": os.pathsep.join([str(site), str(directory)]),
        "EVENTS": str(directory / "events"),
        "PRIVATE_FILE": str(site / "uvworker" / "__init__.py"),
    }
    with open(directory / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys._base_executable, "-S", "-c", LAUNCHER, *args], cwd=directory, env=env,
            stdout=log, stderr=subprocess.STDOUT, pass_fds=(sock.fileno(),), start_new_session=True,
        )
    sock.close()
    running = Running(proc, directory, port, tls)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}:\n{running.log}")
            return running.log.count("Listening on ") >= workers

        try:
            wait_for(ready, timeout=20)
        except AssertionError as err:
            raise AssertionError(f"{err}:\n{running.log}") from None
        yield running
    finally:
        running.stop()


def exercise(server: Running, websocket: bool) -> set[int]:
    """Every path a worker may take; returns the worker pids that answered."""
    pids = set()
    with httpx.Client(base_url=server.url, verify=False, timeout=10) as client:
        for _ in range(4):
            pids.add(int(client.get("/").text.split()[0]))
        answer = client.post("/", content=(piece for piece in [b"x" * 1000, b"y" * 70000])).text  # chunked
        assert answer.split()[4] == "71000"
        assert client.get("/stream").text.count("\n") == 4
        assert client.head("/").status_code == 200
        forwarded = client.get("/", headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}).text
        assert forwarded.split()[2:4] == ["203.0.113.9", "https"]
        assert client.get("/error").status_code == 500
        assert client.get("/", headers={"X-Big": "b" * 20000}).status_code == 431
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    for raw, expected in [(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
                          (b"PROXY TCP4 192.0.2.1 127.0.0.1 1234 80\r\n" + build_request(), 200)]:
        with Conn.open("127.0.0.1", server.port) as conn:
            if server.tls:
                conn.sock = context.wrap_socket(conn.sock)
            conn.send(raw)
            assert conn.read_response().status == expected
    if websocket:
        from websockets.sync.client import connect

        url = server.url.replace("http", "ws", 1) + "/ws"
        with connect(url, ssl=context if server.tls else None, open_timeout=10) as ws:  # permessage-deflate
            for message in ["hello", b"\x00" * 70000]:
                ws.send(message)
                assert ws.recv(timeout=10) == message
    return pids


SHAPES = [
    pytest.param("gunicorn", "uvworker.Worker", False, id="gunicorn-Worker"),
    pytest.param("gunicorn", "uvworker.H11Worker", True, id="gunicorn-H11Worker-tls"),
    pytest.param("uvworker", "", False, id="uvworker"),
    pytest.param("uvworker", "", True, id="uvworker-tls"),
]


def check_log(server: Running) -> None:
    log = server.log
    for sign in ("ModuleNotFoundError", "ImportError", "PermissionError", "crashed", "Worker failed to boot"):
        assert sign not in log, log
    assert "a planned failure" in log  # the app's error was logged, traceback and all


def check_report(line: str) -> None:
    print(line)  # late <pid> <uid> <what opening a file of the install did> <modules imported late>
    _, _, uid, readable, *late = line.split()
    if ROOT:
        assert int(uid) == pwd.getpwnam("nobody").pw_uid
        assert readable == "PermissionError"  # the worker really could not read the install
    assert late == [], f"imported after the worker switched user: {late}"


@pytest.mark.parametrize(("shape", "worker_class", "tls"), SHAPES)
def test_asgi_workers_need_to_read_only_the_app(
    private_site: Path, app_dir: Path, shape: str, worker_class: str, tls: bool
) -> None:
    with serve(shape, private_site, app_dir, ASGI_APP, 2, tls, worker_class) as server:
        try:
            pids = exercise(server, websocket=True)
        except Exception:
            print(server.log)
            raise
        assert server.stop() == 0
    check_log(server)
    reports = [line for line in server.events() if line.startswith("late ")]
    assert len(reports) == 2 and pids <= {int(line.split()[1]) for line in reports}, server.log
    for line in reports:
        check_report(line)


@pytest.mark.parametrize("shape", ["gunicorn", "uvworker"])
def test_wsgi_workers_need_to_read_only_the_app(private_site: Path, app_dir: Path, shape: str) -> None:
    with serve(shape, private_site, app_dir, WSGI_APP, 1, False) as server:
        exercise(server, websocket=False)
        report = httpx.get(server.url + "/late", timeout=10).text
        assert server.stop() == 0
    check_log(server)
    check_report(report)


# -- without processes: every import inside a function of uvworker is warmed -------------------
# What the process that forks the workers has imported by then, besides warm_imports' modules.
MASTERS = {
    "standalone": "import uvworker.prefork, supervisor.master",  # supervise() is running
    "gunicorn": "import uvworker.workers",  # the arbiter loaded the worker class
}
# Files whose code runs in one shape's workers only; cli.py and main.py run in no worker.
SHAPES_OF_FILE = {
    "uvworker/cli.py": (), "uvworker/main.py": (), "uvworker/prefork.py": ("standalone",),
    "uvworker/workers.py": ("gunicorn",), "uvworker/gunicorn_hooks.py": ("gunicorn",),
    "uvworker/gunicorn_objects.py": ("gunicorn",), "uvworker/gunicorn_settings.py": ("gunicorn",),
    "uvworker/exporter.py": (),  # the metrics listener: in the master, or in the one process
}
# Imported inside functions that only the master runs (module: why).
MASTER_ONLY = {
    "yaml": "a .yaml --log-config is read by the CLI, before any fork",
    "importlib": "imported by Python itself at startup",
    "uvworker.exporter": "--metrics-bind is served by the master, or by the one process (no fork)",
}


def lazy_imports() -> list[tuple[str, int, str]]:
    """(file, line, module) for every import inside a function of the uvworker package."""
    found = []
    for path in sorted((REPO / "uvworker").rglob("*.py")):
        name = str(path.relative_to(REPO))
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    found += [(name, node.lineno, alias.name) for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.append((name, node.lineno, node.module))
    return found


def loaded_when_forking(shape: str) -> set[str]:
    code = (
        f"import sys\n{MASTERS[shape]}\n"
        "from uvworker.config import Config\n"
        "from uvworker.warm_imports import warm_imports\n"
        # every optional path on: auto parser, loop, interface and WebSocket; an env file
        "warm_imports(Config(None, env_file='.env'))\n"
        "print('\\n'.join(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_every_import_inside_a_function_of_uvworker_is_warmed() -> None:
    loaded = {shape: loaded_when_forking(shape) for shape in MASTERS}
    lazy = lazy_imports()
    assert any(module == "uvworker.proxy" for _, _, module in lazy)  # the scan finds what it should
    missing = [
        f"{name}:{line}: {module} ({shape})"
        for name, line, module in lazy if module not in MASTER_ONLY
        for shape in SHAPES_OF_FILE.get(name, tuple(MASTERS)) if module not in loaded[shape]
    ]
    assert missing == [], "add these to uvworker/warm_imports.py (or to MASTER_ONLY, with the reason)"
