"""Join a stream and a TCP connection at the protocol level: no coroutine, queue or lock per chunk.

``pipe_tcp`` (devstreams.transport.stream) used to run two coroutines per connection,
each chunk going through a ``StreamReader``, websockets' message queue and
``recv()``/``send()`` with their futures, locks and drains.  Here both directions
run inside the transports' callbacks, as the gateway's relay does
(``streamgw/relay.py``):

- TCP -> stream: ``data_received`` of the TCP connection's protocol (``_TcpSide``,
  swapped in with ``transport.set_protocol``) frames the bytes as binary messages
  of at most ``CHUNK_BYTES`` and writes them to the WebSocket's transport at once;
- stream -> TCP: each data frame of a read is written to the TCP transport, all
  frames of one read in one ``writelines``; whole binary frames skip websockets'
  parser and leave as they lie in the read (devstreams.transport.passthrough).

Backpressure, as TCP would have it: when the WebSocket's transport buffers more than
its write limit, the TCP side stops reading (``pause_reading``) until it drains;
when the TCP side cannot take more (its transport's high-water mark), the WebSocket
stops reading, and its silence does not count against the peer's liveness meanwhile.
So memory per stream stays bounded by the two write limits, whatever the speeds.

Ends keep ``streamproto``'s contract, unchanged from the coroutine pumps:
TCP EOF -> ``eof`` text message; ``eof`` (or a clean close) -> ``write_eof`` on TCP
(half-close); both directions ended -> clean close of both.  Anything abnormal --
the stream broke, the TCP connection was reset or failed, data from TCP after the
stream was closed, the pump cancelled -- resets the TCP connection (RST) and aborts
the stream (4005) with the reason.
"""

from __future__ import annotations

import asyncio
import logging

from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State

from devstreams.transport.passthrough import client_frame_parts
from devstreams.transport.wslink import take_over_receiving
from devstreams.wire.errors import StreamClosedError
from devstreams.wire.streamproto import CHUNK_BYTES, CLOSE_NORMAL, CLOSE_PEER_CLOSED, CLOSE_REASONS, EOF

log = logging.getLogger(__name__)

# Close codes after which the data that arrived is complete: the peer ended on purpose.
CLEAN_ENDS = {CLOSE_NORMAL, CLOSE_PEER_CLOSED}
EOF_BYTES = EOF.encode()
MAX_CONTROL_TEXT = 64          # bytes of a text message kept (control messages are short)
TCP_WRITE_HIGH = 256 * 1024    # the TCP side's write buffer before the stream stops reading


def ended_cleanly(rcvd: Close | None) -> bool:
    """The peer's close frame says the data that arrived is complete."""
    return rcvd is not None and rcvd.code in CLEAN_ENDS


def closed_error(rcvd: Close | None) -> StreamClosedError:
    """How a stream that ended with the peer's close frame ``rcvd`` (None: lost) reads to the user."""
    if rcvd is None:
        return StreamClosedError("the connection to the gateway was lost", code=None)
    code, reason = rcvd.code, rcvd.reason or CLOSE_REASONS.get(rcvd.code, "")
    if code in CLEAN_ENDS:
        return StreamClosedError(f"the stream was closed ({reason or 'normal close'})", code, reason)
    return StreamClosedError(f"the stream ended: {reason or f'close code {code}'}", code, reason)


