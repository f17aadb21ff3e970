"""The broker's front door: TLS, then authentication, then amqtt.

amqtt 0.12 deletes an existing session as soon as it reads a clean-session
CONNECT, before any authentication, so a stranger could make a device deaf by
connecting with its client id and a wrong password.  The gate therefore owns the
TLS listener: it reads the CONNECT packet itself, checks the credentials, and
only then hands the connection (CONNECT bytes replayed) to amqtt's ``external``
listener.  Refusals get a CONNACK with a return code and never reach amqtt.
The gate also remembers live connections so the hub can drop a device that was
disabled, removed or re-keyed.

Takeover (a second login with the same client id).  amqtt 0.12 does not close
the older connection when a client id logs in again: the old client stays
connected and receives nothing (a deaf device shown online), and a clean-session
CONNECT deletes the session the old one still uses.  Like other IoT hubs, the
newest connection wins: once a CONNECT for a live client id has passed
authentication (a wrong password never disturbs the live one), the gate
disconnects the older connection and waits, bounded by ``takeover_timeout``,
until amqtt has completely finished with it (its handler returned, its last
will published) before the new CONNECT reaches amqtt.  MQTT 3.1.1 has no
server DISCONNECT with a reason, so before closing a displaced *device* the gate
writes one complete QoS 0 PUBLISH on ``devstreams/devices/<id>/notice`` straight
to the old connection (paho hands any PUBLISH to ``on_message`` even without a
subscription; writes from this event loop are whole packets, amqtt writes whole
packets too) and then closes it gracefully, so the notice arrives before the
end of the stream.  The displaced agent logs one line and backs off.

After CONNECT every byte from the client passes a ``PacketGuard``
(broker/packetguard.py) before amqtt reads it: an oversized packet is refused
from its fixed header, before its body is read, by closing that connection.

Logins are admitted at a bounded rate (``max_logins_per_second``, a token bucket):
after a hub restart a whole fleet reconnects at once, and authenticating and
handing thousands of sessions to amqtt in the same second would stall everything,
presence and stream requests included.  A CONNECT over the rate gets CONNACK 3
("server unavailable") before any credential is checked; clients back off with
jitter (devstreams.transport.mqtt) and come back spread out.  Hub-internal
logins (its controller) are never refused this way.

Connections that have not logged in yet are at most
``max_unauthenticated_connections``; beyond that the oldest of them is dropped
first, so a flood of idle TLS connections cannot keep a device from logging in
and never touches a logged-in one.
"""

import asyncio
import collections
import heapq
import itertools
import json
import logging
import resource
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from amqtt.adapters import BufferReader, StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.publish import PublishPacket

from devstreams.transport.tls import SlottedSSLProtocol, release_bio_buffers, set_tls_read_buffer
from devstreams.wire import sas
from devstreams.wire.errors import TokenError
from devstreams.wire.events import EventSink, LoginRefused
from devstreams.wire.throttle import LogLimiter
from devstreams.wire.topics import CONTROLLER_USER, Role, device_notice

from .amqtt_fixes import WaiterList
from .auth import (CONNACK_BAD_CREDENTIALS, CONNACK_IDENTIFIER_REJECTED, CONNACK_NOT_AUTHORIZED, Authenticator,
                   AuthRefused, Identity)
from .limits import TokenBucket
from .packetguard import PacketGuard, check_will

log = logging.getLogger(__name__)

LISTENER = "default"  # the amqtt listener of type "external" the gate feeds
CONNECT_PACKET_TYPE = 1
TLS_READ_BUFFER = 4 * 1024  # MQTT control traffic is small; OpenSSL buffers partial records
READ_CHUNK = 16 * 1024      # what the guarded reader asks the socket for at a time
CONNACK_SERVER_UNAVAILABLE = 3
PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"
PING_WRITE_BACKLOG = 64 * 1024  # bytes queued towards a client before the gate waits to answer its pings
FD_HEADROOM = 100           # files the hub needs besides MQTT connections (registry, gateway, logs)


