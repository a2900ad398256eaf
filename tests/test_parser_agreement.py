"""Parser agreement without sockets: httptools and h11 adapters, fed the same bytes whole and in
random pieces, must read the same requests (scope and body) and refuse with the same status.

The corpus (``agreement_corpus.py``) also pins each case's outcome to the agreement table; the
mutation fuzzer feeds thousands of mutated corpus requests per run, bounded in time. Its seed
is printed with any failure; ``UVWORKER_FUZZ_SEED=<seed>`` runs that seed again.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest

from tests.agreement import LIMITS, random_cuts, verdict
from uvworker.core import parsers
from uvworker.core.parsers import Limits
from tests.agreement_corpus import CORPUS

PARSERS = ("httptools", "h11")


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_outcome(name: str) -> None:
    raw, expected = CORPUS[name]
    for parser in PARSERS:
        assert verdict(parser, raw).outcome == expected, parser


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_same_reading_whole_and_in_pieces(name: str) -> None:
    raw, _ = CORPUS[name]
    reference = verdict("httptools", raw)
    rng = random.Random(name)
    for parser in PARSERS:
        assert verdict(parser, raw) == reference, parser
        for _ in range(6):
            cuts = random_cuts(rng, len(raw))
            assert verdict(parser, raw, cuts, lazy=rng) == reference, (parser, cuts)


def _h11_reading(read: object, raw: bytes) -> object:
    """The request h11 reads, or None: refused or incomplete, our reading decides either way."""
    try:
        return read(raw)  # type: ignore[operator]
    except parsers.h11.ProtocolError:
        return None


@pytest.mark.parametrize("name", list(CORPUS))
def test_h11_reader_reads_as_a_connection_does(name: str) -> None:
    """The h11 adapter calls h11's head reader on a buffer of its own instead of making a
    Connection per request: the same request (or refusal) for every corpus case, its prefixes
    and mutations (public Connection API as the reference)."""
    assert parsers._h11_request is not parsers._h11_request_public  # the installed h11 has the reader
    raw, _ = CORPUS[name]
    rng = random.Random(name)
    for data in [raw, raw[: len(raw) // 2], *(mutate(rng, raw) for _ in range(20))]:
        if data:
            assert _h11_reading(parsers._h11_request, data) == _h11_reading(parsers._h11_request_public, data), data


def fields_of(data: bytes) -> bytes:
    """A read that asks for the parser's last reading of ``data``'s field block: the same
    fields after another request line (b"" if ``data`` has no whole head)."""
    line, end = data.find(b"\r\n"), data.find(b"\r\n\r\n")
    return b"GET /warm HTTP/1.1\r\n" + data[line + 2 : end + 4] if 0 <= line <= end else b""


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_after_the_same_fields(name: str) -> None:
    """A head whose field block the parser read last (a bodiless request before it on the
    connection) is read without the parser: the same reading or refusal as a fresh adapter's,
    for every corpus case and 20 mutations of it, whole and in pieces."""
    raw, _ = CORPUS[name]
    rng = random.Random(name)
    for data in [raw, *(mutate(rng, raw) for _ in range(20))]:
        warm = fields_of(data)
        for parser in PARSERS:
            got = verdict(parser, data, warm=warm)
            if got is not None:
                assert got == verdict(parser, data), (parser, data)
                cuts = random_cuts(rng, len(data))
                assert verdict(parser, data, cuts, lazy=rng, warm=warm) == verdict(parser, data, cuts), (parser, data, cuts)


REPEATED = b"Host: a\r\nAccept:  */* \r\n\r\n"


@pytest.mark.parametrize("line", [
    b"GET /2 HTTP/1.1\r\n", b"GET /2 HTTP/1.0\r\n", b"GET /2 HTTP/1.2\r\n", b"GET /2 HTTP/2.0\r\n",
    b"GET /2 HTTP/1.1XY", b"GET /2 HTTP/1.1\n", b"GET /2 HTTP/1.1\r", b"\r\nGET /2 HTTP/1.1\r\n",
    b"GET /2  HTTP/1.1\r\n", b"GET /2 HTTP/1.1 \r\n", b"get /2 HTTP/1.1\r\n", b"PROPFOO /2 HTTP/1.1\r\n",
    b"CONNECT a:80 HTTP/1.1\r\n", b"GET http://b/2 HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1\r\n", b"GET * HTTP/1.1\r\n",
    b"GET /\x7f HTTP/1.1\r\n", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", b"GET / HTTP/1.1\r\n" + REPEATED + b"GET /2 HTTP/1.1\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\n", b"GET /2 HTTP/1.1\r\nX: y\r\n",
])
def test_near_repeats(line: bytes) -> None:
    """Reads that end with the field block the parser read last but are not one request line
    and those fields: the same reading or refusal as a fresh adapter's."""
    for parser in PARSERS:
        assert verdict(parser, line + REPEATED, warm=b"GET /1 HTTP/1.1\r\n" + REPEATED) == verdict(parser, line + REPEATED), parser


