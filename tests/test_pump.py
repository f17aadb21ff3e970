"""The protocol-level pump between a stream and a TCP connection (devstreams/transport/pump.py).

Real hub and gateway (in-process), a real device agent SDK, the real service SDK and ``pipe_tcp``
joined to a real loopback TCP connection whose far end we control.
"""

import asyncio
import hashlib
import os
import socket

import pytest

from device_agent import DeviceAgent
from helpers import run, wait_for
from service_client import ServiceClient
from devstreams.transport.pump import TCP_WRITE_HIGH
from devstreams.transport.stream import pipe_tcp

MiB = 1 << 20


@pytest.mark.timeout(90)
def test_a_stalled_tcp_reader_holds_bounded_memory_and_then_gets_every_byte(hub):
    """The device sends 48 MiB into a stream whose TCP side does not read: the pump stops reading
    the stream (so the gateway and the device are held back by flow control), its TCP buffer stays
    near its high-water mark, and once the reader reads, every byte arrives in order."""
    payload = os.urandom(48 * MiB)
    sent = {"bytes": 0}

    async def firehose(request):
        async with await request.accept() as stream:
            view = memoryview(payload)
            for offset in range(0, len(view), MiB):
                await stream.send(view[offset:offset + MiB])
                sent["bytes"] = offset + MiB
            await stream.send_eof()
            await stream.recv()          # until the service side ends

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    async def main():
        loop = asyncio.get_running_loop()
        async with DeviceAgent(hub.add_device("firehose"), firehose, ca_file=hub.ca_file), \
                ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
            await wait_for(lambda: "firehose" in hub.hub.controller.online_devices, what="agent online")
            stream = await (await svc.create_stream("firehose", "data")).open()
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            far, _ = await loop.sock_accept(listener)
            far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            piping = asyncio.create_task(pipe_tcp(stream, reader, writer))
            ws = stream._ws
            await wait_for(lambda: ws.pump is not None and ws.pump._ws_held, timeout=20,
                           what="the pump to stop reading the stream")
            assert ws.passing, "whole binary frames still go through websockets' parser"
            await asyncio.sleep(1.0)
            held_at = sent["bytes"]
            buffered = writer.transport.get_write_buffer_size()
            assert buffered <= TCP_WRITE_HIGH + 2 * MiB, f"the pump buffered {buffered} B for a stalled reader"
            await asyncio.sleep(1.0)
            assert sent["bytes"] == held_at, "the device must be held back while the TCP side does not read"
            assert held_at < len(payload), "the whole payload fit in buffers: the test proves nothing"
            # now read everything: all of it, in order, then a clean end
            got = hashlib.sha256()
            total = 0
            far.setblocking(False)
            while True:
                chunk = await loop.sock_recv(far, 1 << 18)
                if not chunk:
                    break
                got.update(chunk)
                total += len(chunk)
            far.close()
            assert await asyncio.wait_for(piping, 20) is True, "the stream should end cleanly"
            return total, got.hexdigest()

    try:
        total, digest = run(main(), timeout=80)
    finally:
        listener.close()
    assert total == len(payload)
    assert digest == hashlib.sha256(payload).hexdigest()


@pytest.mark.timeout(60)
def test_bytes_the_tcp_side_sent_before_the_pump_took_over_go_first(hub):
    """A TCP client speaks first (an SSH banner) while the stream is still being set up."""
    received = bytearray()

    async def collect(request):
        async with await request.accept() as stream:
            async for chunk in stream:
                received.extend(chunk)

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    async def main():
        loop = asyncio.get_running_loop()
        async with DeviceAgent(hub.add_device("early"), collect, ca_file=hub.ca_file), \
                ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
            await wait_for(lambda: "early" in hub.hub.controller.online_devices, what="agent online")
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            far, _ = await loop.sock_accept(listener)
            await loop.sock_sendall(far, b"SSH-2.0-early\r\n")
            far.shutdown(socket.SHUT_WR)                         # and its EOF too, before the pump
            await asyncio.sleep(0.2)
            stream = await (await svc.create_stream("early", "data")).open()
            assert await asyncio.wait_for(pipe_tcp(stream, reader, writer), 20) is True
            far.close()
            await wait_for(lambda: bytes(received) == b"SSH-2.0-early\r\n", what="the banner at the device")

    try:
        run(main(), timeout=50)
    finally:
        listener.close()


def test_websockets_masks_and_unmasks_with_its_c_extension():
    """RFC 6455 makes clients mask every frame: websockets' C ``apply_mask`` does it at ~6 GB/s here,
    its pure-Python fallback at ~0.1 GB/s (docs/performance.md). A packaging change that loses the
    extension would make every byte of every stream 50 times dearer to mask."""
    import types

    import websockets.frames
    assert isinstance(websockets.frames.apply_mask, types.BuiltinFunctionType), websockets.frames.apply_mask
