"""Python's cyclic garbage collector tuned for a server's allocation pattern.

A loop turn reads every connection that has input before any app runs: with 1024 busy
keep-alive connections, ~1024 requests' scopes, cycles and tasks are alive at once, fifteen
tracked objects each (hello world: the header tuples, scope, extensions, cycle, coroutine,
task, its context, handle and weak reference). That outruns the collector's first threshold
(700 allocations) many times per turn, so it runs generation 0 over and over, finds live
requests and promotes them, and soon runs the older generations over every object the app
and its imports made (measured, hello world at 1024 connections: 12 collections per 1000
requests, ~2.5 us of CPU per request; at 64 connections almost none). Two changes once the
app is loaded:

* ``gc.freeze()``: what exists now (modules, the app, its startup state) lives as long as
  the process; full collections stop walking it. It also keeps those pages shared after a
  fork.
* the first threshold at GEN0_THRESHOLD, above a turn's worth of requests in flight (15 x
  1024 connections is over 10,000: a collection every turn, 1.4 per 1000 requests, each
  walking every request in flight), so the collector runs when garbage may have piled up,
  not every turn.

An app or operator that configured the collector has chosen already: when it is disabled or
its first threshold is not CPython's default, nothing is changed.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000
CPYTHON_DEFAULTS = frozenset({700, 2000})  # gen0 thresholds CPython ships (3.11-3.12, 3.13+)


def tune_collector() -> bool:
    """Freeze what exists and raise the first threshold in this process; True if applied."""
    threshold, *older = gc.get_threshold()
    if not gc.isenabled() or threshold not in CPYTHON_DEFAULTS:
        return False
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *older)
    return True
