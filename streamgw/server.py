"""The streaming gateway: a TLS WebSocket server that pairs the two sides of each stream.

Tokens are checked in ``process_request`` so a refusal is an HTTP 401/403 with
the reason as body, before any WebSocket exists; nothing a refused client does
reaches a stream that is already flowing.  The first side to arrive waits for
its peer up to ``peer_timeout``; the second side's handler runs the relay.
"""

import asyncio
import logging
import ssl
import time
from http import HTTPStatus

from websockets.asyncio.server import Server, ServerConnection
from websockets.server import ServerProtocol
from websockets.http11 import Request, Response

from devstreams.wire import streamtoken
from devstreams.wire.errors import TokenError
from devstreams.wire.events import EventSink, GatewayRefused, StreamClosed, StreamOpened
from devstreams.wire.frontdoor import Route
from devstreams.wire.messages import GatewayControl
from devstreams.wire.streamproto import CLOSE_GOING_AWAY, CLOSE_PEER_TIMEOUT, CLOSE_REVOKED, stream_id_from_path
from devstreams.wire.streamtoken import Side
from devstreams.transport.glibc import heap_for_read_buffers
from devstreams.observe.http import HttpServer, RoutingProtocol
from devstreams.observe.metrics import gateway_refusal_label

from .pairing import Pairing, Refusal, StreamEntry
from .relay import STREAM_READ_BUFFER, RelayConnection, StreamRecord, StreamTLSProtocol, close_within, relay
from .settings import GatewaySettings

log = logging.getLogger(__name__)


class _Meeting:
    """Per stream: the sockets, the moment both are there, and the end of the relay.

    ``paired`` and ``done`` are futures (set once), not ``asyncio.Event``s: an Event keeps an
    empty deque of about 760 bytes for its waiters (issue 14).
    """

    __slots__ = ("sockets", "paired", "done", "service_host")

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.sockets: dict[Side, RelayConnection] = {}
        self.paired: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.service_host = ""   # the service side's address (for the audit log), taken when it arrives

    @staticmethod
    def set(future: asyncio.Future) -> None:
        if not future.done():
            future.set_result(None)


