"""The WebSocket connections streams run on: websockets' own, plus liveness that spares slow peers.

websockets' keepalive is switched off (``ping_interval=None``) wherever a stream
WebSocket is made, and these subclasses run the rule of ``devstreams.wire.liveness``
instead: every side sends a heartbeat ping each interval, counts any bytes that
arrive as a sign of life, and stops counting silence while websockets has paused
reading (its receive queue is full because our consumer is slow).  The pause
and resume callbacks websockets hands its message assembler are wrapped to
learn about it.

Stream connections are made with ``close_timeout=None``: a clean close waits
for the peer to read everything before the close frame, however slowly; the
liveness rule, which keeps running while the connection is closing, is what
cuts a peer that died meanwhile.  (A fixed close timeout reset slow readers at
the very end of a transfer, discarding their last bytes.)

Heartbeat pings carry a fixed payload and are not registered as websockets
pings: their pongs are ignored as unsolicited (so none accumulate while a peer
is paused), but they still arrive, and any arrival counts.  A peer of another
implementation answers pings automatically, so it passes too whenever it reads.
"""

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.frames import DATA_OPCODES, CloseCode, apply_mask
from websockets.protocol import SERVER, State
from websockets.streams import StreamReader

from devstreams.transport.passthrough import HAND, PASS, scan
from devstreams.wire.liveness import Liveness

log = logging.getLogger(__name__)

HEARTBEAT = b"devstreams"
# where websockets' parser waits between frames, and inside one (_LivenessMixin._start_passing)
_AT_EOF = StreamReader.at_eof.__code__
_READ_EXACT = StreamReader.read_exact.__code__
KEEPALIVE_PROBES = 3


def enable_tcp_keepalive(sock, idle: float, interval: float, probes: int = KEEPALIVE_PROBES) -> None:
    """Kernel keepalive: an idle connection to a host that stopped answering ends on its own."""
    if sock is None:
        return
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", probes)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), max(1, int(value))))
    for level, option, value in options:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(level, option, value)


def unread_bytes(sock) -> int:
    """Bytes the kernel holds for us that we have not read yet (0 if unknown)."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return struct.unpack("i", buf)[0]
    except (OSError, AttributeError, ValueError):
        return 0


def take_over_receiving(connection, deliver) -> None:
    """The caller handles this connection's incoming frames itself from now on (in its
    ``process_event``): ``deliver`` gets the frames websockets queued so far, in order, and
    reading never pauses for websockets' receive queue again (the gateway's relay, the
    single port's MQTT over WebSocket)."""
    assembler = connection.recv_messages
    queued = assembler.frames.queue
    while queued:
        deliver(queued.popleft())
    _never_pause(assembler)


def _never_pause(assembler) -> None:
    assembler.high = assembler.low = None
    if assembler.paused:
        assembler.paused = False
        assembler.resume()


def _drop(frame) -> None:
    """Where data frames go once this side has closed."""


def _no_flow_control() -> None:
    """A closed connection's receive queue neither pauses nor resumes reading."""


