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
from asyncio import sslproto

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
    prefer_fast_ciphers(ctx)
    return ctx


def server_context(cert_file: str | os.PathLike, key_file: str | os.PathLike) -> ssl.SSLContext:
    """The hub's and a gateway's server-side context: TLS 1.2+, the fast suites first (may raise
    ``OSError`` / ``ssl.SSLError`` from loading the files; the caller says which files)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    prefer_fast_ciphers(ctx, server=True)
    return ctx


# -- the suites: AES-128-GCM first (issue 14) -----------------------------------------------------------

TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
TLS12_CIPHERS = ("@SECLEVEL=2:ECDH+AESGCM+AES128:ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES"
                 ":!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM")   # Python 3.11's default list, AES-128-GCM moved first
SSL_OP_PRIORITIZE_CHACHA = 1 << 21   # openssl/ssl.h; Python 3.11 has no name for it


def _openssl(name: str, signatures: dict[str, tuple[list | None, object]]):
    """The OpenSSL library ``name`` (``ssl`` or ``crypto``) that Python's ``ssl`` uses, with the
    calls in ``signatures`` (name: (argtypes, restype)) declared; None if it cannot be told apart."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library(name) or f"lib{name}.so.3")
        lib.OpenSSL_version_num.restype = ctypes.c_ulong
        if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
            return None  # another OpenSSL than the one ssl was built with
        for call, (argtypes, restype) in signatures.items():
            if argtypes is not None:
                getattr(lib, call).argtypes = argtypes
            getattr(lib, call).restype = restype
    except (OSError, AttributeError):
        return None
    return lib


@functools.cache
def _libssl():
    """The libssl that ``ssl`` uses, with the two SSL_CTX calls below; None if it cannot be told apart."""
    return _openssl("ssl", {"SSL_CTX_set_ciphersuites": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int),
                            "SSL_CTX_get_options": ([ctypes.c_void_p], ctypes.c_uint64)})


def prefer_fast_ciphers(ctx: ssl.SSLContext, server: bool = False, suites: str = TLS13_SUITES) -> bool:
    """Put AES-128-GCM first in ``ctx``'s TLS 1.3 suites and TLS 1.2 ciphers; True if the order took.

    Why: on this kind of hardware (AES-NI) AES-128-GCM is the fastest AEAD OpenSSL has, 0-12 %
    ahead of AES-256-GCM (OpenSSL's default first choice) and 10-35 % ahead of
    ChaCha20-Poly1305 (docs/performance.md, "TLS ciphers on this CPU"); every byte of a stream
    is encrypted and decrypted twice.  Python 3.11 sets TLS 1.3 suites only through OpenSSL
    (``SSL_CTX_set_ciphersuites``): CPython's ``PySSLContext`` keeps the ``SSL_CTX`` pointer
    right after the object header (Modules/_ssl.c, 3.5 to 3.13), checked here by reading the
    context's options through it before anything is set.  A server keeps its own order
    (Python's default) and with ``SSL_OP_PRIORITIZE_CHACHA`` answers a client that lists
    ChaCha20 first (one without AES hardware, a small ARM board) with ChaCha20.  If anything
    looks different (another Python or libssl) the context keeps OpenSSL's defaults.
    """
    ctx.set_ciphers(TLS12_CIPHERS)
    lib = _libssl()
    if lib is None:
        return False
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != int(ctx.options):
        return False
    if lib.SSL_CTX_set_ciphersuites(pointer, suites.encode()) != 1:
        return False
    if server:
        ctx.options |= SSL_OP_PRIORITIZE_CHACHA
    return ctx.get_ciphers()[0]["name"] == suites.split(":")[0]


# -- server side: the memory an idle TLS connection keeps in OpenSSL (issue 10) ------------------------

BIO_C_SET_BUF_MEM = 114     # openssl/bio.h: BIO_set_mem_buf()
BIO_C_GET_BUF_MEM_PTR = 115  # openssl/bio.h: BIO_get_mem_ptr()
BIO_CLOSE = 1
BIO_TYPE_MEM = 1 | 0x0400   # openssl/bio.h: BIO_TYPE_MEM (source/sink)


@functools.cache
def _libcrypto():
    """The libcrypto that ``ssl`` uses, with the four BIO calls below; None if it cannot be told apart."""
    pointer = ctypes.c_void_p
    lib = _openssl("crypto", {"BIO_ctrl": ([pointer, ctypes.c_int, ctypes.c_long, pointer], ctypes.c_long),
                              "BIO_ctrl_pending": ([ctypes.c_void_p], ctypes.c_size_t),
                              "BIO_method_type": ([ctypes.c_void_p], ctypes.c_int),
                              "BUF_MEM_new": (None, ctypes.c_void_p)})
    if lib is None:
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


# -- server side: asyncio's TLS protocol, small per connection (issues 10 and 14) ----------------------

def set_tls_read_buffer(transport, size: int, shared: memoryview | None = None) -> None:
    """Give a TLS connection (asyncio's protocol) a read buffer of ``size`` bytes, or none of its own.

    CPython's asyncio keeps a ``SSLProtocol.max_size`` (256 KiB) bytearray per TLS
    connection, zero-filled, so all of it is resident: with thousands of idle devices or
    open streams that is most of the hub's memory.  With ``shared`` (a buffer of ``size``
    bytes owned by its server, one per event loop: the gate's 4 KiB for MQTT, the
    gateway's 256 KiB for streams) the connection has no buffer of its own at all.  That
    is safe on a selector event loop only: its transport calls ``get_buffer()``,
    ``recv_into()`` and ``buffer_updated()`` in one go, and ``SSLProtocol.buffer_updated``
    copies the bytes into the connection's incoming ``MemoryBIO`` before returning, so no
    two connections ever hold the buffer at once.  A proactor loop (Windows) keeps the
    buffer across an overlapped read: there each connection keeps its own.  uvloop's TCP
    transport fills buffers the same way (``_selector_transport``).  This reaches into
    asyncio internals, so it does nothing if they look different.
    """
    proto = getattr(transport, "_ssl_protocol", None)
    if proto is None or not hasattr(proto, "_ssl_buffer") or not hasattr(proto, "max_size"):
        return
    if proto.max_size != size:
        proto.max_size = size
    if shared is not None and len(shared) == size and _selector_transport(proto):
        proto._ssl_buffer = shared.obj
        proto._ssl_buffer_view = shared
        return
    proto._ssl_buffer = bytearray(size)
    proto._ssl_buffer_view = memoryview(proto._ssl_buffer)


