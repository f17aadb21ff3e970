"""Relay two WebSockets frame by frame until one ends, then end the other with a reason.

Frames are relayed at the protocol level (websockets' sans-I/O ``Protocol`` inside
its asyncio connection): once the two sides of a stream are linked, every data
frame one side's parser yields in ``data_received`` is serialized onto the other
side's protocol there and then, and all frames of one read go to the other
side's transport in one write.  No message is reassembled, no coroutine runs per
message; the per-message ``send()`` machinery (its lock, context and drain)
was about half of the relay's CPU per message (docs/performance.md).  Frames
pass unchanged: fragments stay fragments, text frames (the ``eof`` control) stay
text, sizes are bounded by each side's ``max_size``.

Backpressure, as TCP would have it: when one side's transport buffers more than
its ``write_limit`` (a slow reader), asyncio calls its ``pause_writing`` and the
relay stops reading the other side's socket (``hold``), so TCP flow control
slows the sender; ``resume_writing`` reads again.  Silence of a held side does
not count against its liveness (it is us who do not read).  Frames that arrived
before the peer did (the first side waits in websockets' receive queue) are
relayed first, in order.  Frames for a side that is closing or closed are
dropped, as TCP drops data for a closed socket.

How a stream ends: a clean close (1000/1001) reaches the other side as
``CLOSE_PEER_CLOSED``, behind every frame relayed before it; an abort keeps its
code and reason; anything else (a lost or silent side) is ``CLOSE_PEER_LOST``,
so the other side's local proxy resets its TCP connection.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from dataclasses import dataclass

from websockets.frames import DATA_OPCODES, Frame, Opcode
from websockets.protocol import State

from devstreams.transport.passthrough import binary_header
from devstreams.transport.tls import SlottedSSLProtocol, bio_capacity, release_bio_buffers, set_tls_read_buffer
from devstreams.transport.wslink import LiveServerConnection, take_over_receiving
from devstreams.wire.streamproto import CLOSE_ABORTED, CLOSE_LIFETIME, CLOSE_PEER_CLOSED, CLOSE_PEER_LOST, CLOSE_REASONS

NORMAL_CLOSES = {1000, 1001}
BIO_KEPT = 16 * 1024   # a memory BIO grown beyond this is given back once the connection is quiet
STREAM_READ_BUFFER = 256 * 1024   # bytes a stream connection reads at a time (asyncio's SSLProtocol.max_size)


class StreamTLSProtocol(SlottedSSLProtocol):
    """The TLS of the gateway's own listener: asyncio's, small per connection (issue 14).

    Its first read buffer is small: the handshake's records fit, and once the connection
    is a stream it reads into the gateway's shared 256 KiB buffer (``RelayConnection``).
    """

    __slots__ = ()
    first_read_size = 4 * 1024

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # asyncio appends to, clears, indexes [0] and deletes [0] of its write backlog, which
        # holds at most the chunk being encrypted (writes go straight on into the outgoing
        # MemoryBIO): an empty list takes 56 bytes, an empty deque about 760 (as the gate does).
        if isinstance(self._write_backlog, collections.deque) and not self._write_backlog:
            self._write_backlog = []


@dataclass
class StreamRecord:
    stream_id: str
    device_id: str
    stream_name: str
    started: float                 # wall clock
    duration: float = 0.0
    bytes_to_service: int = 0      # device -> service
    bytes_to_device: int = 0       # service -> device
    close_reason: str = ""


class RelayConnection(LiveServerConnection):
    """A gateway-side stream WebSocket that, once linked, hands its data frames to its peer.

    Until ``link`` it is an ordinary websockets connection (the handshake, and a
    first side waiting for its peer, queue frames as usual).

    Its own attributes live in slots: websockets' connection already sets about 28
    instance attributes, and CPython shares an instance dict's keys among the instances
    of a class only up to 30 keys; beyond them each connection had a dict of its own
    (about 1.6 KiB; issue 14).
    """

    __slots__ = ("peer", "record", "to_service", "held", "_binary", "read_buffer", "passing", "_partial",
                 "_partial_size", "_partial_need")

    def __init__(self, *args, read_buffer: memoryview | None = None, **kwargs) -> None:
        self.peer: RelayConnection | None = None
        self.record: StreamRecord | None = None
        self.to_service = False       # this side is the device: its frames travel to the service
        self.held = False             # reading paused because the peer's transport is full
        self._binary = True           # the message under way is binary (its continuation frames count as bytes)
        self.read_buffer = read_buffer   # the gateway's shared TLS read buffer
        self.passing = False          # linked, and whole binary frames skip websockets (devstreams.transport.wslink)
        self._partial, self._partial_size, self._partial_need = None, 0, 0
        super().__init__(*args, **kwargs)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # No read buffer of its own (2 x 256 KiB per stream before; devstreams.transport.tls).
        if self.read_buffer is not None:
            set_tls_read_buffer(transport, len(self.read_buffer), shared=self.read_buffer)
        # websockets appends to, removes from and iterates its drain waiters, nothing else: an
        # empty list takes 56 bytes, an empty deque about 760 (issue 14).
        if isinstance(self.drain_waiters, collections.deque) and not self.drain_waiters:
            self.drain_waiters = []

    def handshake_done(self) -> None:
        """Forget the upgrade's headers and response: about 3 KiB per connection (issue 14).

        Nothing reads them once the connection is open (the token was checked in
        ``process_request``).  The request object itself stays: websockets' parser
        generator holds it in a local variable for the connection's life, so its
        headers are emptied instead (``Headers.clear``).
        """
        if self.request is not None:
            self.request.headers.clear()
        self.response = None
        self.release_tls_buffers()

    def release_tls_buffers(self, above: int = 0) -> int:
        """Free what OpenSSL's two memory BIOs grew to, if nothing waits in them (issue 14).

        A memory BIO keeps its largest size for good (devstreams.transport.tls
        ``release_bio_buffers``): after the handshake that is the server's first flight
        (certificate chain included); after a burst of data, a whole read or write of
        up to a few hundred KiB.  Called once the WebSocket is open, and by the liveness
        timer for buffers larger than ``above`` bytes; returns how many were freed.
        """
        proto = getattr(self.transport, "_ssl_protocol", None)
        incoming, outgoing = getattr(proto, "_incoming", None), getattr(proto, "_outgoing", None)
        if not isinstance(incoming, ssl.MemoryBIO) or not isinstance(outgoing, ssl.MemoryBIO):
            return 0
        if above:
            bios = [b for b in (incoming, outgoing) if (bio_capacity(b) or 0) > above]
            return release_bio_buffers(*bios) if bios else 0
        return release_bio_buffers(incoming, outgoing)

    def link(self, peer: RelayConnection, record: StreamRecord, to_service: bool) -> None:
        """From now on, relay this side's data frames to ``peer`` (frames queued so far first)."""
        self.peer, self.record, self.to_service = peer, record, to_service
        take_over_receiving(self, self._forward)
        # From here on nothing is queued for ``recv`` (frames go to the peer, or are dropped after
        # a close): the receive queue's empty deque (about 760 bytes) becomes an empty list.
        frames = getattr(self.recv_messages, "frames", None)
        if isinstance(getattr(frames, "queue", None), collections.deque) and not frames.queue:
            frames.queue = []
        peer.flush()
        if peer.paused:
            self.hold()

    # -- frames in ----------------------------------------------------------------------------

    def process_event(self, event) -> None:
        if self.peer is None:
            super().process_event(event)
        elif event.opcode in DATA_OPCODES:
            self._forward(event)
        elif event.opcode is Opcode.PONG:
            self.acknowledge_pings(bytes(event.data))

    def _forward(self, frame: Frame) -> None:
        peer = self.peer
        if peer.protocol.state is not State.OPEN:
            return  # the other side is closing or gone: dropped, as TCP drops data for a closed socket
        if frame.opcode is not Opcode.CONT:
            self._binary = frame.opcode is Opcode.BINARY
        if self._binary:
            self._count(len(frame.data))
        # The source's parser has checked the frame sequence (a continuation follows a
        # fragment, sizes within max_size); the frame goes on as it came.
        peer.protocol.send_frame(frame)

    # the taker of this side's data frames is the peer (devstreams.transport.wslink)

    def takes_data(self) -> bool:
        return self.peer is not None

    def take_data(self, payload) -> None:
        """A whole binary frame from this side: to the peer, unchanged, behind a server header."""
        peer = self.peer
        if peer.protocol.state is not State.OPEN:
            return   # the other side is closing or gone: dropped, as TCP drops data for a closed socket
        self._count(len(payload))
        writes = peer.protocol.writes
        writes.append(binary_header(len(payload)))
        if payload:   # (an empty piece would read as websockets' end-of-stream marker in send_data)
            writes.append(payload)

    def _count(self, data_bytes: int) -> None:
        """Stream data from this side, for the record (binary payloads only: ``eof`` is control)."""
        if self.to_service:
            self.record.bytes_to_service += data_bytes
        else:
            self.record.bytes_to_device += data_bytes

    def read_done(self) -> None:
        peer = self.peer
        if peer is not None and peer.protocol.writes:
            peer.flush()

    # -- frames out ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what the protocol has queued; a transport that fails is cut (its relay ends)."""
        try:
            self.send_data()
        except (OSError, RuntimeError):
            self.transport.abort()

    # -- flow control ---------------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.peer is not None:
            self.peer.hold()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.peer is not None:
            self.peer.release()

    def hold(self) -> None:
        """Stop reading: the peer cannot take more.  Silence does not count meanwhile."""
        if self.held or self.protocol.state is State.CLOSED:
            return
        self.held = True
        self.transport.pause_reading()
        if self.liveness is not None:
            self.liveness.pause(self.loop.time())

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.protocol.state is not State.CLOSED:
            self.transport.resume_reading()
        if self.liveness is not None:
            self.liveness.resume(self.loop.time())

    def _check_liveness(self) -> None:
        super()._check_liveness()
        # Each liveness check (every few seconds) also gives back what a burst of data grew
        # OpenSSL's memory BIOs to (up to a whole read or write each): a stream that moved
        # bulk data and then went quiet keeps no such buffers.  Only empty BIOs are touched.
        if self.protocol.state is State.OPEN:
            self.release_tls_buffers(above=BIO_KEPT)

    def _stop_receiving(self) -> None:
        # Whoever closes reads no more (devstreams.transport.wslink): read on, so that the
        # peer's close frame, behind its data, is read; that data is dropped.
        super()._stop_receiving()
        self.release()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        peer, self.peer = self.peer, None  # no cycle between the two sides outlives the stream
        if peer is not None:
            peer.release()  # nothing goes to this side any more: the peer reads (and drops) again


