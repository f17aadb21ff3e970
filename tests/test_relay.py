"""The gateway's frame-level relay (streamgw/relay.py), driven by raw WebSocket clients over TLS.

A real ``Gateway`` on loopback, tokens minted with its key, and websockets clients
on both sides, so each test controls exactly which frames go in: fragments, text,
frames written before the peer arrived, a reader that stops.
"""

import asyncio
import gc
import hashlib
import os
import random
import uuid
import weakref

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from broker.pki import ensure_tls, server_context
from devstreams.transport.tls import client_context
from devstreams.wire import streamtoken
from devstreams.wire.events import StreamClosed
from devstreams.wire.streamproto import CLOSE_PEER_CLOSED, stream_url
from devstreams.wire.streamtoken import Side
from helpers import run, wait_for
from streamgw.server import Gateway
from streamgw.settings import GatewaySettings

KEY = os.urandom(32)


class Rig:
    """A gateway, and a way to open either side of a new stream on it."""

    def __init__(self, tmp_path, **settings):
        self.files = ensure_tls(tmp_path / "tls", ("localhost",))
        self.gateway = Gateway(GatewaySettings(host="127.0.0.1", port=0, **settings), KEY,
                               server_context(self.files))
        self.closed: list[StreamClosed] = []
        self.gateway.events.subscribe(lambda e: self.closed.append(e) if isinstance(e, StreamClosed) else None)

    async def side(self, stream_id: str, side: Side, **kw):
        token = streamtoken.mint(KEY, stream_id=stream_id, side=side, audience=self.gateway.public_url, ttl=30,
                                 device_id="dev", stream_name="x")
        return await connect(stream_url(self.gateway.public_url, stream_id), ssl=client_context(self.files.ca_cert),
                             additional_headers={"Authorization": f"Bearer {token}"}, compression=None,
                             ping_interval=None, close_timeout=None, **kw)

    async def __aenter__(self) -> "Rig":
        await self.gateway.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.gateway.stop()

    def sockets(self, stream_id: str):
        meeting = self.gateway._meetings[stream_id]
        return meeting.sockets[Side.DEVICE], meeting.sockets[Side.SERVICE]


def test_fragments_and_text_pass_unchanged_and_binary_bytes_are_counted(tmp_path):
    rig = Rig(tmp_path)

    async def main():
        async with rig:
            sid = uuid.uuid4().hex
            device = await rig.side(sid, Side.DEVICE)
            service = await rig.side(sid, Side.SERVICE)
            parts = [os.urandom(1000), os.urandom(70_000), os.urandom(3)]
            await service.send(parts)                 # one binary message in three frames
            await service.send("eof")                 # a text message (the stream's eof control)
            await service.send(["ab", "cd"])          # a fragmented text message
            await service.send(b"tail")
            got = [await device.recv() for _ in range(4)]
            assert got == [b"".join(parts), "eof", "abcd", b"tail"]
            await device.send(b"z" * 5000)
            assert await service.recv() == b"z" * 5000
            # an empty binary message passes as one (the relay queues no empty piece, which
            # websockets' send_data would take for the end of the stream), and the stream goes on
            assert rig.sockets(sid)[0].passing
            await service.send(b"")
            await service.send(b"after")
            assert [await device.recv() for _ in range(2)] == [b"", b"after"]
            await service.close()
            with pytest.raises(ConnectionClosed):
                await device.recv()
            assert device.close_code == CLOSE_PEER_CLOSED
            await wait_for(lambda: rig.closed, what="stream closed event")
            [closed] = rig.closed
            assert closed.bytes_to_device == 71_003 + 4 + 5 and closed.bytes_to_service == 5000
            assert closed.reason == "service closed the stream"
    run(main())


def test_frames_sent_before_the_peer_came_are_relayed_first_and_in_order(tmp_path):
    rig = Rig(tmp_path, max_queue=4)

    async def main():
        async with rig:
            sid = uuid.uuid4().hex
            device = await rig.side(sid, Side.DEVICE)
            sent = [f"{i:04d}".encode() * 2000 for i in range(40)]   # more than max_queue: reading pauses
            writer = asyncio.ensure_future(_send_all(device, sent))
            await asyncio.sleep(0.3)
            service = await rig.side(sid, Side.SERVICE)
            got = [await service.recv() for _ in sent]
            await writer
            assert got == sent
            await device.close()
            with pytest.raises(ConnectionClosed):
                await service.recv()
            assert service.close_code == CLOSE_PEER_CLOSED
    run(main())