class _TcpSide(asyncio.Protocol):
    """The TCP connection's protocol while it is pumped: every callback goes to the pump."""

    def __init__(self, pump: Pump):
        self.pump = pump

    def data_received(self, data: bytes) -> None:
        self.pump.from_tcp(data)

    def eof_received(self) -> bool:
        self.pump.tcp_eof()
        return True            # keep our direction open: TCP half-close

    def pause_writing(self) -> None:
        self.pump.tcp_writable(False)

    def resume_writing(self) -> None:
        self.pump.tcp_writable(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pump.tcp_lost(exc)


class Pump:
    """One stream joined to one TCP transport; ``ended`` resolves to None (clean) or the failure."""

    def __init__(self, stream, tcp: asyncio.Transport):
        self.stream = stream
        self.ws = stream._ws
        self.tcp = tcp
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future = self.loop.create_future()
        self.tcp_closed: asyncio.Future = self.loop.create_future()   # the TCP side's connection_lost came
        self.up_done = False       # TCP said EOF and the stream was told
        self.down_done = False     # the stream said EOF (or closed cleanly) and TCP was told
        self.tcp_gone = False      # the TCP connection is closed: nothing more can be written to it
        self._binary = True        # the message under way is binary (its continuation frames are data)
        self._text = bytearray()   # the text message under way (``eof``)
        self._down: list[bytes] = []   # data frames of this read, written together
        self._ws_held = False      # we paused the WebSocket's reading: TCP cannot take more

    # -- start ----------------------------------------------------------------------------------

    def attach(self, reader: asyncio.StreamReader) -> None:
        """Take over both connections; what ``reader`` already buffered goes first.

        The TCP connection was made with asyncio's streams (``start_server`` /
        ``open_connection``), whose reader may already hold bytes (an SSH client's banner
        arrives while the stream is being negotiated) or an EOF.  ``StreamReader`` has no
        public way to hand those over without awaiting, so its ``_buffer`` and ``_eof``
        are read here, in the same callback as ``set_protocol``: no byte can arrive
        between the two.
        """
        ws = self.ws
        buffered, eof = bytes(reader._buffer), reader._eof
        reader._buffer.clear()
        failed = reader.exception()
        self.tcp.set_protocol(_TcpSide(self))
        self.tcp.set_write_buffer_limits(high=TCP_WRITE_HIGH)
        if getattr(reader, "_paused", False):
            reader._paused = False
            self.tcp.resume_reading()
        ws.pump = self
        take_over_receiving(ws, self.from_ws)
        self.flush_down()
        ws.connection_lost_waiter.add_done_callback(lambda _: self.ws_lost())
        if failed is not None:
            self.fail(failed)
            return
        if self.tcp.is_closing():   # closed before we took over: no connection_lost will reach us
            self.tcp_gone = True
            self.tcp_closed.set_result(None)
        if buffered:
            self.from_tcp(buffered)
        if eof:
            self.tcp_eof()
        if ws.paused:
            self.ws_writable(False)

    # -- TCP -> stream --------------------------------------------------------------------------

    def from_tcp(self, data: bytes) -> None:
        if self.ended.done():
            return
        ws = self.ws
        if ws.protocol.state is not State.OPEN:
            # The stream is closing or closed: like writing to a closed socket.
            self.fail(self._closed_error())
            return
        # Whole binary frames, as ``protocol.send_binary`` would queue them (the state is OPEN, and
        # a pump never sends fragments), header and payload as two pieces that ``send_data`` joins
        # with the rest of the write (devstreams.transport.passthrough; never an empty piece: a TCP
        # read has data).
        writes = ws.protocol.writes
        if len(data) <= CHUNK_BYTES:
            writes.extend(client_frame_parts(data))
        else:
            view = memoryview(data)
            for offset in range(0, len(view), CHUNK_BYTES):
                writes.extend(client_frame_parts(view[offset:offset + CHUNK_BYTES]))
        self.stream.bytes_sent += len(data)
        self._write_ws()

    def tcp_eof(self) -> None:
        if self.ended.done() or self.up_done:
            return
        self.up_done = True
        if self.ws.protocol.state is State.OPEN:
            self.ws.protocol.send_text(EOF_BYTES)
            self._write_ws()
        elif not self._closed_cleanly():
            self.fail(self._closed_error())
            return
        self._maybe_done()

    def _write_ws(self) -> None:
        ws = self.ws
        try:
            ws.send_data()
        except OSError:
            ws.transport.abort()   # ws_lost follows and says why

    def ws_writable(self, writable: bool) -> None:
        """The WebSocket's transport is above (False) or back below (True) its write limit."""
        if self.ended.done() or self.tcp_gone:
            return
        if writable:
            self.tcp.resume_reading()
        else:
            self.tcp.pause_reading()

    # -- stream -> TCP --------------------------------------------------------------------------

    def from_ws_data(self, payload) -> None:
        """A whole binary message that skipped websockets' parser (``_LivenessMixin._pass_frames``)."""
        self._binary = True
        self._text.clear()
        self._data(payload)

    def from_ws(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is not Opcode.CONT:
            self._binary = opcode is Opcode.BINARY
            self._text.clear()
        if self._binary:
            self._data(frame.data)
            return
        if len(self._text) < MAX_CONTROL_TEXT:
            self._text += frame.data[:MAX_CONTROL_TEXT]
        if frame.fin:
            if self._text == EOF_BYTES:
                self.flush_down()
                self._peer_eof()
            else:
                log.debug("ignoring unknown control message %r", bytes(self._text[:32]))
            self._text.clear()

    def _data(self, data) -> None:
        """Stream data for TCP, written at the end of this read (``flush_down``)."""
        if self.ended.done() or self.down_done:
            return                 # after the end of data: dropped, as TCP drops data for a closed socket
        self.stream.bytes_received += len(data)
        self._down.append(data)

    def flush_down(self) -> None:
        """Write the data frames of this read to TCP (called after each WebSocket read)."""
        if not self._down:
            return
        chunks, self._down = self._down, []
        if self.ended.done():
            return
        if self.tcp_gone:
            self.fail(ConnectionResetError("the TCP connection was lost"))
            return
        self.tcp.writelines(chunks)

    def _peer_eof(self) -> None:
        if self.down_done:
            return
        self.down_done = True
        if not self.tcp_gone and self.tcp.can_write_eof():
            self.tcp.write_eof()
        self._maybe_done()

    def tcp_writable(self, writable: bool) -> None:
        """TCP's transport is above (False) or back below (True) its high-water mark."""
        ws = self.ws
        if writable == (not self._ws_held):
            return
        self._ws_held = not writable
        if ws.protocol.state is State.CLOSED:
            return
        now = self.loop.time()
        if writable:
            ws.transport.resume_reading()
            if ws.liveness is not None:
                ws.liveness.resume(now)
        else:
            ws.transport.pause_reading()
            if ws.liveness is not None:
                ws.liveness.pause(now)   # it is us who do not read: the peer's silence does not count

    # -- ends -----------------------------------------------------------------------------------

    def ws_lost(self) -> None:
        """The WebSocket is closed: a clean close is the end of data, anything else a failure."""
        self.flush_down()
        if self.ended.done():
            return
        if not self._closed_cleanly():
            self.fail(self._closed_error())
            return
        self._peer_eof()
        # Our direction: TCP's EOF ends it cleanly, more data from TCP is a failure (from_tcp).

    def tcp_lost(self, exc: Exception | None) -> None:
        self.tcp_gone = True
        if not self.tcp_closed.done():
            self.tcp_closed.set_result(None)
        if self.ended.done():
            return
        self.fail(exc or ConnectionResetError("the TCP connection was closed before its end of data"))

    def _maybe_done(self) -> None:
        if self.up_done and self.down_done and not self.ended.done():
            self.ended.set_result(None)

    def fail(self, failure: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_result(failure)
        self._release_ws()

    def _release_ws(self) -> None:
        if self._ws_held:
            self.tcp_writable(True)

    def _closed_cleanly(self) -> bool:
        return ended_cleanly(self.ws.protocol.close_rcvd)

    def _closed_error(self) -> StreamClosedError:
        return closed_error(self.ws.protocol.close_rcvd)
