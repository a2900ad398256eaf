"""Gunicorn's request limits mean under our workers what they mean in Gunicorn (issue 11 item 6).

Differential: for each set of ``limit_request_line`` / ``limit_request_fields`` /
``limit_request_field_size`` values, the same raw requests go to Gunicorn's own sync worker
(Gunicorn's parser) and to ``uvworker.Worker`` (httptools) and ``uvworker.H11Worker`` (h11),
each a real gunicorn with that configuration; every request must get the same status from
all three. The requests sit on each limit's boundary (one byte or field under it, at it, one
over it), as Gunicorn counts: the request line without its CRLF, a field line *with* its
CRLF, the field count with Host; the same in a chunked body's trailer (counted apart from
the head's fields); heads larger than uvworker's standalone 128 KiB bound that Gunicorn's
limits allow; and Gunicorn's special values (0, values above its caps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.http_client import Closed, Conn
from tests.test_gunicorn import WORKERS, Gunicorn, run_gunicorn

WSGI_APP = '''
def app(environ, start_response):
    environ["wsgi.input"].read()  # (a chunked body's trailer is read, and checked, with it)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
'''

# Gunicorn's settings -> the limits its parser then applies (gunicorn/http/message.py):
# line 0 is unlimited, above 8190 it is 8190; fields 0 or above 32768 are 32768; field size 0
# is 8190 (its docs say unlimited; its parser says 8190).
SCENARIOS = {
    "defaults": ({}, (4094, 100, 8190)),
    "small": ({"limit_request_line": 200, "limit_request_fields": 5, "limit_request_field_size": 100},
              (200, 5, 100)),
    "zero": ({"limit_request_line": 0, "limit_request_fields": 0, "limit_request_field_size": 0},
             (0, 32768, 8190)),
    "over_caps": ({"limit_request_line": 10000, "limit_request_fields": 40000, "limit_request_field_size": 20000},
                  (8190, 32768, 20000)),
}


def request(line_length: int = 0, fields: list[bytes] | None = None) -> bytes:
    """A GET whose request line is ``line_length`` bytes (without CRLF; 0: short), with Host
    and then ``fields`` (whole field lines, CRLF included)."""
    line = b"GET / HTTP/1.1"
    if line_length:
        line = b"GET /" + b"a" * (line_length - len(line)) + b" HTTP/1.1"
        assert len(line) == line_length
    return line + b"\r\n" + b"Host: t\r\n" + b"".join(fields or []) + b"\r\n"


def chunked(trailer: list[bytes]) -> bytes:
    """A chunked POST with these trailer field lines (CRLF included)."""
    start = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
    return start + b"".join(trailer) + b"\r\n"


def field(size: int, name: bytes = b"X-A", pad: bytes = b"") -> bytes:
    """A field line of ``size`` bytes as sent, CRLF included; ``pad`` is whitespace kept around
    the value (it counts too)."""
    head = name + b":" + pad
    line = head + b"v" * (size - len(head) - len(pad) - 2) + pad + b"\r\n"
    assert len(line) == size
    return line


def boundary_requests(line: int, count: int, size: int) -> dict[str, bytes]:
    """Requests on each boundary of Gunicorn's effective limits."""
    cases: dict[str, bytes] = {"plain": request()}
    for delta in (-1, 0, 1):
        if line:
            cases[f"line {line + delta}"] = request(line + delta)
        cases[f"field {size + delta}"] = request(fields=[field(size + delta)])
        cases[f"field {size + delta}, spaces"] = request(fields=[field(size + delta, pad=b" \t ")])
        if count <= 100:  # (the count cap, 32768, is checked on the mapping: see test_gunicorn)
            others = count + delta - 1  # Host is a field too
            cases[f"{count + delta} fields"] = request(fields=[b"X-%d: 1\r\n" % i for i in range(others)])
            cases[f"{count + delta} trailer fields"] = chunked([b"X-%d: 1\r\n" % i for i in range(count + delta)])
        cases[f"trailer field {size + delta}"] = chunked([field(size + delta)])
    if not line:  # "unlimited": far beyond the cap that applies otherwise
        cases["line 20000"] = request(20000)
    # Heads over 128 KiB that Gunicorn's limits allow: many fields at the field size.
    big = min(count - 1, 160_000 // size + 1)
    if big * size > 128 * 1024:
        cases[f"{big} fields of {size}"] = request(fields=[field(size, b"X-%d" % i) for i in range(big)])
    return cases


def status(server: Gunicorn, raw: bytes) -> int | str:
    """The status a fresh connection gets for ``raw``, or "closed" when it gets none."""
    with Conn.open("127.0.0.1", server.port) as conn:
        conn.send(raw)
        try:
            return conn.read_head(timeout=10).status
        except Closed:
            return "closed"


@contextlib.contextmanager
def three_gunicorns(tmp_path: Path, conf: str) -> Iterator[dict[str, Gunicorn]]:
    """Gunicorn's sync worker and our two workers, all configured by ``conf``, started at once."""
    with contextlib.ExitStack() as stack:
        servers = {}
        for worker in ["sync", *WORKERS]:
            directory = tmp_path / worker
            directory.mkdir()
            servers[worker] = stack.enter_context(
                run_gunicorn(directory, worker, conf, app=WSGI_APP, wait=False)
            )
        for worker, server in servers.items():
            if worker == "sync":  # (our workers log "Listening on", which wait_ready looks for)
                wait_for(lambda: "Booting worker" in server.log, timeout=20)
            else:
                server.wait_ready(timeout=20)
        yield servers


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_limits_accept_and_refuse_what_gunicorn_does(tmp_path: Path, scenario: str) -> None:
    settings, effective = SCENARIOS[scenario]
    conf = "".join(f"{name} = {value}\n" for name, value in settings.items())
    cases = boundary_requests(*effective)
    with three_gunicorns(tmp_path, conf) as servers:
        answers = {name: {worker: status(server, raw) for worker, server in servers.items()}
                   for name, raw in cases.items()}
    differ = {name: got for name, got in answers.items() if len(set(got.values())) > 1}
    assert not differ, differ
    # The boundaries are real: each limit lets its own value through and refuses one more.
    line, count, size = effective
    assert answers[f"field {size}"]["sync"] == 200 and answers[f"field {size + 1}"]["sync"] == 431
    if line:
        assert answers[f"line {line}"]["sync"] == 200 and answers[f"line {line + 1}"]["sync"] == 414
    assert answers[f"trailer field {size}"]["sync"] == 200 and answers[f"trailer field {size + 1}"]["sync"] == 431
    if count <= 100:
        for fields in ("fields", "trailer fields"):
            assert answers[f"{count} {fields}"]["sync"] == 200 and answers[f"{count + 1} {fields}"]["sync"] == 431
