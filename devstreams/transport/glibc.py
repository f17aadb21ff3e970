"""The glibc allocator calls the hub's processes make, in one place (Linux with glibc only).

``broker.memory`` returns free heap pages after bursts (``malloc_trim``); the streaming
gateway serves its TLS read buffers from the heap (``mallopt``).  Elsewhere (musl,
macOS, Windows) there is no such library function and both calls do nothing.
"""

import ctypes
import ctypes.util
import functools

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
READ_BUFFER_HEAP = 1 << 20      # allocations below this come from the heap, not from mmap
HEAP_TOP_KEPT = 8 << 20         # free memory at the heap's top kept for reuse, not given back by brk


@functools.cache
def _function(name: str, argtypes: tuple, restype=ctypes.c_int):
    """libc's ``name`` with its C signature, or None where the C library has no such function."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), restype
    return function


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> tuple[int, int] | None:
    """(bytes allocated, free bytes the heaps keep) over all of glibc's arenas (``mallinfo2``), or None.

    What C code (OpenSSL) and Python objects too big for pymalloc hold, without the pages
    and fragments RSS adds: the measure for a per-connection cost in C (bench/memprobe.py,
    tests/test_idle_memory.py).
    """
    mallinfo2 = _function("mallinfo2", (), _Mallinfo2)
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return info.uordblks + info.hblkhd, info.fordblks


def malloc_trim() -> bool:
    """Return every free page of every heap to the OS; False where the C library cannot."""
    trim = _function("malloc_trim", (ctypes.c_size_t,))
    if trim is None:
        return False
    trim(0)
    return True


def heap_for_read_buffers() -> bool:
    """Serve the TLS transport's 256 KiB read buffers from the heap, not from mmap.

    uvloop's TLS transport reads every incoming record with ``SSLObject.read(256 KiB)``
    (``SSL_READ_MAX_SIZE``): CPython allocates the full size, then shrinks it to the
    record.  256 KiB is above glibc's mmap threshold (128 KiB; its dynamic raise never
    happens because the chunk is shrunk before it is freed), so every WebSocket message
    the gateway received cost mmap + mremap + munmap.  Measured with ``py-spy --native``
    on a hub relaying 1,000 streams at 1 message/s each (bench --streams 1000): those
    three system calls were 13% of the hub's busy CPU; with these two settings, none.
    The heap's top is kept (``HEAP_TOP_KEPT``) so the same buffer is not returned with
    brk and taken back on the next read; :func:`malloc_trim` (``broker.memory``) still
    gives free memory back to the OS after bursts.  Process-wide, set once.  False if
    not applied.
    """
    mallopt = _function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, READ_BUFFER_HEAP)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_TOP_KEPT))
