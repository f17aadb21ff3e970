"""The stream object both SDKs hand out, and the helper that joins it to a TCP connection.

A ``Stream`` is one side's WebSocket to the gateway, speaking ``devstreams.wire.streamproto``:
binary messages are data, the text message ``eof`` ends this direction, and the
close code says how the stream ended.  ``recv()`` returns ``b""`` at the end of
data (the peer sent ``eof`` or closed cleanly) and raises ``StreamClosedError``
when the stream broke (peer lost, peer never came, lifetime reached).
"""

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State

from devstreams.wire.errors import (HubUnavailableError, LimitExceededError, ProxyError, StreamClosedError,
                                    StreamError, TokenError)
from devstreams.transport.mqtt import describe_connect_error
from devstreams.transport.proxy import Proxy, ProxyChoice, ProxyTunnelError, open_tunnel_async
from devstreams.wire.streamproto import (CHUNK_BYTES, CLOSE_ABORTED, CLOSE_NORMAL, CLOSE_REASONS, EOF, MAX_MESSAGE_BYTES)
from devstreams.transport.pump import Pump, closed_error, ended_cleanly
from devstreams.transport.wslink import LiveClientConnection

log = logging.getLogger(__name__)

ABORT_TIMEOUT = 5.0  # an abnormal end waits this long for the closing handshake, then cuts


class Stream:
    def __init__(self, ws: ClientConnection):
        self._ws = ws
        self.bytes_sent = 0
        self.bytes_received = 0
        self._eof_sent = False
        self._eof_received = False

    # -- sending ---------------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Send bytes (split into messages of at most CHUNK_BYTES); waits while the peer is slow."""
        if self._eof_sent:
            raise StreamError("cannot send after send_eof()")
        view = memoryview(data)
        try:
            for offset in range(0, len(view), CHUNK_BYTES):
                chunk = view[offset:offset + CHUNK_BYTES]
                if not self._send_now(chunk):
                    await self._ws.send(chunk)
        except ConnectionClosed as exc:
            raise self._closed_error(exc) from None
        self.bytes_sent += len(view)

    def _send_now(self, chunk: memoryview) -> bool:
        """Queue one message at once when websockets' ``send()`` would not wait for anything.

        ``send()`` runs an async context manager per message (an async generator, registered
        with the loop's asyncgen hooks) around the same two calls; at thousands of messages a
        second that wrapper was a tenth of a process's CPU (py-spy, bench --streams).  Whenever
        it could wait -- the connection not open, its buffer above the write limit, a
        fragmented send under way -- or writing fails, ``send()`` itself runs instead.
        """
        ws = self._ws
        if ws.protocol.state is not State.OPEN or ws.paused or ws.fragmented_send_waiter is not None:
            return False
        ws.protocol.send_binary(chunk)
        try:
            ws.send_data()
        except OSError:
            ws.transport.abort()   # send() below then waits for the end and raises ConnectionClosed
            return False
        return True

    async def send_eof(self) -> None:
        """No more data from this side; the peer can still send (TCP half-close)."""
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            await self._ws.send(EOF)
        except ConnectionClosed as exc:
            if self._clean(exc):  # the peer already ended on purpose: nothing of ours is lost
                return
            raise self._closed_error(exc) from None

    # -- receiving -------------------------------------------------------------------------------

    async def recv(self) -> bytes:
        """The next chunk of data, or b"" at the end of data."""
        while not self._eof_received:
            try:
                message = await self._ws.recv()
            except ConnectionClosed as exc:
                if self._clean(exc):
                    self._eof_received = True
                    return b""
                raise self._closed_error(exc) from None
            if isinstance(message, str):
                if message == EOF:
                    self._eof_received = True
                    return b""
                log.debug("ignoring unknown control message %r", message[:32])
                continue
            self.bytes_received += len(message)
            return message
        return b""

    def __aiter__(self):
        return self._chunks()

    async def _chunks(self):
        while chunk := await self.recv():
            yield chunk

    # -- ending ----------------------------------------------------------------------------------

    async def close(self) -> None:
        """End the stream cleanly: everything sent so far is all there is."""
        await self._ws.close(CLOSE_NORMAL)

    async def abort(self, reason: str = "", timeout: float = ABORT_TIMEOUT) -> None:
        """End the stream abnormally: the peer learns it broke (its local proxy resets its TCP side).

        Nothing in flight matters any more, so the closing handshake is bounded.
        """
        try:
            await asyncio.wait_for(self._ws.close(CLOSE_ABORTED, (reason or CLOSE_REASONS[CLOSE_ABORTED])[:120]),
                                   timeout)
        except asyncio.TimeoutError:
            self._ws.transport.abort()

    async def __aenter__(self) -> "Stream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self._ws.close_reason

    @staticmethod
    def _clean(exc: ConnectionClosed) -> bool:
        return ended_cleanly(exc.rcvd)

    @staticmethod
    def _closed_error(exc: ConnectionClosed) -> StreamClosedError:
        return closed_error(exc.rcvd)