class Gateway:
    def __init__(self, settings: GatewaySettings, signing_key: bytes, ssl_context: ssl.SSLContext | None,
                 events: EventSink | None = None):
        self.settings = settings
        self._key = signing_key
        self._ssl = ssl_context
        # Stream opened/closed go to one sink (devstreams.wire.events); the hub's controller or a standalone
        # gateway's reporter subscribe to it.
        self.events = events if events is not None else EventSink()
        self._pairing = Pairing(settings.max_streams)
        self._meetings: dict[str, _Meeting] = {}
        self._server: Server | None = None
        # The TLS read buffer every stream connection of this gateway reads into (one event loop:
        # one read at a time; devstreams.transport.tls set_tls_read_buffer): 256 KiB, for bulk.
        self._read_buffer = memoryview(bytearray(STREAM_READ_BUFFER))
        self.port = 0
        self.public_url = settings.public_url or ""
        # Plain HTTP on this gateway's own listener (/metrics; the hub's dashboard): set before start().
        # Without it only stream upgrades are served there.
        self.http: HttpServer | None = None

    async def start(self, listener: asyncio.Server | None = None) -> None:
        """Listen on the settings' host and port, or serve what ``listener`` hands over.

        ``listener``: the hub's single TLS port (``broker/frontdoor.py``), which routes
        stream upgrades here through ``protocol_factory``; the gateway then has no
        socket of its own and its public URL names that port.
        """
        s = self.settings
        heap_for_read_buffers()
        # websockets' documented way to serve connections it did not accept itself: our own
        # Server, a factory that names it, the asyncio server attached with wrap().
        self._server = Server(self._handler, process_request=self._check, server_header="devstreams-gateway",
                              open_timeout=s.open_timeout)
        if listener is None:
            loop = asyncio.get_running_loop()
            factory = self._routing_protocol if self._ssl is None else self._tls_protocol
            listener = await loop.create_server(factory, s.host, s.port, backlog=s.listen_backlog)
        self._server.wrap(listener)
        self.port = listener.sockets[0].getsockname()[1]
        scheme = "wss" if self._ssl else "ws"
        self.public_url = (s.public_url or f"{scheme}://localhost:{{port}}").format(port=self.port).rstrip("/")
        log.info("gateway listening on %s:%s as %s", s.host, self.port, self.public_url)

    def _tls_protocol(self) -> StreamTLSProtocol:
        """TLS on our own listener: asyncio's protocol in slots, on any event loop (issue 14).

        What ``create_server(ssl=...)`` would build, but never uvloop's TLS protocol, which
        keeps a private 256 KiB read buffer per connection (two per stream) and BIOs that
        cannot be released (devstreams.transport.tls ``SlottedSSLProtocol``).
        """
        return StreamTLSProtocol(asyncio.get_running_loop(), self._routing_protocol(), self._ssl, None,
                                 server_side=True, ssl_handshake_timeout=self.settings.open_timeout)

    def _routing_protocol(self) -> RoutingProtocol:
        """A connection on our own listener: a stream upgrade, or HTTP (devstreams.observe.http)."""
        routes = {Route.STREAMS: self.protocol_factory}
        if self.http is not None:
            routes[Route.HTTP] = self.http.protocol_factory
        return RoutingProtocol(routes, self.settings.open_timeout)

    def protocol_factory(self) -> RelayConnection:
        """The protocol of one stream WebSocket (what websockets' ``serve`` would build)."""
        s = self.settings
        assert self._server is not None, "start() first"
        return RelayConnection(ServerProtocol(max_size=s.max_message_bytes), self._server,
                               ping_interval=None, ping_timeout=None,  # devstreams.transport.wslink's liveness instead
                               close_timeout=None,  # see devstreams.transport.wslink; relay bounds abnormal closes
                               max_queue=s.max_queue, write_limit=s.write_limit, read_buffer=self._read_buffer)

    async def stop(self) -> None:
        if self._server is None:
            return
        closing = [close_within(ws, CLOSE_GOING_AWAY, "gateway shutting down", self.settings.close_timeout)
                   for meeting in list(self._meetings.values()) for ws in meeting.sockets.values()]
        await asyncio.gather(*closing, return_exceptions=True)
        self._server.close()  # any other socket (mid-handshake) gets 1001 too
        try:
            await asyncio.wait_for(self._server.wait_closed(), self.settings.close_timeout + 1)
        except asyncio.TimeoutError:
            log.warning("some connections did not close in time: cutting them")
            for ws in list(self._server.handlers):
                ws.transport.abort()
        self._server = None

    @property
    def active_streams(self) -> int:
        return len(self._pairing)

    # -- admission (HTTP upgrade) ----------------------------------------------------------------

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        stream_id = stream_id_from_path(request.path)
        if stream_id is None:
            return self._refuse(connection, HTTPStatus.NOT_FOUND, "not a stream URL: expected /streams/<id>")
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return self._refuse(connection, HTTPStatus.UNAUTHORIZED, "missing Authorization: Bearer <token>")
        try:
            claims = streamtoken.verify(self._key, header[7:].strip(), audience=self.public_url,
                                        stream_id=stream_id)
            self._pairing.reserve(claims, connection, time.time())
        except (TokenError, Refusal) as exc:
            log.info("refused a socket for stream %s: %s", stream_id[:8], exc)
            return self._refuse(connection, getattr(exc, "status", 401), str(exc))
        # If the upgrade never completes, give the side back after the open timeout.
        asyncio.get_running_loop().call_later(self.settings.open_timeout + 1, self._unclaimed, connection)
        return None

    def _refuse(self, connection: ServerConnection, status: int, reason: str) -> Response:
        """An HTTP refusal with the reason as body; the sink hears it (metrics count refusals by reason)."""
        self.events.emit(GatewayRefused(gateway_refusal_label(reason), int(status)))
        return connection.respond(status, f"{reason}\n")

    def _unclaimed(self, connection: ServerConnection) -> None:
        found = self._pairing.find(connection)
        if found is not None:
            self._pairing.release(*found)

    # -- streams ---------------------------------------------------------------------------------

    async def _handler(self, ws: RelayConnection) -> None:
        found = self._pairing.find(ws)
        if found is None:  # reserved too long ago; should not happen
            await close_within(ws, CLOSE_PEER_TIMEOUT, "stream reservation expired", self.settings.close_timeout)
            return
        entry, side = found
        ws.handshake_done()
        ws.start_liveness(self.settings.ping_interval, self.settings.ping_timeout)
        self._pairing.attach(entry, side)
        meeting = self._meetings.setdefault(entry.stream_id, _Meeting())
        meeting.sockets[side] = ws
        if side is Side.SERVICE:
            meeting.service_host = _host_of(ws.remote_address)
        if len(meeting.sockets) == 1:
            self.events.emit(StreamOpened(entry.stream_id))
            await self._wait_for_peer(entry, side, ws, meeting)
        else:
            meeting.set(meeting.paired)
            await self._run(entry, meeting)

    async def _wait_for_peer(self, entry: StreamEntry, side: Side, ws: RelayConnection,
                             meeting: _Meeting) -> None:
        """Hold the first side until its peer comes.

        A side that writes and closes before its peer arrives is kept (its data
        stays queued, bounded by max_queue) and relayed when the peer comes, as
        TCP would deliver it.
        """
        timeout = self.settings.peer_timeout
        try:
            await asyncio.wait_for(asyncio.shield(meeting.paired), timeout)
        except asyncio.TimeoutError:
            peer = side.peer.value
            reason = f"the {peer} did not connect within {timeout:g} s"
            if ws.close_code is None:
                await close_within(ws, CLOSE_PEER_TIMEOUT, reason[:120], self.settings.close_timeout)
            self._end(entry, StreamRecord(entry.stream_id, entry.device_id, entry.stream_name,
                                          started=time.time(), close_reason=reason))
            return
        await meeting.done  # the peer's handler relays; keep this socket open till then

    async def _run(self, entry: StreamEntry, meeting: _Meeting) -> None:
        record = StreamRecord(entry.stream_id, entry.device_id, entry.stream_name, started=time.time())
        log.info("stream %s (%s/%s) paired", entry.stream_id[:8], entry.device_id, entry.stream_name)
        entry.record = record
        try:
            await relay(meeting.sockets[Side.DEVICE], meeting.sockets[Side.SERVICE], record,
                        self.settings.max_lifetime, self.settings.close_timeout)
        finally:
            meeting.set(meeting.done)
            self._end(entry, record)

    def _end(self, entry: StreamEntry, record: StreamRecord) -> None:
        if not self._pairing.finish(entry, time.time()):
            return
        meeting = self._meetings.pop(entry.stream_id, None)
        service_host = meeting.service_host if meeting is not None else ""
        record.close_reason = entry.revoked or record.close_reason
        log.info("stream %s ended after %.1f s: %s (to device %d B, to service %d B)", entry.stream_id[:8],
                 record.duration, record.close_reason, record.bytes_to_device, record.bytes_to_service)
        self.events.emit(StreamClosed(stream_id=record.stream_id, device=record.device_id, name=record.stream_name,
                                      reason=record.close_reason, bytes_to_device=record.bytes_to_device,
                                      bytes_to_service=record.bytes_to_service, duration=record.duration,
                                      service_host=service_host))

    # -- revocation (the hub's orders: device disabled, key rotated, operator close) --------------

    def apply_control(self, control: GatewayControl) -> int:
        """End the streams a control message names; return how many were open here."""
        closed = 0
        for stream_id in control.streams:
            closed += self.close_stream(stream_id, control.reason)
        if control.device:
            for entry in self._pairing.streams_of(control.device):
                closed += self.close_stream(entry.stream_id, control.reason)
        return closed

    def close_stream(self, stream_id: str, reason: str) -> bool:
        """End a stream now with CLOSE_REVOKED and ``reason``; refuse its unused tokens from now on.

        True if the stream was open (or half open) here.  A stream id this gateway
        never saw is remembered as ended, so a token minted for it is refused.
        """
        reason = _close_reason(reason or "stream closed by the hub")
        entry = self._pairing.revoke(stream_id, time.time())
        if entry is None or entry.finished:
            return False
        entry.revoked = reason
        log.info("closing stream %s (%s/%s): %s", stream_id[:8], entry.device_id, entry.stream_name, reason)
        meeting = self._meetings.get(stream_id)
        sockets = list(meeting.sockets.values()) if meeting is not None else []
        for ws in sockets:
            task = asyncio.ensure_future(close_within(ws, CLOSE_REVOKED, reason, self.settings.close_timeout))
            _closing.add(task)
            task.add_done_callback(_closing.discard)
        if meeting is None or not meeting.paired.done():
            # No relay runs: end it here (a waiting side's handler returns once ``done`` is set).
            if meeting is not None:
                meeting.set(meeting.paired)
                meeting.set(meeting.done)
            self._end(entry, StreamRecord(entry.stream_id, entry.device_id, entry.stream_name,
                                          started=entry.created, close_reason=reason))
        return True

    def open_streams(self) -> list[dict]:
        """What is open here now, with live byte counts (for ``devstreams streams list``)."""
        now = time.time()
        rows = []
        for entry in self._pairing.streams():
            record = entry.record
            rows.append({"stream_id": entry.stream_id, "device": entry.device_id, "name": entry.stream_name,
                         "age_s": round(now - entry.created, 1), "paired": entry.paired,
                         "bytes_to_device": getattr(record, "bytes_to_device", 0),
                         "bytes_to_service": getattr(record, "bytes_to_service", 0),
                         "gateway": self.public_url})
        return rows


_closing: set[asyncio.Future] = set()  # close handshakes under way (a task needs a reference)

def _close_reason(text: str, limit: int = 123) -> str:
    """A WebSocket close reason is at most 123 bytes of UTF-8."""
    data = text.encode()[:limit]
    return data.decode(errors="ignore")


def _host_of(address) -> str:
    """The IP of a peer address tuple (for the audit log), '' when the socket did not say."""
    return str(address[0])[:64] if isinstance(address, tuple) and address else ""
