"""Handing freed memory back to the OS.

glibc keeps what Python and torch free in its per-thread arenas, and its mmap
threshold rises with every large block freed, so after bursts of big
temporaries (a load; hundreds of prefills of long prompts) resident memory stays
tens of MiB above what is live. `trim` returns the free pages; it is cheap
(a few ms) and meant for moments nothing runs: after a load, when an engine idles.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache


@cache
def _malloc_trim():  # noqa: ANN202
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def freeze() -> None:
    """Move every object alive now out of the collector's sight. A full collection
    stops every thread; over a loaded server's ~250k objects it took 60-70 ms, several
    times per big request, and /api/version waited behind it. Frozen objects are still
    freed by reference counting when a model is unloaded (its modules hold no cycles)."""
    gc.collect()
    gc.freeze()


def trim(collect: bool = False) -> None:
    """Give free heap pages back to the OS (after a garbage collection if asked)."""
    if collect:
        gc.collect()
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
