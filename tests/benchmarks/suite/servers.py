"""The servers under test: how each is started, pinned, found ready, measured and stopped.

Every server is a subprocess started as ``taskset -c CPU python -m ...`` on a free loopback port
(found by binding port 0), with one worker, no access log, uvloop and the parser named in its
spec. uvworker and uvicorn get the same options where both have them (keep-alive timeout,
lifespan off, log level); uvicorn runs WebSockets on the same ``websockets`` sans-I/O engine
uvworker uses. granian (HTTP in Rust on its own runtime; the ASGI app on uvloop, a WSGI app on
WSGI_THREADS blocking threads) is measured on the hello-world rows, and so is the ceiling
(``ceiling.py``: a bare uvloop protocol that answers without parsing). For Gunicorn and granian
the app runs in one worker process, a child of the master: CPU time and RSS are read from that
child (hypercorn's: a multiprocessing child).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from tests.benchmarks.ws_echo import cpu_seconds
from tests.benchmarks.wsgi_upload import status_kib

ROOT = Path(__file__).resolve().parents[3]
ASGI_APP = "tests.benchmarks.suite.apps:app"
CEILING = "tests.benchmarks.suite.ceiling"
WSGI_APP = "tests.benchmarks.wsgi_hello:app"
WSGI_THREADS = 10  # uvworker's default --wsgi-threads; Gunicorn gthread gets the same
KEEP_ALIVE = "60"  # seconds: longer than any idle hold in the suite
START_TIMEOUT = 30.0
HELLO_ROWS = frozenset({"hello-64-httptools", "hello-1024-httptools", "wsgi-hello"})


@dataclass(frozen=True)
class ServerSpec:
    name: str  # as shown in the table: "uvworker", "uvicorn", "gunicorn gthread", ...
    argv: tuple[str, ...]  # after ``python``; "{port}" is replaced by the port
    tree: Path = ROOT  # where ``uvworker`` is imported from (another commit: see uvworker_tree)
    rows: frozenset[str] | None = None  # the row ids it is measured on; None: all of its group's

    def __str__(self) -> str:
        return self.name


@contextlib.contextmanager
def uvworker_tree(commit: str | None) -> Iterator[Path]:
    """The uvworker (and supervisor) packages as of ``commit`` (``git archive`` into a temporary directory), so
    that two versions can be measured in one run; without a commit, this work tree."""
    if not commit:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="uvworker-") as tmp:
        archive = subprocess.run(["git", "archive", commit, "uvworker", "supervisor"], cwd=ROOT,
                                 capture_output=True, check=False)
        if archive.returncode != 0:
            raise SystemExit(f"Cannot read uvworker at {commit}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield Path(tmp)


def granian(interface: str, app: str, *options: str) -> ServerSpec:
    return ServerSpec(f"granian {interface}", (
        "-m", "granian", "--interface", interface, "--host", "127.0.0.1", "--port", "{port}", "--workers", "1",
        "--backlog", "2048", "--log-level", "warning", "--no-access-log", *options, app), rows=HELLO_ROWS)


def asgi_server(name: str, parser: str, tree: Path = ROOT) -> ServerSpec:
    """uvworker or uvicorn serving ``apps.app`` with ``parser`` on uvloop; granian's ASGI server (on
    uvloop too; its HTTP parser is its own) or the ceiling on the hello-world rows."""
    common = ("--host", "127.0.0.1", "--port", "{port}", "--http", parser, "--loop", "uvloop",
              "--lifespan", "off", "--no-access-log", "--log-level", "warning",
              "--timeout-keep-alive", KEEP_ALIVE)
    if name == "uvworker":
        return ServerSpec("uvworker", ("-m", "uvworker", ASGI_APP, *common), tree)
    if name == "uvicorn":
        return ServerSpec("uvicorn", ("-m", "uvicorn", ASGI_APP, *common, "--ws", "websockets-sansio"))
    if name == "granian":
        return granian("asgi", ASGI_APP, "--loop", "uvloop")
    if name == "ceiling":
        return ServerSpec("ceiling (bare uvloop)", ("-m", CEILING, "--port", "{port}"), rows=HELLO_ROWS)
    raise ValueError(f"Unknown ASGI server {name!r}.")


def h2_server(name: str, tree: Path = ROOT) -> ServerSpec:
    """uvworker or hypercorn (which runs on the same h2 package) serving ``apps.app`` over h2c
    (prior knowledge), on uvloop."""
    if name == "uvworker":
        return asgi_server("uvworker", "httptools", tree)
    if name == "hypercorn":
        return ServerSpec("hypercorn", (
            "-m", "hypercorn", ASGI_APP, "--bind", "127.0.0.1:{port}", "--workers", "1", "--worker-class", "uvloop",
            "--keep-alive", KEEP_ALIVE, "--config", "python:tests.benchmarks.suite.hypercorn_conf",
            "--log-level", "warning"))
    raise ValueError(f"Unknown HTTP/2 server {name!r}.")


def wsgi_server(name: str, tree: Path = ROOT) -> ServerSpec:
    """A server running ``wsgi_hello.app`` with WSGI_THREADS threads where threads apply."""
    common = ("--host", "127.0.0.1", "--port", "{port}", "--http", "httptools", "--loop", "uvloop",
              "--no-access-log", "--log-level", "warning", "--timeout-keep-alive", KEEP_ALIVE)
    if name == "uvworker":
        return ServerSpec("uvworker", ("-m", "uvworker", WSGI_APP, "--interface", "wsgi",
                                       "--wsgi-threads", str(WSGI_THREADS), "--lifespan", "off", *common), tree)
    if name == "uvicorn":
        return ServerSpec("uvicorn --interface wsgi", ("-m", "uvicorn", WSGI_APP, "--interface", "wsgi", *common))
    if name == "gunicorn":
        return ServerSpec("gunicorn gthread", (
            "-m", "gunicorn", "-k", "gthread", "--threads", str(WSGI_THREADS), "--workers", "1",
            "--bind", "127.0.0.1:{port}", "--keep-alive", KEEP_ALIVE, "--log-level", "warning", WSGI_APP))
    if name == "granian":
        return granian("wsgi", WSGI_APP, "--blocking-threads", str(WSGI_THREADS))
    raise ValueError(f"Unknown WSGI server {name!r}.")


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinning(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


class RunningServer:
    """A started server. ``pid`` is the process that runs the app; ``address`` its socket."""

    def __init__(self, spec: ServerSpec, cpu: int | None) -> None:
        self.spec = spec
        self.name = spec.name
        port = free_port()
        self.address = ("127.0.0.1", port)
        self.url = f"http://127.0.0.1:{port}"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - the server's output, closed by stop()
        argv = [arg.replace("{port}", str(port)) for arg in spec.argv]
        # ``python -m`` puts the working directory first on sys.path: uvworker comes from the
        # spec's tree, the benchmark apps (tests.benchmarks...) from this checkout.
        path = os.pathsep.join(dict.fromkeys([str(spec.tree), str(ROOT)]))
        self.proc = subprocess.Popen([*pinning(cpu), sys.executable, *argv], cwd=spec.tree,
                                     env={**os.environ, "PYTHONPATH": path},
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.pid = self._app_pid()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as response:
                    response.read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} did not answer within {START_TIMEOUT:g} s: {self.output()}"
                    ) from None
                time.sleep(0.05)

    def _app_pid(self) -> int:
        """The server process itself, or its one worker (Gunicorn's master forks it)."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            children = []
        # multiprocessing (hypercorn's workers) may add a resource tracker child: not the app.
        workers = [pid for pid in children if b"resource_tracker" not in _cmdline(pid)]
        return int(workers[0]) if workers else self.proc.pid

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace").strip()[-2000:]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return status_kib(self.pid, "VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