def _ended_normally(ws: RelayConnection) -> bool:
    rcvd = ws.protocol.close_rcvd
    return rcvd is not None and rcvd.code in NORMAL_CLOSES


async def close_within(ws, code: int, reason: str, timeout: float) -> None:
    """An abnormal close: the receiver resets anyway, so nothing in flight is worth waiting for."""
    try:
        await asyncio.wait_for(ws.close(code, reason), timeout)
    except asyncio.TimeoutError:
        ws.transport.abort()


async def relay(device: RelayConnection, service: RelayConnection, record: StreamRecord,
                max_lifetime: float = 0, close_timeout: float = 2.0) -> None:
    """Relay until one side ends; close the other; fill in ``record``.

    A clean end closes the other side without a time limit: the close frame waits
    behind every byte still on its way to a slow reader (liveness cuts a dead one).
    """
    start = time.monotonic()
    ends = {device.connection_lost_waiter: (device, service, "device"),
            service.connection_lost_waiter: (service, device, "service")}
    try:
        device.link(service, record, to_service=True)
        service.link(device, record, to_service=False)
        done, _ = await asyncio.wait(ends, timeout=max_lifetime or None, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            record.close_reason = CLOSE_REASONS[CLOSE_LIFETIME]
            await asyncio.gather(close_within(device, CLOSE_LIFETIME, record.close_reason, close_timeout),
                                 close_within(service, CLOSE_LIFETIME, record.close_reason, close_timeout))
            return
        # Both may be gone at once (a side's close and the other's loss): the one that closed ends it.
        ended, other, who = min((ends[w] for w in done), key=lambda e: not _ended_normally(e[0]))
        rcvd = ended.protocol.close_rcvd
        if _ended_normally(ended):
            code, record.close_reason = CLOSE_PEER_CLOSED, f"{who} closed the stream"
            reason = CLOSE_REASONS[code]
        elif rcvd is not None and rcvd.code == CLOSE_ABORTED:  # pass the side's own reason on
            code, reason = CLOSE_ABORTED, f"{who} aborted: {rcvd.reason or 'no reason given'}"[:120]
            record.close_reason = reason
        else:
            code, record.close_reason = CLOSE_PEER_LOST, f"{who} connection lost"
            reason = CLOSE_REASONS[code]
        if code == CLOSE_PEER_CLOSED:
            await other.close(code, reason)
        else:
            await close_within(other, code, reason, close_timeout)
    finally:
        record.duration = time.monotonic() - start
