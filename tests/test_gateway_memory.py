"""What an open idle stream costs the gateway (issue 14: ~96 KiB per stream before; <= 32 KiB asked).

Never wall-clock: each test measures the thing a saving removed -- the TLS read buffer
each connection had of its own (256 KiB: uvloop's, or asyncio's zero-filled one on the
single port), tasks per stream, deques and instance dicts per connection, the handshake's
headers, OpenSSL's memory BIOs grown by the handshake or by a burst of data -- so each
fails if its saving regresses.  The end-to-end ones run bench/streammem.py (the hub in
its own process on the CLI's event loop, the streams' other ends in subprocesses).
"""

import asyncio
import collections
import contextlib
import json
import os
import subprocess
import sys
import uuid

import pytest
from helpers import REPO, run, uvloop_policy, wait_for
from test_relay import Rig

from devstreams.transport.glibc import heap_in_use
from devstreams.transport.tls import bio_capacity
from devstreams.wire.streamtoken import Side
from streamgw.relay import BIO_KEPT, StreamTLSProtocol


def _streammem(n: int, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.streammem", str(n), "--json", "--settle", "2", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    [line] = [x for x in out.stdout.splitlines() if x.startswith("result ")]
    return json.loads(line[len("result "):])


@pytest.mark.skipif(heap_in_use() is None, reason="needs glibc's mallinfo2")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["gateway port", "single port"])
def test_an_open_idle_stream_keeps_no_tls_read_buffer_and_two_tasks(mode):
    """C heap per open stream, end to end on the hub's event loop (uvloop when installed).

    Before: 557 KiB of C heap per stream (a private 256 KiB TLS read buffer per connection:
    uvloop's own, untouched pages mostly; on the single port asyncio's zero-filled
    bytearray, 592 KiB of RSS per stream) and 4 tasks.  Now about 33 KiB, nearly all of it
    OpenSSL's two connection states (about 14.5 KiB each with OpenSSL 3.0), and 2 tasks.
    """
    result = _streammem(150, *(["--single-port"] if mode == "single port" else []))
    assert result["heap_kib"] < 48, result     # a private read buffer per connection would be > 250
    assert result["tasks"] <= 2.1, result      # websockets' handler per side; liveness runs on timers
    assert result["rss_kib"] < 80, result      # 96 (gateway port) / 592 (single port) before


def _stream_rig(tmp_path, body, uvloop: bool = False, **settings):
    rig = Rig(tmp_path, **settings)
    with uvloop_policy() if uvloop else contextlib.nullcontext():
        run(body(rig), timeout=60)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_each_stream_connection_is_slim(tmp_path, loop):
    """Per connection: asyncio's TLS protocol in slots reading into the gateway's one shared
    buffer, no empty deque (4 of ~760 bytes each before), no dict of its own beyond CPython's
    shared keys (1.6 KiB before), no handshake headers kept (about 3 KiB), handshake-sized
    BIOs released, liveness on a timer; and one task per side."""
    count = 10

    async def body(rig):
        await rig.gateway.start()
        clients = []
        try:
            before = len(asyncio.all_tasks())
            sids = [uuid.uuid4().hex for _ in range(count)]
            for sid in sids:
                clients.append(await rig.side(sid, Side.DEVICE))
                clients.append(await rig.side(sid, Side.SERVICE))
            await wait_for(lambda: all(m.paired.done() for m in rig.gateway._meetings.values())
                           and len(rig.gateway._meetings) == count, what="all paired")
            for c in clients:                    # a little traffic both ways first
                await c.send(b"x" * 100)
            for c in clients:
                assert await c.recv() == b"x" * 100
            await asyncio.sleep(0.1)
            # the clients run no task (no keepalive); the gateway one handler task per side, nothing else
            assert all(c.keepalive_task is None for c in clients)
            assert len(asyncio.all_tasks()) - before <= 2 * count, len(asyncio.all_tasks()) - before
            for sid in sids:
                meeting = rig.gateway._meetings[sid]
                assert not any(isinstance(v, asyncio.Event) for v in (meeting.paired, meeting.done))
                for ws in rig.sockets(sid):
                    proto = ws.transport._ssl_protocol
                    assert isinstance(proto, StreamTLSProtocol) and not vars(proto)
                    assert proto._ssl_buffer_view is rig.gateway._read_buffer
                    deques = [ws.drain_waiters, ws.recv_messages.frames.queue, proto._write_backlog]
                    assert not any(isinstance(d, collections.deque) for d in deques), deques
                    assert sys.getsizeof(vars(ws)) < 700, sys.getsizeof(vars(ws))   # shared keys
                    assert not ws.request.headers and ws.response is None
                    assert bio_capacity(proto._incoming) < 1024 and bio_capacity(proto._outgoing) < 1024
                    assert type(ws._liveness_timer).__name__ == "TimerHandle"   # asyncio's or uvloop's
        finally:
            for c in clients:
                await c.close()
            await rig.gateway.stop()
    _stream_rig(tmp_path, body, uvloop=loop == "uvloop")


@pytest.mark.timeout(90)
def test_a_stream_that_moved_bulk_data_gives_its_bio_buffers_back_once_quiet(tmp_path):
    """A memory BIO keeps the largest size it ever held (a whole read or write); the liveness
    timer frees it once the stream is quiet, so an idle stream costs the same after a transfer."""
    async def body(rig):
        await rig.gateway.start()
        sid = uuid.uuid4().hex
        device = await rig.side(sid, Side.DEVICE, max_size=None)
        service = await rig.side(sid, Side.SERVICE, max_size=None)
        try:
            await wait_for(lambda: sid in rig.gateway._meetings and rig.gateway._meetings[sid].paired.done(),
                           what="paired")
            sides = rig.sockets(sid)
            payload = os.urandom(250_000)   # within the gateway's max message size
            for _ in range(3):
                await service.send(payload)
                assert await device.recv() == payload
                await device.send(payload)
                assert await service.recv() == payload

            def largest() -> int:
                return max(bio_capacity(b) for ws in sides
                           for b in (ws.transport._ssl_protocol._incoming, ws.transport._ssl_protocol._outgoing))
            grown = largest()
            assert grown > BIO_KEPT          # the transfer grew them (else this test shows nothing)
            await wait_for(lambda: largest() <= BIO_KEPT, timeout=10, what="BIO buffers released")
            await service.send(b"after")     # and the stream still works both ways
            assert await device.recv() == b"after"
            await device.send(b"back")
            assert await service.recv() == b"back"
        finally:
            await service.close()
            await device.close()
            await rig.gateway.stop()
    _stream_rig(tmp_path, body, ping_interval=0.3, ping_timeout=5)
