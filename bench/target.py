"""The benchmark's target server: blocking sockets in threads, big buffers, so it is never the bottleneck.

The first byte of each connection picks the mode:
- ``S`` sink: read until EOF, then answer 16 bytes: bytes received (u64) and seconds between
  the first and the last data byte (f64), measured here at the receiver;
- ``E`` echo: send back everything read, until EOF (ping-pong and two-way tests);
- ``X`` exchange: the client sends a u64 size, then its own data until EOF; at the same time
  the target sends ``size`` random bytes, then a 64-byte trailer: SHA-256 of what it received
  and SHA-256 of what it sent, then EOF.  Each direction is checked on its own;
- ``F`` firehose: random bytes until the connection fails (for kill tests).
Run as ``python -m bench.target`` (prints its port) or start it in-process with ``serve()``.
"""

import hashlib
import os
import socket
import struct
import sys
import threading
import time

BUF = 1 << 20
RESULT = struct.Struct("!Qd")


def _sink(conn: socket.socket) -> None:
    buf = bytearray(BUF)
    view = memoryview(buf)
    total, first, last = 0, None, None
    while True:
        n = conn.recv_into(view)
        if not n:
            break
        now = time.perf_counter()
        first = first or now
        last = now
        total += n
    conn.sendall(RESULT.pack(total, (last - first) if first else 0.0))


def _echo(conn: socket.socket) -> None:
    buf = bytearray(BUF)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(view)
        if not n:
            break
        conn.sendall(view[:n])
    conn.shutdown(socket.SHUT_WR)


SIZE = struct.Struct("!Q")
TRAILER_BYTES = 64


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return bytes(data)


def _exchange(conn: socket.socket) -> None:
    size = SIZE.unpack(_recv_exact(conn, SIZE.size))[0]
    received = hashlib.sha256()

    def reader() -> None:
        buf = bytearray(BUF)
        view = memoryview(buf)
        while n := conn.recv_into(view):
            received.update(view[:n])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    block, sent, left = os.urandom(BUF), hashlib.sha256(), size
    while left:
        chunk = memoryview(block)[:min(left, BUF)]
        conn.sendall(chunk)
        sent.update(chunk)
        left -= len(chunk)
        if left:
            block = os.urandom(BUF)
    t.join()
    conn.sendall(received.digest() + sent.digest())
    conn.shutdown(socket.SHUT_WR)


def _firehose(conn: socket.socket) -> None:
    block = os.urandom(BUF)
    while True:
        conn.sendall(block)


def _handle(conn: socket.socket) -> None:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = conn.recv(1)
        if mode == b"S":
            _sink(conn)
        elif mode == b"E":
            _echo(conn)
        elif mode == b"X":
            _exchange(conn)
        elif mode == b"F":
            _firehose(conn)
    except OSError:
        pass
    finally:
        conn.close()


def serve(host: str = "127.0.0.1", port: int = 0) -> tuple[socket.socket, int]:
    """Start the server in daemon threads; return the listening socket and its port."""
    listener = socket.create_server((host, port), backlog=1024)
    port = listener.getsockname()[1]

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return listener, port


def main() -> None:
    listener, port = serve(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(port, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        listener.close()


if __name__ == "__main__":
    main()
