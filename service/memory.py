"""Giving memory back to the system after a burst of open requests.

CPython frees an object into its own allocators, not to the system: objects of up to 512
bytes into pymalloc's 1 MiB arenas (given back only when an arena is wholly empty), larger
ones (dict tables, deques, buffers) into glibc's heap, which keeps free pages below its top
until asked with `malloc_trim`. So after thousands of streams close at once (a load test, a
client fleet reconnecting), the process would hold their peak for good. Measured over 5,000
idle streams (bench): trimming once they were settled took RSS from ~293 to ~250 MB. A full
collection by hand 3 s after they closed freed 13 MB more (free lists), so the trim now starts
with one (RSS then: 232-233 MB before, 225 after, single runs). The rest is pymalloc arenas that
a few live objects each keep (bench/PROFILE.md, "Memory").

`trim_after_bursts` trims once just after start-up (what the imports, migrations and caches'
temporaries left free: 128 -> 124 MB with pymalloc, 148 -> 126 MB with PYTHONMALLOC=malloc),
then watches the work in flight (every half second) and trims once it has fallen by
`threshold` since its last peak: a few milliseconds, only after a burst has ended, never per
request.

With PYTHONMALLOC=malloc in the service's environment (every object from glibc, so a trim
reaches all of it) the process gives back nearly all of a burst: after the bench's loads and
5,000 idle streams, RSS 150 MB against 211-229 with pymalloc, for ~5% more bridge CPU per
non-streaming request (8 paired rounds at c=32, bench.paired) and ~10% per relayed stream
event (bench/PROFILE.md). An operator's choice; the default stays pymalloc.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from typing import Callable

log = logging.getLogger("codeplan.memory")


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl, macOS): nothing to trim then."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


async def trim_after_bursts(in_flight: Callable[[], int], threshold: int = 1000,
                            interval: float = 0.5) -> None:
    trim = malloc_trim()
    if trim is None:
        return
    peak = 0
    await asyncio.sleep(interval)
    trim(0)  # what start-up freed (imports, migrations' and caches' temporaries)
    while True:
        await asyncio.sleep(interval)
        now = in_flight()
        peak = max(peak, now)
        if peak - now >= threshold:
            started = time.perf_counter()
            # a full collection first: besides cyclic garbage it empties the interpreter's free
            # lists (tuples, floats, dicts... kept for reuse), whose few objects each keep a
            # pymalloc arena of the burst alive (~10 ms; bench/PROFILE.md, "Memory")
            gc.collect()
            trim(0)
            log.info("memory given back after a burst", extra={
                "in_flight_peak": peak, "in_flight": now,
                "ms": round((time.perf_counter() - started) * 1000, 1)})
            peak = now