async def _send_all(ws, messages) -> None:
    for message in messages:
        await ws.send(message)


@pytest.mark.timeout(60)
def test_a_stopped_reader_holds_the_writer_back_and_the_relay_holds_under_1_mib(tmp_path):
    """Backpressure through the relay: nothing piles up in the gateway, everything arrives later."""
    rig = Rig(tmp_path)
    block = os.urandom(256 * 1024)
    total = 48 * 2**20

    async def main():
        async with rig:
            sid = uuid.uuid4().hex
            device = await rig.side(sid, Side.DEVICE, write_limit=64 * 1024)
            service = await rig.side(sid, Side.SERVICE, max_queue=2)   # and then it reads nothing
            progress = {"sent": 0}

            async def write_all():
                while progress["sent"] < total:
                    await device.send(block)
                    progress["sent"] += len(block)

            writer = asyncio.ensure_future(write_all())
            last = -1
            while progress["sent"] != last:   # until the writer has been held back for a while
                last = progress["sent"]
                await asyncio.sleep(1.5)
            assert progress["sent"] < total, "the writer was never held back"
            device_ws, service_ws = rig.sockets(sid)
            assert device_ws.held, "the relay still reads a device whose peer does not read"
            buffered = service_ws.transport.get_write_buffer_size()
            assert buffered <= 1 << 20, f"the relay holds {buffered} bytes for a stopped reader"
            assert device_ws.liveness.paused  # silence while held does not count against the device
            # the reader comes back: everything arrives, intact and in order
            expected = hashlib.sha256(block * (total // len(block))).digest()
            received, got = hashlib.sha256(), 0
            while got < total:
                chunk = await asyncio.wait_for(service.recv(), 10)
                received.update(chunk)
                got += len(chunk)
            await writer
            assert received.digest() == expected
            assert not device_ws.held
            await service.close()
            await device.wait_closed()
            print(f"\nwriter held back {last / 2**20:.1f} MiB ahead of the reader; relay buffered {buffered} B")
    run(main(), timeout=55)


def test_relayed_connections_are_freed_without_the_cyclic_gc(tmp_path):
    rig = Rig(tmp_path)

    async def main():
        refs = []
        async with rig:
            for closer in ("service", "device"):
                sid = uuid.uuid4().hex
                device = await rig.side(sid, Side.DEVICE)
                service = await rig.side(sid, Side.SERVICE)
                await service.send(b"x" * 100_000)
                assert await device.recv() == b"x" * 100_000
                refs.extend(weakref.ref(ws) for ws in rig.sockets(sid))
                await (service if closer == "service" else device).close()
                await device.wait_closed()
                await service.wait_closed()
            await wait_for(lambda: len(rig.closed) == 2, what="both streams ended")
            await asyncio.sleep(0.2)   # the gateway's handlers return
        return refs

    gc.collect()
    gc.disable()
    try:
        refs = run(main())
        alive = [ref() for ref in refs if ref() is not None]
        assert not alive, f"{len(alive)} of {len(refs)} relayed connections are kept alive by reference cycles"
    finally:
        gc.enable()


def _raw_frames(rnd: random.Random) -> tuple[bytes, list, list]:
    """A client's frame mix as raw masked bytes, the messages the other side must receive, the pings."""
    raw, messages, pings = b"", [], []
    for _ in range(60):
        pick = rnd.random()
        if pick < 0.6:
            data = rnd.randbytes(rnd.choice((0, 1, 64, 300, 70_000)))
            raw += Frame(Opcode.BINARY, data).serialize(mask=True)
            messages.append(data)
        elif pick < 0.7:
            pings.append(b"p%d" % len(raw))
            raw += Frame(Opcode.PING, pings[-1]).serialize(mask=True)
        elif pick < 0.8:
            raw += Frame(Opcode.TEXT, b"eof").serialize(mask=True)
            messages.append("eof")
        else:
            parts = [rnd.randbytes(rnd.randint(0, 3000)) for _ in range(rnd.randint(2, 4))]
            raw += b"".join(Frame(Opcode.BINARY if i == 0 else Opcode.CONT, p, fin=i == len(parts) - 1)
                            .serialize(mask=True) for i, p in enumerate(parts))
            messages.append(b"".join(parts))
    return raw, messages, pings


def test_whole_binary_frames_pass_the_relay_itself_whatever_the_reads_and_the_rest_stays_websockets(tmp_path):
    """devstreams.transport.passthrough in the relay: once both sides are linked, whole binary frames are passed
    without websockets' parser (``passing``); frames written in odd cuts (a header split from its
    payload, several frames in one read), pings, text and fragmented messages between them arrive
    exactly as sent, pings are answered, bytes are counted; then a frame over max_size still gets
    websockets' 1009 and the stream ends for the other side."""
    rig = Rig(tmp_path)
    rnd = random.Random(10)

    async def main():
        async with rig:
            sid = uuid.uuid4().hex
            device = await rig.side(sid, Side.DEVICE)
            service = await rig.side(sid, Side.SERVICE)
            await service.send(b"hello")
            assert await device.recv() == b"hello"
            device_ws, service_ws = rig.sockets(sid)
            assert service_ws.passing, "whole binary frames still go through websockets' parser"
            raw, messages, pings = _raw_frames(rnd)
            pongs = []
            service.process_event = lambda event, seen=service.process_event: (
                pongs.append(event.data) if event.opcode is Opcode.PONG else seen(event))
            pos = 0
            while pos < len(raw):   # the TLS connection carries the bytes in cuts of any size
                cut = rnd.choice((1, 2, 3, 7, 100, 5000, 80_000))
                service.transport.write(raw[pos:pos + cut])
                pos += cut
                await asyncio.sleep(0)
            got = [await asyncio.wait_for(device.recv(), 10) for _ in messages]
            assert got == messages
            assert service_ws.passing
            await wait_for(lambda: pongs == pings, what="a pong for every ping")
            binary = sum(len(m) for m in messages if isinstance(m, bytes))
            assert service_ws.record.bytes_to_device == 5 + binary
            # a frame header over max_size: websockets' own answer, and the stream ends for the device
            service.transport.write(bytes((0x82, 0xFF)) + (rig.gateway.settings.max_message_bytes + 1)
                                    .to_bytes(8, "big") + b"mask")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(device.recv(), 10)
            await asyncio.wait_for(service.wait_closed(), 10)
            assert service.close_code == 1009
            assert device.close_code != CLOSE_PEER_CLOSED
    run(main())


def test_passing_starts_in_the_middle_of_a_frame_when_the_peer_comes(tmp_path):
    """The device's first frame is half written when the service arrives (websockets' parser is
    inside it when the relay takes over): websockets gets exactly the rest of that frame, passing
    starts right there, and every message arrives whole and in order."""
    rig = Rig(tmp_path)
    rnd = random.Random(3)

    async def main():
        async with rig:
            sid = uuid.uuid4().hex
            device = await rig.side(sid, Side.DEVICE)
            messages = [rnd.randbytes(n) for n in (70_000, 10, 5000, 0, 300)]
            raw = b"".join(Frame(Opcode.BINARY, m).serialize(mask=True) for m in messages)
            device.transport.write(raw[:30_000])          # inside the first frame's payload
            await asyncio.sleep(0.3)
            service = await rig.side(sid, Side.SERVICE)
            await wait_for(lambda: sid in rig.gateway._meetings and rig.sockets(sid)[0].peer is not None,
                           what="the two sides linked")
            device_ws, _ = rig.sockets(sid)
            assert not device_ws.passing and device_ws.protocol.reader.buffer, "the parser should be inside a frame"
            device.transport.write(raw[30_000:])
            got = [await asyncio.wait_for(service.recv(), 10) for _ in messages]
            assert got == messages
            assert device_ws.passing, "passing did not start after the frame websockets was inside"
    run(main())
