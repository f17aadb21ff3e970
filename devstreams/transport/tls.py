"""Client-side TLS: every client trusts the hub's CA the same way (and, for the hub, one server-side helper).

The CA file comes from an explicit argument, else ``DEVSTREAMS_CA_FILE``, else
the system trust store (a hub with a publicly trusted certificate).  Host name
and certificate checks are always on: there is no switch to turn them off.
"""

import ctypes
import ctypes.util
import functools
import os
import ssl

from devstreams.wire.errors import ConfigError

CA_FILE_ENV = "DEVSTREAMS_CA_FILE"


def resolve_ca_file(ca_file: str | os.PathLike | None) -> str | None:
    path = ca_file or os.environ.get(CA_FILE_ENV) or None
    if path is None:
        return None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"CA file {path!r} not found: pass the hub's ca.pem with --ca-file "
                          f"or {CA_FILE_ENV} ('devstreams hub show' prints where it is)")
    return path


def client_context(ca_file: str | os.PathLike | None = None) -> ssl.SSLContext:
    path = resolve_ca_file(ca_file)
    try:
        ctx = ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load CA file {path!r}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# -- server side: the memory an idle TLS connection keeps in OpenSSL (issue 10) ------------------------

BIO_C_SET_BUF_MEM = 114     # openssl/bio.h: BIO_set_mem_buf()
BIO_C_GET_BUF_MEM_PTR = 115  # openssl/bio.h: BIO_get_mem_ptr()
BIO_CLOSE = 1
BIO_TYPE_MEM = 1 | 0x0400   # openssl/bio.h: BIO_TYPE_MEM (source/sink)


@functools.cache
def _libcrypto():
    """The libcrypto that ``ssl`` uses, with the four BIO calls below; None if it cannot be told apart."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
        lib.OpenSSL_version_num.restype = ctypes.c_ulong
        if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
            return None  # another libcrypto than the one ssl was built with
        lib.BIO_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.BIO_ctrl.restype = ctypes.c_long
        lib.BIO_ctrl_pending.argtypes = [ctypes.c_void_p]
        lib.BIO_ctrl_pending.restype = ctypes.c_size_t
        lib.BIO_method_type.argtypes = [ctypes.c_void_p]
        lib.BIO_method_type.restype = ctypes.c_int
        lib.BUF_MEM_new.restype = ctypes.c_void_p
    except (OSError, AttributeError):
        return None
    # ssl.MemoryBIO is CPython's PySSLMemoryBIO {PyObject_HEAD; BIO *bio; int eof_written;}
    # (Modules/_ssl.c, the same from 3.5 to 3.13): the BIO pointer right after the object header.
    if ssl.MemoryBIO.__basicsize__ != object.__basicsize__ + 16:
        return None
    return lib


_bio_release_works = True


def release_bio_buffers(*bios: ssl.MemoryBIO) -> int:
    """Give the buffers of empty memory BIOs back to the allocator; how many were released.

    asyncio runs TLS through an ``SSLObject`` between two ``ssl.MemoryBIO``s, and an
    OpenSSL memory BIO keeps its buffer at the largest size it ever held (``BUF_MEM_grow_clean``
    never shrinks): the client's hello on the way in, the server's whole first flight
    (certificate chain included) on the way out.  For a device that then sends a
    PINGREQ every 30 s that is about 1.8 KiB per connection, for good (heaptrack, 500
    idle TLS connections).  ``BIO_set_mem_buf`` with a fresh empty ``BUF_MEM`` frees the
    old one; the BIO then grows again only as far as later records need.  Only a BIO
    with nothing pending is touched (its data would be lost otherwise), and only after
    checking that the pointer found in the ``MemoryBIO`` object is a memory BIO whose
    pending count agrees; if anything looks different (another Python or libcrypto)
    nothing is done, now and later.
    """
    global _bio_release_works
    lib = _libcrypto() if _bio_release_works else None
    if lib is None:
        return 0
    released = 0
    for bio in bios:
        if bio.pending or bio.eof:
            continue
        pointer = ctypes.c_void_p.from_address(id(bio) + object.__basicsize__).value
        if not pointer or lib.BIO_method_type(pointer) != BIO_TYPE_MEM or lib.BIO_ctrl_pending(pointer) != 0:
            _bio_release_works = False
            return released
        fresh = lib.BUF_MEM_new()
        if fresh:
            lib.BIO_ctrl(pointer, BIO_C_SET_BUF_MEM, BIO_CLOSE, fresh)
            released += 1
    return released


def bio_capacity(bio: ssl.MemoryBIO) -> int | None:
    """The bytes an ``ssl.MemoryBIO``'s OpenSSL buffer keeps allocated (``BUF_MEM.max``), or None if unknown.

    For tests and diagnostics of :func:`release_bio_buffers`.
    """
    lib = _libcrypto() if _bio_release_works else None
    if lib is None:
        return None
    pointer = ctypes.c_void_p.from_address(id(bio) + object.__basicsize__).value
    if not pointer or lib.BIO_method_type(pointer) != BIO_TYPE_MEM:
        return None
    buf = ctypes.c_void_p()
    if lib.BIO_ctrl(pointer, BIO_C_GET_BUF_MEM_PTR, 0, ctypes.byref(buf)) != 1 or not buf.value:
        return None
    # BUF_MEM (openssl/buffer.h): size_t length; char *data; size_t max; unsigned long flags
    return ctypes.c_size_t.from_address(buf.value + ctypes.sizeof(ctypes.c_size_t) + ctypes.sizeof(ctypes.c_void_p)).value