class GateTLSProtocol(SlottedSSLProtocol):
    """asyncio's TLS protocol in slots (devstreams.transport.tls) with a 4 KiB first read buffer (issue 10).

    Its read size is the gate's ``TLS_READ_BUFFER`` from the start, so a handshake no longer
    allocates (and frees) asyncio's 256 KiB first read buffer: ``set_tls_read_buffer``
    swaps in the shared one.
    """

    __slots__ = ()
    first_read_size = TLS_READ_BUFFER


def slim_stream_deques(writer: asyncio.StreamWriter) -> None:
    """Swap two always-empty-when-idle asyncio deques of a connection for lists (issue 10: 1.5 KiB per device).

    ``StreamReaderProtocol._drain_waiters`` (streams.py: append/remove/iterate) and
    ``SSLProtocol._write_backlog`` (sslproto.py: append/clear/``[0]``/``del [0]``; it holds
    at most the chunk being encrypted, since writes go straight on into the outgoing
    MemoryBIO) are ``collections.deque``s, which take about 760 bytes even when empty; an
    empty list takes 56.  Only swapped when they are empty deques, as asyncio 3.11-3.13 has them.
    """
    protocol = getattr(writer, "_protocol", None)
    if isinstance(getattr(protocol, "_drain_waiters", None), collections.deque) and not protocol._drain_waiters:
        protocol._drain_waiters = WaiterList()
    proto = getattr(writer.transport, "_ssl_protocol", None)
    if isinstance(getattr(proto, "_write_backlog", None), collections.deque) and not proto._write_backlog:
        proto._write_backlog = []


def release_tls_buffers(writer: asyncio.StreamWriter) -> int:
    """Free the handshake-sized buffers of a TLS connection's two memory BIOs (issue 10: ~1.8 KiB per device).

    Called once the CONNECT has been read: the BIOs then hold the client's hello and the
    server's first flight, the largest records a device connection ever carries; from here
    on they grow only as far as MQTT control packets need (devstreams.transport.tls).
    """
    proto = getattr(writer.transport, "_ssl_protocol", None)
    incoming, outgoing = getattr(proto, "_incoming", None), getattr(proto, "_outgoing", None)
    if not isinstance(incoming, ssl.MemoryBIO) or not isinstance(outgoing, ssl.MemoryBIO):
        return 0
    return release_bio_buffers(incoming, outgoing)


class _GuardedReader(StreamReaderAdapter):
    """What amqtt reads from: first the CONNECT the gate consumed, then client bytes that passed the guard.

    It reads only when amqtt asks (so TCP backpressure stays) and at most
    ``READ_CHUNK`` beyond what amqtt asked for.  On refusal it calls
    ``on_refuse(reason)`` once and from then on reports end of stream.

    A PINGREQ that arrives on its own (a whole read, at a packet boundary, with
    nothing buffered for amqtt: what every idle client sends each keepalive) is
    answered here with a PINGRESP and never reaches amqtt (issue 10).  In amqtt 0.12
    each one costs a fixed-header decode, a PACKET_RECEIVED event, a task for
    ``handle_pingreq`` (handler.py:514, broker_handler.py:111-112), a packet object
    and a ``drain()``: about a third of an idle hub's CPU.  amqtt's broker does nothing
    on a keepalive timeout (``BrokerProtocolHandler.handle_read_timeout`` is ``pass``),
    so it loses nothing by not seeing pings.  A PINGREQ within other bytes goes to
    amqtt as before.  While more than ``PING_WRITE_BACKLOG`` bytes wait to go out to a
    client that does not read, the gate waits before answering (as amqtt's ``drain``).
    ``pings`` counts the answered ones.
    """

    def __init__(self, prefix: bytes, reader: asyncio.StreamReader, guard: PacketGuard, on_refuse,
                 writer: asyncio.StreamWriter | None = None):
        super().__init__(reader)
        self._buf = bytearray(prefix)
        self._guard = guard
        self._on_refuse = on_refuse
        self._eof = False
        self._writer = writer
        self.pings = 0

    async def _fill(self) -> bool:
        while True:
            if self._eof:
                return False
            chunk = await self._reader.read(READ_CHUNK)
            if not chunk:
                self._eof = True
                return False
            lone_ping = chunk == PINGREQ and not self._buf and self._guard.at_boundary
            reason = self._guard.feed(chunk)
            if reason is not None:
                self._eof = True
                self._buf.clear()
                self._on_refuse(reason)
                return False
            if lone_ping and self._writer is not None:
                await self._pong()
                continue
            self._buf += chunk
            return True

    async def _pong(self) -> None:
        writer = self._writer
        if writer.is_closing():
            return
        writer.write(PINGRESP)
        self.pings += 1
        if writer.transport.get_write_buffer_size() > PING_WRITE_BACKLOG:
            try:
                await writer.drain()
            except ConnectionError:
                self._eof = True

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            if not self._buf:
                await self._fill()
        else:
            while len(self._buf) < n:
                if not await self._fill():
                    partial = bytes(self._buf)
                    self._buf.clear()
                    raise asyncio.IncompleteReadError(partial, n)
        if n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def feed_eof(self) -> None:
        self._eof = True
        super().feed_eof()