def _warm_adapter(parser: str, sink: Any) -> Any:
    """An adapter that has read two heads with the REPEATED fields: it keeps them (an adapter
    keeps the fields from its second head on)."""
    adapter = parsers.make_parser(parser, sink, LIMITS)
    for target in (b"/0", b"/1"):
        adapter.feed(b"GET " + target + b" HTTP/1.1\r\n" + REPEATED)
        adapter.next_cycle()
    return adapter


@pytest.mark.parametrize("tail", [b"x", b"\n", b"\r\n", b"GET /3 HTTP/1.1\r\n", b"GET /3 HTTP/1.1\r\n" + REPEATED])
def test_repeat_with_bytes_behind_it(tail: bytes) -> None:
    """A read that is a repeated head with bytes behind it (a body byte, a stray line end, the
    next request, whole or not): not the repeat path's (its rest after the request line is not
    the kept block), the same reading or refusal as a fresh adapter's."""
    warm = b"GET /1 HTTP/1.1\r\n" + REPEATED
    for parser in PARSERS:
        data = b"GET /2 HTTP/1.1\r\n" + REPEATED + tail
        assert verdict(parser, data, warm=warm) == verdict(parser, data), parser


def test_empty_read_after_kept_fields() -> None:
    """An empty read (none comes from a transport, but the adapter takes one) once a field
    block is kept: no request and no error, and the next head is read."""
    seen: list[Any] = []

    class Sink:
        def on_head(self, method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]], complete: bool) -> None:
            seen.append((target, complete))

        def on_fields_kept(self, headers: list[tuple[bytes, bytes]]) -> None:
            pass

        def on_end(self) -> None:
            pass

    for parser in PARSERS:
        seen.clear()
        adapter = _warm_adapter(parser, Sink())
        adapter.feed(b"")
        assert len(seen) == 2 and not adapter.held, parser
        adapter.feed(b"GET /2 HTTP/1.1\r\n" + REPEATED)
        assert seen[-1][0] == b"/2", parser


def test_repeated_fields_skip_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same field block again after another request line: the parser is not called, each
    request gets a list of its own (a sink that changes one does not change the next), and
    each comes whole: one on_head that says complete, no on_end (the parser's: head, then end)."""
    seen: list[Any] = []

    class Sink:
        def on_head(self, method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]], complete: bool) -> None:
            seen.append((target, list(headers), complete))
            headers.append((b"x-added", b"1"))

        def on_fields_kept(self, headers: list[tuple[bytes, bytes]]) -> None:
            pass

        def on_end(self) -> None:
            seen.append("end")

    fields = REPEATED
    for parser in PARSERS:
        seen.clear()
        adapter = _warm_adapter(parser, Sink())
        monkeypatch.setattr(parsers, "_h11_request", None)  # h11 is not called
        if parser == "httptools":
            monkeypatch.setattr(adapter, "parser", None)  # nor llhttp
        for target in (b"/2", b"/3?q", b"/1"):
            adapter.feed(b"GET " + target + b" HTTP/1.1\r\n" + fields)
            adapter.next_cycle()
        monkeypatch.undo()
        fields_read = [(b"host", b"a"), (b"accept", b"*/*")]
        parsed = [item for t in (b"/0", b"/1") for item in ((t, fields_read, False), "end")]
        assert seen == parsed + [(t, fields_read, True) for t in (b"/2", b"/3?q", b"/1")], parser