def _selector_transport(proto) -> bool:
    """Does this connection's socket transport fill and hand over its read buffer in one go?

    asyncio's selector transports do (``get_buffer``, ``recv_into``, ``buffer_updated``), and
    so do uvloop's (libuv's alloc callback, ``read()``, the read callback, one stream at a time:
    uvloop/handles/stream.pyx ``__uv_stream_buffered_alloc`` / ``__uv_stream_buffered_on_read``).
    """
    from asyncio import selector_events
    transport = getattr(proto, "_transport", None)
    return (isinstance(transport, selector_events._SelectorTransport)
            or type(transport).__module__ == "uvloop.loop" and type(transport).__name__ == "TCPTransport")


class SlottedSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol with its attributes in slots (issue 10; the gate's and the gateway's).

    ``SSLProtocol`` sets about 37 attributes on each instance, too many for CPython's shared-key
    instance dicts: each connection had a 1.6 KiB dict of its own.  Here the ones its code
    assigns (asyncio/sslproto.py 3.11: every ``self._x = ...`` of the class) live in slots; those
    it has class-level defaults for (``_handshake_timeout_handle`` ...) start with that default,
    since a slot hides it; any other attribute a later Python adds still lands in the instance
    dict, so nothing breaks, it only costs what it did before.  ``max_size`` (the read size)
    is a slot too, starting at the class's ``first_read_size``: subclasses set that, and swap
    in a shared buffer later (``set_tls_read_buffer``), which changes ``max_size`` without
    giving the connection an instance dict.

    Why asyncio's protocol and not the event loop's: the hub runs on uvloop when it is
    installed (devstreams.cli), and uvloop's own TLS protocol gives every connection a
    256 KiB read buffer of its own (uvloop/sslproto.pyx ``SSLProtocol.__cinit__``,
    ``SSL_READ_MAX_SIZE``) that Python cannot reach or share, and its memory BIOs cannot
    be released.  asyncio's protocol runs on uvloop's TCP transport as on its own (a
    buffered protocol; uvloop's transports have what it calls, ``_force_close`` included).
    """

    __slots__ = (
        "_app_protocol", "_app_protocol_buffer_updated", "_app_protocol_get_buffer", "_app_protocol_is_buffer",
        "_app_reading_paused", "_app_state", "_app_transport", "_app_transport_created", "_app_writing_paused",
        "_conn_lost", "_eof_received", "_extra", "_handshake_start_time", "_handshake_timeout_handle", "_incoming",
        "_incoming_high_water", "_incoming_low_water", "_loop", "_outgoing", "_outgoing_high_water",
        "_outgoing_low_water", "_server_hostname", "_server_side", "_shutdown_timeout_handle", "_ssl_buffer",
        "_ssl_buffer_view", "_ssl_handshake_timeout", "_ssl_reading_paused", "_ssl_shutdown_timeout",
        "_ssl_writing_paused", "_sslcontext", "_sslobj", "_state", "_transport", "_waiter", "_write_backlog",
        "_write_buffer_size", "max_size")
    # names SSLProtocol gives a class-level default (None): a slot hides it, so each instance starts with it
    _DEFAULTS = tuple((name, getattr(sslproto.SSLProtocol, name)) for name in __slots__
                      if hasattr(sslproto.SSLProtocol, name) and not callable(getattr(sslproto.SSLProtocol, name)))

    first_read_size = sslproto.SSLProtocol.max_size   # asyncio's 256 KiB unless a subclass says otherwise

    def __init__(self, *args, **kwargs) -> None:
        for name, default in self._DEFAULTS:
            setattr(self, name, default)
        self.max_size = self.first_read_size   # SSLProtocol.__init__ allocates its first buffer with it
        super().__init__(*args, **kwargs)

    def _do_read__copied(self) -> None:
        """asyncio's ``_do_read__copied`` (3.11), without the read that can only fail.

        asyncio reads the ``SSLObject`` until it raises ``SSLWantReadError``: every read of
        a connection ends in an exception, raised and caught in C and Python, which for a
        64-byte message is about a tenth of the gateway's relay CPU.  Here the loop also
        stops when nothing is left to decrypt: the incoming ``MemoryBIO`` is empty and
        OpenSSL holds no decrypted bytes (``pending()``).  A record read whole leaves
        nothing behind (``max_size`` is far above TLS's 16 KiB records); a partial record
        or a close_notify still in the BIO is read as asyncio would.
        """
        sslobj, incoming, data = self._sslobj, self._incoming, []
        chunk = b"1"
        try:
            while True:
                chunk = sslobj.read(self.max_size)
                if not chunk:
                    break
                data.append(chunk)
                if not incoming.pending and not sslobj.pending():
                    break
        except sslproto.SSLAgainErrors:
            pass
        if data:
            self._app_protocol.data_received(data[0] if len(data) == 1 else b"".join(data))
        if not chunk:
            # close_notify
            self._call_eof_received()
            self._start_shutdown()