async def read_connect(reader: asyncio.StreamReader, limit: int) -> bytes:
    """Read exactly one MQTT packet (fixed header + remaining length + body)."""
    first = await reader.readexactly(1)
    if first[0] >> 4 != CONNECT_PACKET_TYPE:
        raise ValueError("first packet is not CONNECT")
    header = bytearray(first)
    length, multiplier = 0, 1
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        header.append(byte)
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            break
        multiplier *= 128
    else:
        raise ValueError("malformed remaining length")
    if length > limit:
        raise ValueError(f"CONNECT of {length} bytes exceeds {limit}")
    return bytes(header) + await reader.readexactly(length)


def nofile_target(soft: int, hard: int, needed: int) -> int:
    """The soft RLIMIT_NOFILE to ask for: the hard limit, or ``needed`` when the hard one is unlimited."""
    if soft == resource.RLIM_INFINITY:
        return soft
    if hard == resource.RLIM_INFINITY:
        return max(soft, needed)
    return max(soft, hard)


def raise_nofile_limit(max_connections: int) -> int:
    """Raise the soft open-file limit to the hard one; warn if it is still below what is needed.

    Every MQTT connection is a file descriptor; the default soft limit (often
    1024) would cap the hub far below ``max_connections`` with "Too many open files".
    """
    needed = max_connections + FD_HEADROOM
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = nofile_target(soft, hard, needed)
        if target != soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-file limit raised from %d to %d", soft, target)
            soft = target
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit: %s", exc)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("the open-file limit (%d) is below max_connections (%d) + %d: raise it "
                    "(ulimit -n, or LimitNOFILE= in the systemd unit) or lower max_connections",
                    soft, max_connections, FD_HEADROOM)
    return soft


def token_expiry(password: str | None) -> float:
    """When a login's SAS token runs out (epoch seconds); 0 for an unreadable one (checked at once)."""
    try:
        return float(sas.parse_token(password).expiry)
    except TokenError:
        return 0.0


def takeover_notice(device_id: str) -> bytes:
    """The one PUBLISH a displaced device receives before its connection closes."""
    payload = json.dumps({"event": "takeover",
                          "reason": f"another connection with device ID {device_id} took over"}).encode()
    return PublishPacket.build(device_notice(device_id), payload, None, False, 0, False).to_bytes()


@dataclass(slots=True)
class _Live:
    identity: Identity
    password: str
    writer: asyncio.StreamWriter
    task: asyncio.Task | None = None
    since: float = field(default_factory=time.monotonic)


# CONNACK return codes of refused logins -> the label metrics count them under.
AUTH_REFUSAL_LABELS = {CONNACK_BAD_CREDENTIALS: "bad-credentials", CONNACK_NOT_AUTHORIZED: "not-authorized",
                       CONNACK_IDENTIFIER_REJECTED: "identifier-rejected"}


