"""Give freed memory back to the operating system after bursts (glibc).

After a burst of bulk streams the relay's buffers are freed, but glibc keeps most
of that memory: buffers of 64 KiB - 1 MiB come from its heaps (its mmap threshold
grows by itself after the first large frees), and a heap only shrinks from its top.
Measured (2026-11-26): a hub at 49 MiB grew to 462 MiB during 200 parallel
8 MiB streams and stayed there after they ended; with these trims it ended at
200-350 MiB.  That rest was not fragmentation but closed WebSockets kept alive by
reference cycles until a rare full GC (fixed in devstreams.transport.wslink):
since then (2026-11-27) the hub peaks at about 190 MiB and ends at 56-83 MiB.  ``malloc_trim(0)`` returns every free page of every heap; it costs
milliseconds, so the hub calls it only when streams ended since the last call, at
most once per ``memory_trim_interval`` (:class:`TrimRule`).
Logins count too (issue 10): every TLS handshake leaves ~15 KiB freed but kept
(asyncio's initial 256 KiB read buffer, OpenSSL's handshake state); after a fleet
connected, a trim takes an idle device from about 62 to 48 KiB of the hub's RSS.
Elsewhere (musl, macOS, Windows) there is nothing to call and nothing happens.
"""

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class TrimRule:
    """Trim when something was freed since the last trim, at most once per ``interval`` seconds,
    and once more an interval after such a trim.

    The events that feed it (a stream ended, logins accepted) come a little before the memory
    is actually freed: a stream's two WebSockets finish their closing handshakes and are
    dropped after its end is reported.  Without the follow-up the last trim of a burst runs
    too early and the hub keeps what those connections held (measured: 83 instead of 56 MiB
    after 200 bulk streams on a hub that started at 49).
    """

    interval: float
    _last: float | None = None
    _freed_since: int = 0
    _follow_up: bool = False

    def freed(self, count: int = 1) -> None:
        self._freed_since += count

    def due(self, now: float) -> bool:
        if self._last is not None and now - self._last < self.interval:
            return False
        if self._freed_since:
            self._last, self._freed_since, self._follow_up = now, 0, True
            return True
        if self._follow_up:
            self._last, self._follow_up = now, False
            return True
        return False


def _load_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _load_trim()


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


try:
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):
    _PAGE = 4096


def release_free_memory() -> bool:
    """Return free heap pages to the OS; False where the C library cannot."""
    if _TRIM is None:
        return False
    before = resident_bytes()
    _TRIM(0)
    after = resident_bytes()
    if before is not None and after is not None:
        log.debug("returned %.1f MiB to the OS (resident now %.1f MiB)", (before - after) / 2**20, after / 2**20)
    return True
