"""``--trace-memory FRAMES``: where a worker's memory grew, from tracemalloc.

Tracing starts when the server is ready to serve: what the application allocates while it is
imported and started up is its working set, not a leak, and is not traced (nor paid for). Every
block allocated after that and still alive is in a snapshot, so the snapshot's statistics are
the growth since the start. The report names the 10 sites that hold the most of it, as
``file:line`` (with FRAMES > 1, the calls that led there too).

The report is logged on SIGUSR2 (to the worker, or to the supervisor, which forwards it to every
worker) and when the supervisor recycles a worker for ``--max-memory`` (it sends the worker
SIGUSR2 first). Taking a snapshot blocks the event loop for a moment (milliseconds per ten
thousand live blocks): it is a diagnosis, not a metric.
"""

from __future__ import annotations

import logging
import tracemalloc

TOP = 10  # allocation sites in a report
MiB = 1024 * 1024

logger = logging.getLogger("uvworker.error")


def start(frames: int) -> None:
    """Trace allocations from now on, ``frames`` deep (0: do nothing)."""
    if frames and not tracemalloc.is_tracing():
        tracemalloc.start(frames)


def report(top: int = TOP) -> str:
    """The sites that grew most since ``start``, one per line (several with FRAMES > 1)."""
    if not tracemalloc.is_tracing():
        return "Memory tracing is off: start the server with --trace-memory FRAMES (e.g. 1) to see where memory grows."
    frames = tracemalloc.get_traceback_limit()
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    stats = snapshot.statistics("traceback" if frames > 1 else "lineno")
    total = sum(stat.size for stat in stats)
    lines = [f"Memory grown since the worker started serving: {_size(total)} in "
             f"{sum(stat.count for stat in stats)} blocks; the {min(top, len(stats))} largest sites:"]
    for rank, stat in enumerate(stats[:top], 1):
        site, *callers = reversed(stat.traceback)  # tracemalloc lists the oldest frame first
        lines.append(f"{rank:3}. {_size(stat.size):>10} {stat.count:8} blocks  {site.filename}:{site.lineno}")
        lines.extend(f"{'':29}from {frame.filename}:{frame.lineno}" for frame in callers)
    return "\n".join(lines)


def _size(size: int) -> str:
    return f"{size / MiB:.1f} MiB" if size >= MiB else f"{size / 1024:.1f} KiB"


def log_report() -> None:
    logger.warning("%s", report())
