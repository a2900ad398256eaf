"""glibc malloc tuned for a server's allocation pattern.

Request and response bodies are allocated and freed by the tens of kilobytes, many times a
second. By default glibc hands the top of its heap back to the kernel as soon as 128 KiB of it
are free, so under load the heap shrinks and grows continually and every new body pays page
faults for fresh pages: measured on a 64 KiB POST, 2.5x the CPU per request. Keeping a bounded
pad of free heap (``TOP_PAD``) when trimming stops that churn for a few MiB of memory per
process. An operator who set glibc's own knobs (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``)
has chosen already: then nothing is changed. Elsewhere than glibc, nothing is changed either.
"""

from __future__ import annotations

import ctypes
import os

M_TOP_PAD = -2  # glibc's mallopt() parameter number
TOP_PAD = 8 * 1024 * 1024  # free heap kept when trimming, per process


def tune_heap() -> bool:
    """Apply TOP_PAD in this process; True if applied."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
    except (ValueError, OSError):  # not a glibc system
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
        name.startswith("MALLOC_") and name.endswith("_") for name in os.environ
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_TOP_PAD, TOP_PAD))