class Gate:
    def __init__(self, broker: Broker, authenticator: Authenticator, *, max_connect_bytes: int = 8192,
                 connect_packet_timeout: float = 10.0, max_connections: int = 10000,
                 max_packet_bytes: int = 64 * 1024, max_retained_bytes: int = 1024,
                 takeover_timeout: float = 5.0, max_unauthenticated: int = 1000,
                 logins: TokenBucket | None = None, listen_backlog: int = 4096):
        self._broker = broker
        self._listen_backlog = listen_backlog
        self._auth = authenticator
        self._max_connect_bytes = max_connect_bytes
        self._connect_packet_timeout = connect_packet_timeout
        self._max_connections = max_connections
        self._max_packet_bytes = max_packet_bytes
        self._max_retained_bytes = max_retained_bytes
        self._takeover_timeout = takeover_timeout
        self._max_unauthenticated = max_unauthenticated
        self._server: asyncio.Server | None = None
        self._live: dict[str, _Live] = {}
        # (token expiry, n, client id, live) of every login, soonest first: the hub drops sessions
        # whose token ran out every second, and walking all of them each time was a third of the
        # hub's idle CPU at 5,000 devices (issue 10).  Entries of ended sessions are skipped when
        # they come up and dropped in bulk when they outnumber the live ones.
        self._expiries: list[tuple[float, int, str, _Live]] = []
        self._expiry_seq = itertools.count()
        self._handlers: set[asyncio.Task] = set()
        self._unauthenticated: dict[asyncio.Task, asyncio.StreamWriter] = {}  # oldest first
        self._shed_log = LogLimiter(60.0)
        self.shed = 0  # unauthenticated connections dropped to make room
        self._logins = logins
        self.busy = 0  # logins answered "server unavailable" over max_logins_per_second
        self.port = 0
        self._tls_buffer = memoryview(bytearray(TLS_READ_BUFFER))  # shared by every connection of this loop
        # TLS connections accepted so far.  Each handshake leaves ~15 KiB of freed memory (asyncio's
        # initial 256 KiB read buffer, OpenSSL's handshake state) that glibc keeps: the hub trims
        # the heap after logins (broker/memory.py), which takes an idle device from 62 to 48 KiB.
        self.accepted = 0
        # Refused logins go to this sink as LoginRefused (the hub's metrics subscribe): no counters here.
        self.events = EventSink()

    def _refused(self, reason: str) -> None:
        self.events.emit(LoginRefused(reason))

    def app_protocol(self) -> asyncio.StreamReaderProtocol:
        """The protocol of one MQTT connection once TLS is up: what the single port hands over."""
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=2 ** 16), self._on_client)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext, listener=None) -> None:
        """Listen for MQTT over TLS, or (``listener``: the hub's single port) take what it hands over.

        TLS runs in asyncio's ``SSLProtocol`` on every event loop (issue 10).  The hub runs on
        uvloop when it is installed (devstreams.cli), and uvloop's own TLS protocol gives every
        connection a 256 KiB read buffer of its own (uvloop/sslproto.pyx ``SSLProtocol.__cinit__``,
        ``SSL_READ_MAX_SIZE``) that Python cannot reach: its touched pages are about 5 KiB of
        RSS per idle device, and the gate could neither share a read buffer nor release the
        memory BIOs' handshake buffers there.  asyncio's protocol runs on uvloop's TCP
        transport as on its own (a buffered protocol; uvloop's transports have what it calls,
        ``_force_close`` included); the sockets, the event loop and the handshake work in
        OpenSSL stay uvloop's and OpenSSL's.
        """
        raise_nofile_limit(self._max_connections)
        if listener is not None:  # broker/frontdoor.py routes MQTT here through app_protocol
            self.port = listener.sockets[0].getsockname()[1]
            return
        # asyncio's default listen backlog is 100: in a reconnect storm the kernel then drops the
        # SYNs beyond it, and each dropped client waits a whole SYN retransmit (1 s, 3 s, 7 s ...)
        # before it is even seen -- while the hub idles.  This machine's counter stood at 573,658
        # "SYNs to LISTEN sockets dropped" (netstat -s) after earlier fleet benchmarks (issue 10).
        loop = asyncio.get_running_loop()

        def tls_protocol() -> GateTLSProtocol:
            # What asyncio.start_server(ssl=...) builds per connection, but always asyncio's own TLS
            # protocol (in slots: GateTLSProtocol), on any event loop (issue 10; see above).
            reader = asyncio.StreamReader(limit=2 ** 16, loop=loop)
            app = asyncio.StreamReaderProtocol(reader, self._on_client, loop=loop)
            return GateTLSProtocol(loop, app, ssl_context, None, server_side=True,
                                   ssl_handshake_timeout=self._connect_packet_timeout)
        self._server = await loop.create_server(tls_protocol, host, port, reuse_address=True,
                                                backlog=self._listen_backlog)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for live in list(self._live.values()):
            live.writer.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    @property
    def unauthenticated(self) -> int:
        return len(self._unauthenticated)

    def connected(self, role: Role | None = None) -> list[str]:
        return [cid for cid, live in self._live.items() if role is None or live.identity.role is role]

    def kick(self, reason_for: Callable[[Identity, str], str | None]) -> list[tuple[Identity, str]]:
        """Drop every live connection ``reason_for(identity, password)`` gives a reason for.

        The hub uses it for revocations (device disabled, removed or re-keyed, service
        key rotated) and for SAS tokens that expired during the session.
        Returns the dropped identities with their reasons.
        """
        kicked: list[tuple[Identity, str]] = []
        for cid, live in list(self._live.items()):
            self._drop_if(cid, live, reason_for, kicked)
        return kicked

    def kick_expired(self, now: float, reason_for: Callable[[Identity, str], str | None]) -> list[tuple[Identity, str]]:
        """Like ``kick``, but only for the logins whose token expiry lies before ``now``.

        ``reason_for`` still decides (the hub's own controller is never dropped this way); a
        session it spares is not asked again.  Cost: the sessions due, not all of them.
        """
        kicked, heap = [], self._expiries
        while heap and heap[0][0] < now:
            _, _, cid, live = heapq.heappop(heap)
            if self._live.get(cid) is live and not live.writer.is_closing():
                self._drop_if(cid, live, reason_for, kicked)
        return kicked

    @staticmethod
    def _drop_if(cid: str, live: "_Live", reason_for: Callable[[Identity, str], str | None],
                 kicked: list[tuple[Identity, str]]) -> None:
        reason = reason_for(live.identity, live.password)
        if reason:
            log.info("dropping %s %s: %s", live.identity.role.value, cid, reason)
            live.writer.transport.abort()
            kicked.append((live.identity, reason))

    def _note_expiry(self, client_id: str, live: _Live) -> None:
        heap = self._expiries
        heapq.heappush(heap, (token_expiry(live.password), next(self._expiry_seq), client_id, live))
        if len(heap) > 2 * len(self._live) + 1024:  # ended sessions' entries: drop them all at once
            heap[:] = [e for e in heap if self._live.get(e[2]) is e[3]]
            heapq.heapify(heap)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        self.accepted += 1
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
        except Exception:
            log.exception("unexpected error on an MQTT connection")
            writer.transport.abort()
        finally:
            self._handlers.discard(task)

    def _make_room(self) -> bool:
        """Admit one more connection: drop the oldest not-yet-logged-in ones first; False if full anyway.

        The newest connection (this one) is never the one dropped here, and a
        logged-in connection never is: it is not in ``_unauthenticated``.
        """
        dropped = 0
        while True:
            over_total = len(self._handlers) - dropped > self._max_connections
            over_unauth = len(self._unauthenticated) > self._max_unauthenticated
            if not (over_total or over_unauth) or len(self._unauthenticated) <= 1:
                return not over_total
            oldest = next(iter(self._unauthenticated))
            self._unauthenticated.pop(oldest).transport.abort()
            dropped += 1
            self.shed += 1
            if self._shed_log.allow("shed", time.monotonic()):
                log.warning("dropping the oldest connections that have not logged in yet "
                            "(max_unauthenticated_connections %d, max_connections %d)",
                            self._max_unauthenticated, self._max_connections)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        set_tls_read_buffer(writer.transport, TLS_READ_BUFFER, shared=self._tls_buffer)
        slim_stream_deques(writer)
        peer = writer.get_extra_info("peername")
        task = asyncio.current_task()
        self._unauthenticated[task] = writer
        try:
            if not self._make_room():
                log.warning("refusing %s: %d connections is the limit", peer, self._max_connections)
                self._refused("connection-limit")
                writer.transport.abort()
                return
            try:
                raw = await asyncio.wait_for(read_connect(reader, self._max_connect_bytes),
                                             self._connect_packet_timeout)
                packet = await ConnectPacket.from_stream(BufferReader(raw))
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                writer.transport.abort()
                return
            except (ValueError, AMQTTError, MQTTError, NoDataError, Exception) as exc:
                log.info("refusing %s: bad CONNECT (%s)", peer, exc)
                self._refused("bad-connect")
                writer.transport.abort()
                return
        finally:
            self._unauthenticated.pop(task, None)
        if writer.is_closing():  # dropped to make room while it was logging in
            return
        release_tls_buffers(writer)
        client_id = packet.client_id or ""
        if not self._admit(packet):
            self._refused("login-rate")
            await self._refuse(writer, CONNACK_SERVER_UNAVAILABLE)
            return
        if packet.will_flag:
            bad_will = check_will(packet.will_topic, packet.will_message, packet.will_retain_flag,
                                  self._max_retained_bytes)
            if bad_will:
                log.info("refusing client %r from %s: %s", client_id, peer, bad_will)
                self._refused("bad-will")
                writer.transport.abort()
                return
        try:
            identity = self._auth.authenticate(client_id, packet.username, packet.password)
        except AuthRefused as refused:
            log.info("refusing client %r from %s: %s", client_id, peer, refused.reason)
            self._refused(AUTH_REFUSAL_LABELS.get(refused.code, "not-authorized"))
            await self._refuse(writer, refused.code)
            return
        live = _Live(identity, packet.password, writer, task)
        old = self._live.get(client_id)
        self._live[client_id] = live
        self._note_expiry(client_id, live)
        try:
            if old is not None:
                if not await self._take_over(client_id, old, peer):
                    self._refused("takeover-timeout")
                    await self._refuse(writer, CONNACK_SERVER_UNAVAILABLE)
                    return
                if self._live.get(client_id) is not live or writer.is_closing():
                    return  # an even newer connection took over while this one waited
            guard = PacketGuard(self._max_packet_bytes, self._max_retained_bytes)

            def refuse(reason: str) -> None:
                log.info("closing the connection of %s: %s", client_id, reason)
                writer.transport.abort()

            guarded = _GuardedReader(raw, reader, guard, refuse, writer)
            # This frame lives as long as the connection: keep neither the CONNECT bytes (the
            # reader replays its own copy, then drops it) nor the parsed packet (issue 10).
            del raw, packet
            await self._broker.external_connected(guarded, StreamWriterAdapter(writer), LISTENER)
        finally:
            if self._live.get(client_id) is live:
                del self._live[client_id]
            writer.transport.abort()

    def _admit(self, packet: ConnectPacket) -> bool:
        """Within ``max_logins_per_second``?  The hub's own controller always is."""
        if self._logins is None or packet.username == CONTROLLER_USER:
            return True
        now = time.monotonic()
        if self._logins.take(now):
            return True
        self.busy += 1
        if self._shed_log.allow("busy", now):
            log.warning("more logins than max_logins_per_second: answering 'server unavailable' (clients "
                        "retry with backoff); %d so far", self.busy)
        return False

    async def _take_over(self, client_id: str, old: _Live, peer) -> bool:
        """Disconnect the older connection of client_id and wait until amqtt is done with it."""
        log.info("client %s logged in again from %s: disconnecting its older connection", client_id, peer)
        if old.identity.role is Role.DEVICE and not old.writer.is_closing():
            try:
                old.writer.write(takeover_notice(client_id))
            except (ConnectionError, RuntimeError):
                pass
        old.writer.close()  # graceful: the notice goes out first
        if old.task is None or old.task is asyncio.current_task():
            return True
        done, _ = await asyncio.wait({old.task}, timeout=self._takeover_timeout)
        if done:
            return True
        old.writer.transport.abort()
        done, _ = await asyncio.wait({old.task}, timeout=self._takeover_timeout)
        if not done:
            log.warning("client %s: the broker did not let go of the older connection within %g s; "
                        "refusing the new one", client_id, 2 * self._takeover_timeout)
        return bool(done)

    @staticmethod
    async def _refuse(writer: asyncio.StreamWriter, code: int) -> None:
        writer.write(bytes((0x20, 0x02, 0x00, code)))
        try:
            await asyncio.wait_for(writer.drain(), 2)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        writer.close()
