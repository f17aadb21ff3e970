"""Load generators: blocking sockets against a TCP address (the path under test ends there)."""

import hashlib
import os
import socket
import statistics
import threading
import time

from .target import BUF, RESULT, SIZE, TRAILER_BYTES


def _connect(port: int, mode: bytes, rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:  # before connecting, so the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(120)
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(mode)
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def bulk(port: int, total: int) -> dict:
    """Send ``total`` bytes; the sink times them at the receiver."""
    block = os.urandom(BUF)
    with _connect(port, b"S") as sock:
        sent = 0
        while sent < total:
            n = min(BUF, total - sent)
            sock.sendall(memoryview(block)[:n])
            sent += n
        sock.shutdown(socket.SHUT_WR)
        received, seconds = RESULT.unpack(_recv_exact(sock, RESULT.size))
    if received != total:
        raise AssertionError(f"sink received {received} of {total} bytes")
    return {"bytes": total, "seconds": seconds, "MBps": total / seconds / 1e6 if seconds else 0.0}


def ping_pong(port: int, rounds: int, size: int = 64) -> dict:
    payload = os.urandom(size)
    samples = []
    with _connect(port, b"E") as sock:
        for _ in range(rounds):
            start = time.perf_counter()
            sock.sendall(payload)
            if _recv_exact(sock, size) != payload:
                raise AssertionError("ping-pong payload changed on the way")
            samples.append((time.perf_counter() - start) * 1000)
    return percentiles(samples) | {"rounds": rounds}


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99), "mean_ms": statistics.fmean(ordered)}


def exchange_one(port: int, size: int, pause_after: int = 0, pause: float = 0.0, rcvbuf: int = 0) -> dict:
    """Send ``size`` random bytes while receiving ``size`` from the target; check each direction.

    With ``pause``, stop reading for that long after ``pause_after`` bytes (a slow reader);
    ``rcvbuf`` shrinks this client's receive buffer so less hides in its kernel.
    Returns what arrived and whether each direction's SHA-256 matches; raises if the
    connection broke (a reset is an exception, a clean end is not).
    """
    data = os.urandom(size)
    with _connect(port, b"X", rcvbuf) as sock:
        sock.sendall(SIZE.pack(size))
        failure: list = []

        def writer() -> None:
            try:
                view = memoryview(data)
                for off in range(0, size, 256 * 1024):
                    sock.sendall(view[off:off + 256 * 1024])
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                failure.append(exc)
        t = threading.Thread(target=writer)
        t.start()
        digest, got, paused = hashlib.sha256(), 0, not pause
        tail = bytearray()
        while True:
            if not paused and got >= pause_after:
                time.sleep(pause)
                paused = True
            chunk = sock.recv(BUF)
            if not chunk:
                break
            keep = max(0, min(len(chunk), size - got))
            digest.update(chunk[:keep])
            tail += chunk[keep:]
            got += len(chunk)
        t.join()
    if failure:
        raise failure[0]
    if got != size + TRAILER_BYTES:
        raise AssertionError(f"received {got} bytes, expected {size} + {TRAILER_BYTES}")
    return {"bytes": size, "up_intact": bytes(tail[:32]) == hashlib.sha256(data).digest(),
            "down_intact": bytes(tail[32:]) == digest.digest()}


def _exchange_into(port: int, size: int, results: list, index: int) -> None:
    try:
        outcome = exchange_one(port, size)
        results[index] = outcome["up_intact"] and outcome["down_intact"] or outcome
    except Exception as exc:  # recorded, reported by the caller
        results[index] = exc


def exchange(port: int, connections: int, size: int) -> dict:
    """``connections`` parallel exchanges of ``size`` bytes each way; each direction SHA-256 checked."""
    results: list = [None] * connections
    threads = [threading.Thread(target=_exchange_into, args=(port, size, results, i)) for i in range(connections)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    intact = sum(1 for r in results if r is True)
    errors = [repr(r) for r in results if r is not True][:3]
    return {"connections": connections, "bytes_each_way": size, "intact": intact, "seconds": seconds,
            "aggregate_MBps": 2 * size * connections / seconds / 1e6, "errors": errors}
