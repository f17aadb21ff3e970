"""Give freed memory back to the operating system after bursts (glibc).

After a burst of bulk streams the relay's buffers are freed, but glibc keeps most
of that memory: buffers of 64 KiB - 1 MiB come from its heaps (its mmap threshold
grows by itself after the first large frees), and a heap only shrinks from its top.
Measured (2026-11-26): a hub at 49 MiB grew to 462 MiB during 200 parallel
8 MiB streams and stayed there after they ended; with these trims it ended at
200-350 MiB.  That rest was not fragmentation but closed WebSockets kept alive by
reference cycles until a rare full GC (fixed in devstreams.transport.wslink):
since then (2026-11-27) the hub peaks at about 150-200 MiB and ends at 54-57 MiB.
``malloc_trim(0)`` (devstreams.transport.glibc) returns every free page of every heap; it costs
milliseconds, so the hub calls it only when streams ended since the last call, at
most once per ``memory_trim_interval`` (:class:`TrimRule`).
Logins count too (issue 10): every TLS handshake leaves ~15 KiB freed but kept
(asyncio's initial 256 KiB read buffer, OpenSSL's handshake state); after a fleet
connected, a trim takes an idle device from about 62 to 48 KiB of the hub's RSS.
Elsewhere (musl, macOS, Windows) there is nothing to call and nothing happens.

The cyclic garbage collector (issue 10).  Every connection leaves a few hundred
long-lived Python objects (amqtt's session and handler, the gate's reader, TLS and
asyncio objects), and CPython's full collection walks all of them whenever the
objects created since the last one reach a quarter of the total: at 10,000 devices
13 full collections of about 0.45 s each during the connect storm, 12% of the hub's
CPU per connect, each one stalling the event loop.  After a burst (the same moments
the heap is trimmed) :func:`settle_objects` collects the young generations and moves
the survivors to the permanent generation (``gc.freeze()``), out of every later
collection.  Frozen objects are still freed by reference counting; only cycles among
them would wait, so once every ``memory_full_collect_interval`` the next settle unfreezes
everything, runs one full collection and freezes again (:class:`FreezeRule`).
"""

import gc
import logging
import os
import time
from dataclasses import dataclass

from devstreams.transport.glibc import malloc_trim

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


FULL_COLLECT_INTERVAL = 600.0  # s; the default of HubSettings.memory_full_collect_interval


@dataclass
class FreezeRule:
    """A full collection (unfreeze, collect, freeze) on the first settle after every ``interval`` seconds;
    in between, settles only freeze.  The first settle starts the clock."""

    interval: float
    _last_full: float | None = None

    def full_due(self, now: float) -> bool:
        if self._last_full is None:
            self._last_full = now
            return False
        if now - self._last_full < self.interval:
            return False
        self._last_full = now
        return True


_FREEZE = FreezeRule(FULL_COLLECT_INTERVAL)


def settle_objects(now: float | None = None, rule: FreezeRule = _FREEZE) -> str:
    """After a burst: survivors to the permanent generation; sometimes one full collection first.

    Returns "full" or "young" (what was collected before freezing).
    """
    if rule.full_due(time.monotonic() if now is None else now):
        gc.unfreeze()
        gc.collect()
        kind = "full"
    else:
        gc.collect(1)  # the young generations: garbage made during the burst is not frozen
        kind = "young"
    gc.freeze()
    return kind


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


def release_free_memory(rule: FreezeRule = _FREEZE) -> bool:
    """Freeze the survivors of a burst (:func:`settle_objects`), then return free heap pages to the OS;
    False where the C library cannot trim."""
    settle_objects(rule=rule)
    before = resident_bytes()
    if not malloc_trim():
        return False
    after = resident_bytes()
    if before is not None and after is not None:
        log.debug("returned %.1f MiB to the OS (resident now %.1f MiB)", (before - after) / 2**20, after / 2**20)
    return True
