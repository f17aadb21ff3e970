"""The gateway serves TLS read buffers (256 KiB each) from the heap, not one mmap per read (glibc)."""

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from helpers import REPO

PROBE = """
import ctypes, ctypes.util, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
if sys.argv[1] == "gateway":
    from devstreams.transport.glibc import heap_for_read_buffers
    assert heap_for_read_buffers()
before = libc.mallinfo2().hblks
buffer = bytes(256 * 1024)   # what uvloop's TLS transport allocates for every read
print(libc.mallinfo2().hblks - before)
"""


def _has_mallinfo2() -> bool:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or None).mallinfo2
        return True
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc >= 2.33 only")
def test_read_buffers_come_from_the_heap_once_the_gateway_set_it_up():
    def mmapped_chunks(mode: str) -> int:  # a fresh process each: mallopt is process-wide
        out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())
    assert mmapped_chunks("default") == 1   # glibc's default: a 256 KiB buffer is its own mmap
    assert mmapped_chunks("gateway") == 0   # after heap_for_read_buffers(): from the heap