class _LivenessMixin:
    """Adds ``start_liveness(interval, timeout)`` to a websockets asyncio connection."""

    liveness: Liveness | None = None
    _liveness_timer: asyncio.TimerHandle | None = None   # the next liveness check (a timer, not a task)
    pump = None    # a devstreams.transport.pump.Pump that takes this connection's data frames itself
    passing = False   # whole binary frames skip websockets' parser (devstreams.transport.passthrough)
    _partial: list | None = None   # while passing: the pieces of a frame not complete yet
    _partial_size = 0                # their bytes
    _partial_need = 0                # the bytes that complete that frame (0: its header is not complete)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        assembler = self.recv_messages
        pause, resume = assembler.pause, assembler.resume

        def paused() -> None:
            if self.liveness is not None:
                self.liveness.pause(self.loop.time())
            pause()

        def resumed() -> None:
            if self.liveness is not None:
                self.liveness.resume(self.loop.time())
            resume()

        assembler.pause, assembler.resume = paused, resumed

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """websockets' close, after which incoming data is dropped instead of queued.

        Whoever closes reads no more; if data from the peer kept queueing, reading
        would pause and the peer's close frame, behind that data, would never be
        read: with no close timeout, both sides would wait for each other forever.
        Dropping it is what TCP does with data that arrives for a closed socket.
        """
        self._stop_receiving()
        await super().close(code, reason)

    def _stop_receiving(self) -> None:
        self.recv_messages.put = _drop
        _never_pause(self.recv_messages)

    def data_received(self, data: bytes) -> None:
        if self.liveness is not None:
            self.liveness.heard(self.loop.time())
        if self.passing:
            self._pass_frames(data)
        elif self.takes_data():
            self._start_passing(data)
        else:
            super().data_received(data)
        self.read_done()

    # -- who takes the data frames: a pump here; the gateway's relay overrides these three -------

    def takes_data(self) -> bool:
        """Someone takes this connection's data frames as they arrive (nothing is queued for recv)."""
        return self.pump is not None

    def take_data(self, payload) -> None:
        """A whole binary message's payload (bytes or a memoryview into the read) for the taker."""
        self.pump.from_ws_data(payload)

    def read_done(self) -> None:
        """Every frame of one read was taken."""
        if self.pump is not None:
            self.pump.flush_down()   # the data frames of this read leave together

    # -- whole binary frames skip websockets' parser (devstreams.transport.passthrough) ----------

    def _start_passing(self, data: bytes) -> None:
        """Give websockets' parser the bytes that end the frame it is inside, then pass frames here.

        Frames can be read here only from a frame boundary on, and when a pump or the
        relay takes over, data may already be flowing: websockets' parser may be inside
        a frame, and a bulk transfer's reads seldom end between two frames.  websockets
        has no public word for where its parser stands, so it is read from its
        generators: between frames the innermost one waits in ``StreamReader.at_eof``
        with nothing buffered; inside a frame, in ``StreamReader.read_exact(n)`` for
        ``n`` bytes, of which its reader holds some.  It is fed exactly the missing
        bytes until it stands between frames (a header, a mask, a payload: a few
        steps).  If its generators ever look different, or the frame does not end in
        this read, websockets parses the read as before and the next read tries again
        (``tests/test_relay.py`` and ``tests/test_pump.py`` check that passing starts).
        """
        view, pos = memoryview(data), 0
        protocol = self.protocol
        while protocol.state is State.OPEN and not protocol.extensions:
            waiting_in = protocol.parser   # the innermost generator it waits in
            while getattr(waiting_in, "gi_yieldfrom", None) is not None:
                waiting_in = waiting_in.gi_yieldfrom
            code = getattr(waiting_in, "gi_code", None)
            if code is _AT_EOF and not protocol.reader.buffer:
                self.passing = True
                if pos < len(view):
                    self._pass_frames(view[pos:])
                return
            wanted = waiting_in.gi_frame.f_locals.get("n") if code is _READ_EXACT else None
            missing = wanted - len(protocol.reader.buffer) if isinstance(wanted, int) else 0
            if not 0 < missing <= len(view) - pos:
                break
            super().data_received(bytes(view[pos:pos + missing]))
            pos += missing
        if pos < len(view):
            super().data_received(bytes(view[pos:]))

    def _pass_frames(self, data: bytes | memoryview) -> None:
        """Whole binary frames of ``data`` to ``take_data``; every other frame to websockets."""
        if self._partial:
            # A frame's pieces are kept until it is complete and joined once: each byte is copied
            # at most twice, however small the reads (concatenating each read would be quadratic).
            self._partial.append(data)
            self._partial_size += len(data)
            if self._partial_size < self._partial_need:
                return
            data, self._partial, self._partial_size = b"".join(self._partial), None, 0
        view, pos, size = memoryview(data), 0, len(data)
        protocol = self.protocol
        masked = protocol.side is SERVER
        while pos < size:
            kind, start, end = scan(view, pos, protocol.max_size, protocol.cur_size is not None, masked)
            if kind is PASS:
                pos = end
                self.take_data(apply_mask(view[start:end], view[start - 4:start]) if masked else view[start:end])
            elif kind is HAND:
                # websockets' parser stands at this frame's start: it parses exactly this frame (or fails
                # the connection for a header it refuses), answers pings and closes, and hands data
                # frames on through process_event.
                super().data_received(bytes(view[pos:end]))
                pos = end
                if protocol.state is not State.OPEN:   # closing or failed: websockets reads the rest
                    self.passing = False
                    if pos < size:
                        super().data_received(bytes(view[pos:]))
                    return
            else:  # WAIT: at most one frame (max_size plus its header) is kept
                self._partial, self._partial_size = [bytes(view[pos:])], size - pos
                self._partial_need = end - pos if end else 0
                return

    def process_event(self, event) -> None:
        if self.pump is not None and event.opcode in DATA_OPCODES:
            self.pump.from_ws(event)
        else:
            super().process_event(event)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.pump is not None:
            self.pump.ws_writable(False)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.pump is not None:
            self.pump.ws_writable(True)

    def send_data(self) -> None:
        writes = self.protocol.writes
        if not writes:
            return
        # Every frame we write is a sign of life to the peer: no heartbeat is due while data flows.
        if self.liveness is not None:
            self.liveness.sent(self.loop.time())
        if all(writes):   # frames only, no end-of-stream marker: straight to the transport, in one write
            # Joined into one buffer: a TLS transport encrypts each buffer it is given on its own
            # (asyncio's and uvloop's ``writelines`` too), so a 64 KiB frame given alone ends in a
            # record of a few bytes; given together, the frames of a write fill 16 KiB records
            # across their boundaries.  The relay and the pumps queue a frame's header and its
            # (already copied) payload as two pieces, so this join is the only copy either way.
            self.protocol.writes = []
            self.transport.write(writes[0] if len(writes) == 1 else b"".join(writes))
        else:
            super().send_data()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        # A closed connection must be freed by reference counting alone.  A stream's connection
        # lives long enough to reach the cyclic GC's oldest generation, which a hub with many
        # devices collects rarely; each connection left to it holds its TLS buffers and OpenSSL
        # state (~0.7 MiB per bulk stream: +290 MiB of RSS after 200 bulk streams, issue 10).
        # So break the cycles through this object once it is closed:
        # - the liveness timer (its callback is a method of this connection),
        # - our pause/resume wrappers on the receive queue (closures over self),
        # - websockets' own logger adapter, whose ``extra`` names this connection
        #   (websockets/asyncio/connection.py, ``Connection.__init__``, "Inject reference to
        #   this instance in the protocol's logger").
        timer, self._liveness_timer = self._liveness_timer, None
        if timer is not None:
            timer.cancel()
        self.pump = None   # (the pump learns of the end through connection_lost_waiter)
        self.recv_messages.pause = self.recv_messages.resume = _no_flow_control
        adapter = self.logger
        if isinstance(adapter, logging.LoggerAdapter):
            adapter.extra = {}

    def start_liveness(self, interval: float | None, timeout: float | None) -> None:
        """Heartbeats every ``interval``; the peer is lost after ``interval + timeout`` of silence."""
        if not interval or not timeout or self.liveness is not None:
            return
        now = self.loop.time()
        self.liveness = Liveness(interval, timeout, now)
        if self.recv_messages.paused:
            self.liveness.pause(now)
        enable_tcp_keepalive(self.transport.get_extra_info("socket"), idle=interval, interval=timeout / 2)
        self._liveness_timer = self.loop.call_soon(self._check_liveness)

    def _check_liveness(self) -> None:
        """One liveness check; the next one is a timer (``loop.call_at``).

        A timer, not a task with a sleep loop: a task, its coroutine and the future of each
        sleep took about 1.5 KiB per connection, two per stream in the gateway (issue 14).
        """
        self._liveness_timer = None
        lv = self.liveness
        # Also while CLOSING: the closing handshake of a stream waits behind all the data still
        # in flight (no close timeout), so a slow peer gets everything and a dead one is cut here.
        if self.protocol.state not in (State.OPEN, State.CLOSING):
            return
        now = self.loop.time()
        if lv.lost(now):
            if unread_bytes(self.transport.get_extra_info("socket")) > 0:
                lv.heard(now)  # it spoke; our loop was just late to read it
            else:
                self._peer_lost(lv.limit)
                return
        if lv.heartbeat_due(now):
            lv.sent(now)
            self._send_heartbeat()
        if self.protocol.state in (State.OPEN, State.CLOSING):
            self._liveness_timer = self.loop.call_at(lv.next_check(self.loop.time()), self._check_liveness)

    def _send_heartbeat(self) -> None:
        """Queue a ping without waiting for the peer's window (a slow peer must not stall us).

        Not after our close frame: the peer, still open until it reads that frame, keeps
        sending its own heartbeats, which is all the liveness rule needs.
        """
        if self.protocol.state is not State.OPEN:
            return
        self.protocol.send_ping(HEARTBEAT)
        try:
            self.send_data()
        except OSError:
            self.transport.abort()

    def _peer_lost(self, silence: float) -> None:
        log.info("no sign of life from the peer for %.0f s while reading: connection lost", silence)
        self.protocol.fail(CloseCode.INTERNAL_ERROR, "peer silent: connection lost")
        with contextlib.suppress(OSError):
            self.send_data()
        self.transport.abort()


class LiveClientConnection(_LivenessMixin, ClientConnection):
    """websockets' client connection with devstreams liveness."""


class LiveServerConnection(_LivenessMixin, ServerConnection):
    """websockets' server connection with devstreams liveness."""