def test_request_lines_kept_bounded() -> None:
    """check_request_line keeps the answers for lines it read (a bounded number), never a refusal."""
    from uvworker.core import request

    for n in range(3000):
        assert request.check_request_line(b"GET /%d HTTP/1.1" % n) == (b"GET", b"/%d" % n, "1.1")
        assert len(request._read_lines) <= 1024
    for _ in range(2):
        with pytest.raises(parsers.HTTPError):
            request.check_request_line(b"GET /  HTTP/1.1")
    assert b"GET /  HTTP/1.1" not in request._read_lines


# -- the mutation fuzzer ------------------------------------------------------------------------------
SEEDS = [raw for raw, _ in CORPUS.values() if raw]
# Pieces that sit on the table's boundaries: line ends, separators, framing words, edge bytes.
PIECES = [
    b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b";", b"=", b",", b'"', b"\\", b"#", b"?", b"*", b"/", b"%",
    b"\x00", b"\x01", b"\x0b", b"\x7f", b"\x80", b"\xff", b"0", b"5", b"a", b"F", b"00000000",
    b"chunked", b"Chunked", b"gzip, ", b"identity", b"HTTP/1.1", b"HTTP/2.0", b"HTTP/1.0", b"RTSP/1.0",
    b"\r\n\r\n", b"0\r\n\r\n", b"5\r\nhello\r\n", b"Host: example.com\r\n", b"Host: evil\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"Content-Length: 0\r\n",
    b"Content-Type: a\r\n", b"Connection: upgrade\r\nUpgrade: x\r\n", b"Expect: 100-continue\r\n",
    b" chunked\r\n", b"X: \x01\r\n", b"http://example.com", b"GET ", b"POST ", b"CONNECT ", b"OPTIONS * ",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        at = rng.randrange(len(out) + 1)
        if op < 0.2 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op < 0.5:
            out[at:at] = rng.choice(PIECES)
        elif op < 0.7 and out:
            del out[at : at + rng.choice((1, 1, 2, 4, 16))]
        elif op < 0.85:
            start = rng.randrange(len(out) + 1)
            out[at:at] = out[start : start + rng.randint(1, 40)]
        else:
            other = rng.choice(SEEDS)
            start = rng.randrange(len(other))
            out[at:] = other[start:]
    return bytes(out)


def test_mutated_requests_read_the_same_by_both_parsers() -> None:
    seed = int(os.environ.get("UVWORKER_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    deadline = time.monotonic() + float(os.environ.get("UVWORKER_FUZZ_SECONDS", "6"))
    count = 0
    while count < 3000 or (time.monotonic() < deadline and count < 200_000):
        data = mutate(rng, rng.choice(SEEDS))
        if rng.random() < 0.2:
            data += mutate(rng, rng.choice(SEEDS))
        # Now and then small limits, so that mutations cross their boundaries.
        limits = LIMITS if rng.random() < 0.7 else Limits(rng.randint(14, 60), rng.randint(1, 4), rng.randint(6, 40))
        reference = verdict("httptools", data, limits=limits)
        warm = fields_of(data)  # and after a request with the same fields, read without the parser
        for parser in PARSERS:
            cuts = random_cuts(rng, len(data))
            repeated = verdict(parser, data, limits=limits, warm=warm)
            for got in (verdict(parser, data, limits=limits), verdict(parser, data, cuts, limits, lazy=rng), repeated or reference):
                assert got == reference, (
                    f"UVWORKER_FUZZ_SEED={seed}: {parser} read {data!r} (cut at {cuts}) differently:\n"
                    f"  {got}\n  httptools whole: {reference}"
                )
        count += 1
        if count >= 3000 and time.monotonic() > deadline:
            break
    print(f"{count} mutated requests, seed {seed}")
