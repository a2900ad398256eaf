"""Drive a parser adapter with bytes, as the connection does, and write down what it decided.

``verdict(parser, data, cuts)`` feeds ``data`` to ``make_parser(parser, sink, limits)`` in the
pieces ``cuts`` gives (whole by default), runs each head through ``check_head`` and
``build_scope`` like the connection's sink, calls ``next_cycle`` once a request is complete
(as the connection does after its response), and returns a ``Verdict``: the requests read —
their scope fields and body — and how the input ended: refused with a status, waiting for more
(inside a request), or idle between requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from uvworker.core.parsers import Limits, make_parser
from uvworker.core.request import build_scope, check_head
from uvworker.errors import HTTPError

LIMITS = Limits(8190, 100, 8190)


@dataclass
class Request:
    method: str
    path: str
    raw_path: bytes
    query: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    body: bytes = b""
    complete: bool = False


@dataclass
class Verdict:
    requests: list[Request] = field(default_factory=list)
    status: int | None = None  # the refusal, if the input was refused
    waiting: bool = False  # the input ended inside a request's body

    @property
    def outcome(self) -> tuple[Any, ...]:
        """What a client sees: each request's completeness, then the refusal or the wait."""
        return (*("ok" if r.complete else "partial" for r in self.requests), self.status or ("waiting" if self.waiting else "idle"))


class _Sink:
    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict

    def on_head(
        self, method: bytes, target: bytes, http_version: str, headers: list[tuple[bytes, bytes]], complete: bool,
    ) -> None:
        assert http_version in ("1.0", "1.1"), http_version
        assert all(type(n) is bytes and type(v) is bytes for n, v in headers), headers
        keep_alive = check_head(http_version, headers)[0]
        scope = build_scope(method, target, http_version, headers, server=None, client=None, scheme="http", root_path="", state={})
        self.verdict.requests.append(Request(
            scope["method"], scope["path"], scope["raw_path"], scope["query_string"], http_version, headers, keep_alive,
        ))
        if complete:  # a bodiless head read whole: the request ends with it (no on_end follows)
            self.on_end()

    def on_fields_kept(self, headers: list[tuple[bytes, bytes]]) -> None:
        pass

    def on_body(self, data: bytes) -> None:
        assert type(data) is bytes and data, data
        request = self.verdict.requests[-1]
        assert not request.complete
        request.body += data

    def on_end(self) -> None:
        request = self.verdict.requests[-1]
        assert not request.complete
        request.complete = True


def verdict(
    parser: str, data: bytes, cuts: list[int] | None = None, limits: Limits = LIMITS, lazy: random.Random | None = None,
    warm: bytes = b"",
) -> Verdict | None:
    """Feed ``data`` cut at the offsets ``cuts``; ``lazy`` sometimes delays ``next_cycle`` until
    after the next read (the connection stops reading then, but a read may already be in).
    ``warm``: a read the adapter takes first, twice, as a connection's previous requests (not
    in the verdict; twice: an adapter keeps the fields it read from its second head on); None
    if it is not one whole request."""
    result = Verdict()
    adapter = make_parser(parser, _Sink(result), limits)
    for _ in range(2 if warm else 0):
        try:
            adapter.feed(warm)
        except HTTPError:
            return None
        if not adapter.held or adapter.holding_input:
            return None
        adapter.next_cycle()
        result.requests.clear()
    bounds = [0, *sorted(set(cuts or ())), len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    try:
        for piece in pieces:
            adapter.feed(piece)
            if lazy is not None and adapter.held and lazy.random() < 0.3:
                continue
            while adapter.held:
                adapter.next_cycle()
        while adapter.held:
            adapter.next_cycle()
    except HTTPError as exc:
        result.status = exc.status
        return result
    result.waiting = bool(result.requests and not result.requests[-1].complete)
    return result


def random_cuts(rng: random.Random, size: int) -> list[int]:
    """Cut points: none, one, a few, or every byte (a client that trickles)."""
    roll = rng.random()
    if size < 2 or roll < 0.1:
        return []
    if roll < 0.15:
        return list(range(1, size))
    return [rng.randrange(1, size) for _ in range(rng.choice((1, 1, 2, 3, 5, 12)))]
