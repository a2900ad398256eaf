"""A worker's own memory: USS (private pages) from ``/proc/PID/smaps_rollup``.

RSS counts pages shared with the master and the other workers (the preloaded app, libraries),
so it overstates what recycling a worker would give back; USS counts only what the worker alone
holds, which is where a leak grows.
"""

from __future__ import annotations

USS_FIELDS = (b"Private_Clean:", b"Private_Dirty:", b"Private_Hugetlb:")


def unique_memory(pid: int) -> int | None:
    """USS in bytes, or None when the process is gone or the kernel has no smaps_rollup."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    total_kib = 0
    found = False
    for line in data.splitlines():
        if line.startswith(USS_FIELDS):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                total_kib += int(parts[1])
                found = True
    return total_kib * 1024 if found else None


def resident_memory(pid: int) -> int | None:
    """RSS in bytes (for reports), from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