async def open_stream(url: str, token: str, *, ssl_context: ssl.SSLContext | None, open_timeout: float = 30.0,
                      ping_interval: float | None = 10.0, ping_timeout: float | None = 10.0,
                      max_queue: int = 8, write_limit: int = 256 * 1024,
                      proxy: ProxyChoice | Proxy | None = None) -> Stream:
    """Open one side of a stream at the gateway; map refusals to our errors with the gateway's reason.

    Liveness is ``devstreams.transport.wslink``'s (a slow peer is never cut), not websockets' keepalive.
    ``proxy``: a client's ProxyChoice (resolved here for the gateway's host and port, NO_PROXY
    included), a Proxy, or None to connect directly.  websockets' own proxy lookup is always off
    (``proxy=None``): the choice is ours, the same as for MQTT (devstreams.transport.proxy).
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    chosen = proxy.for_target(host, port) if isinstance(proxy, ProxyChoice) else proxy
    sock = None
    try:
        if chosen is not None:
            # The tunnel first (bounded by open_timeout), then TLS and the upgrade inside it.
            sock = await open_tunnel_async(chosen, host, port, open_timeout)
            where = {"sock": sock, "server_hostname": host}
        else:
            where = {"proxy": None}
        ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"}, ssl=ssl_context,
                           compression=None, max_size=MAX_MESSAGE_BYTES, max_queue=max_queue,
                           write_limit=write_limit, open_timeout=open_timeout, ping_interval=None,
                           ping_timeout=None, close_timeout=None, user_agent_header="devstreams",
                           create_connection=LiveClientConnection, **where)
    except ProxyTunnelError as exc:
        raise ProxyError(f"stream gateway {url.split('/streams/')[0]}: {exc}", str(exc.proxy), exc.status) from None
    except InvalidStatus as exc:
        _close_quietly(sock)
        status = exc.response.status_code
        reason = exc.response.body.decode(errors="replace").strip() if exc.response.body else f"HTTP {status}"
        if status in (401, 403):
            raise TokenError(f"the gateway refused the stream: {reason}", status) from None
        if status == 503:
            raise LimitExceededError(f"the gateway is at capacity: {reason}") from None
        raise StreamError(f"the gateway refused the stream (HTTP {status}): {reason}") from None
    except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
        _close_quietly(sock)
        cause, why = describe_connect_error(exc, host, port)
        if cause == "unknown":
            why = f"cannot reach the gateway at {url.split('/streams/')[0]}: {exc or type(exc).__name__}"
        if chosen is not None:
            why += f" (through proxy {chosen})"
        raise HubUnavailableError(f"stream gateway {url.split('/streams/')[0]}: {why}") from None
    except BaseException:
        _close_quietly(sock)
        raise
    ws.start_liveness(ping_interval, ping_timeout)
    return Stream(ws)


def _close_quietly(sock: socket.socket | None) -> None:
    """A tunnel socket websockets did not take over (a failed handshake) is ours to close."""
    if sock is not None and sock.fileno() != -1:
        with contextlib.suppress(OSError):
            sock.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close a TCP connection with a reset (RST), not a FIN: the peer must not see a clean end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def pipe_tcp(stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Join a stream and a TCP connection both ways until both directions end; True if clean.

    TCP EOF becomes the stream's ``eof``; the stream's end of data becomes ``write_eof``,
    so half-closed protocols (``ssh`` with ``exit``, HTTP/1.0) finish cleanly and
    the TCP side gets a FIN.  Anything else is abnormal, as TCP would see it: a
    stream that broke resets the TCP connection (RST), and a TCP connection that
    was reset (or failed) aborts the stream so the far side resets too.  The bytes
    move in the transports' callbacks (``devstreams.transport.pump``); this
    coroutine only waits for the end and closes both sides.
    """
    pump = Pump(stream, writer.transport)
    failure: BaseException | None = None
    try:
        pump.attach(reader)
        failure = await pump.ended
    except asyncio.CancelledError:
        failure = asyncio.CancelledError()
        raise
    finally:
        if failure is None:
            with contextlib.suppress(Exception):
                await stream.close()
            writer.transport.close()
        else:
            why = _failure_reason(failure)
            log.info("stream ended abnormally (%s): resetting the TCP connection", why)
            reset(writer)
            with contextlib.suppress(Exception):
                await stream.abort(why)
        # The StreamWriter's own wait_closed() would wait for a protocol that no longer
        # gets callbacks (the pump swapped it): wait for the pump's TCP side instead.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(pump.tcp_closed), ABORT_TIMEOUT)
    return failure is None


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, StreamError):
        return str(exc)
    if isinstance(exc, asyncio.CancelledError):
        return "the local proxy is shutting down"
    if isinstance(exc, ConnectionResetError):
        return "the TCP connection was reset"
    if isinstance(exc, OSError):
        return f"the TCP connection failed: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


__all__ = ["Stream", "open_stream", "pipe_tcp", "reset"]
