"""The stream object both SDKs hand out, and the helper that joins it to a TCP connection.

A ``Stream`` is one side's WebSocket to the gateway, speaking ``wire.streamproto``:
binary messages are data, the text message ``eof`` ends this direction, and the
close code says how the stream ended.  ``recv()`` returns ``b""`` at the end of
data (the peer sent ``eof`` or closed cleanly) and raises ``StreamClosedError``
when the stream broke (peer lost, peer never came, lifetime reached).
"""

import asyncio
import contextlib
import logging
import ssl

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .errors import (HubUnavailableError, LimitExceededError, StreamClosedError, StreamError, TokenError)
from .streamproto import (CHUNK_BYTES, CLOSE_NORMAL, CLOSE_PEER_CLOSED,
                          CLOSE_REASONS, EOF, MAX_MESSAGE_BYTES)

log = logging.getLogger(__name__)

# Close codes after which the data that arrived is complete: the peer ended on purpose.
CLEAN_ENDS = {CLOSE_NORMAL, CLOSE_PEER_CLOSED}
READ_BYTES = 256 * 1024


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
                await self._ws.send(view[offset:offset + CHUNK_BYTES])
        except ConnectionClosed as exc:
            raise self._closed_error(exc) from None
        self.bytes_sent += len(view)

    async def send_eof(self) -> None:
        """No more data from this side; the peer can still send (TCP half-close)."""
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            await self._ws.send(EOF)
        except ConnectionClosed as exc:
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
        await self._ws.close(CLOSE_NORMAL)

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
        return exc.rcvd is not None and exc.rcvd.code in CLEAN_ENDS

    @staticmethod
    def _closed_error(exc: ConnectionClosed) -> StreamClosedError:
        if exc.rcvd is None:
            return StreamClosedError("the connection to the gateway was lost", code=None)
        code, reason = exc.rcvd.code, exc.rcvd.reason or CLOSE_REASONS.get(exc.rcvd.code, "")
        if code in CLEAN_ENDS:
            return StreamClosedError(f"the stream was closed ({reason or 'normal close'})", code, reason)
        return StreamClosedError(f"the stream ended: {reason or f'close code {code}'}", code, reason)


async def open_stream(url: str, token: str, *, ssl_context: ssl.SSLContext | None, open_timeout: float = 30.0,
                      ping_interval: float | None = 20.0, ping_timeout: float | None = 20.0,
                      max_queue: int = 8, write_limit: int = 256 * 1024) -> Stream:
    """Open one side of a stream at the gateway; map refusals to our errors with the gateway's reason."""
    try:
        ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"}, ssl=ssl_context,
                           compression=None, max_size=MAX_MESSAGE_BYTES, max_queue=max_queue,
                           write_limit=write_limit, open_timeout=open_timeout, ping_interval=ping_interval,
                           ping_timeout=ping_timeout, user_agent_header="devstreams")
    except InvalidStatus as exc:
        status = exc.response.status_code
        reason = exc.response.body.decode(errors="replace").strip() if exc.response.body else f"HTTP {status}"
        if status in (401, 403):
            raise TokenError(f"the gateway refused the stream: {reason}", status) from None
        if status == 503:
            raise LimitExceededError(f"the gateway is at capacity: {reason}") from None
        raise StreamError(f"the gateway refused the stream (HTTP {status}): {reason}") from None
    except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
        raise HubUnavailableError(f"cannot reach the gateway at {url.split('/streams/')[0]}: "
                                  f"{exc or type(exc).__name__}") from None
    return Stream(ws)


async def pipe_tcp(stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Join a stream and a TCP connection both ways until both directions end.

    TCP EOF becomes ``send_eof``; the stream's end of data becomes ``write_eof``,
    so half-closed protocols (``ssh`` with ``exit``, HTTP/1.0) finish cleanly.
    A broken side aborts the other; no task outlives this call.
    """
    async def tcp_to_stream() -> None:
        while data := await reader.read(READ_BYTES):
            await stream.send(data)
        await stream.send_eof()

    async def stream_to_tcp() -> None:
        async for data in stream:
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    up = asyncio.create_task(tcp_to_stream())
    down = asyncio.create_task(stream_to_tcp())
    try:
        pending = {up, down}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in done if not t.cancelled() and t.exception() is not None]
            if failed:
                exc = failed[0].exception()
                log.info("stream ended: %s", exc)
                break
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        with contextlib.suppress(Exception):
            await stream.close()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


__all__ = ["Stream", "open_stream", "pipe_tcp"]
