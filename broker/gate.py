"""The broker's front door: TLS, then authentication, then amqtt.

amqtt 0.12 deletes an existing session as soon as it reads a clean-session
CONNECT, before any authentication, so a stranger could make a device deaf by
connecting with its client id and a wrong password.  The gate therefore owns the
TLS listener: it reads the CONNECT packet itself, checks the credentials, and
only then hands the connection (CONNECT bytes replayed) to amqtt's ``external``
listener.  Refusals get a CONNACK with a return code and never reach amqtt.
The gate also remembers live connections so the hub can drop a device that was
disabled, removed or re-keyed.
"""

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from amqtt.adapters import BufferReader, StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connect import ConnectPacket

from wire.topics import Role

from .auth import AuthRefused, Authenticator, Identity

log = logging.getLogger(__name__)

LISTENER = "default"  # the amqtt listener of type "external" the gate feeds
CONNECT_PACKET_TYPE = 1
TLS_READ_BUFFER = 4 * 1024  # MQTT control traffic is small; OpenSSL buffers partial records


def shrink_tls_buffer(writer: asyncio.StreamWriter) -> None:
    """Give an idle-most-of-the-time TLS connection a 4 KiB read buffer instead of 256 KiB.

    CPython's asyncio keeps a ``SSLProtocol.max_size`` (256 KiB) bytearray per TLS
    connection: with thousands of idle devices that is most of the hub's memory.
    This reaches into asyncio internals, so it does nothing if they look different.
    """
    proto = getattr(writer.transport, "_ssl_protocol", None)
    if proto is None or not hasattr(proto, "_ssl_buffer") or not hasattr(proto, "max_size"):
        return
    proto.max_size = TLS_READ_BUFFER
    proto._ssl_buffer = bytearray(TLS_READ_BUFFER)
    proto._ssl_buffer_view = memoryview(proto._ssl_buffer)


class _ReplayReader(StreamReaderAdapter):
    """A reader that first returns the CONNECT bytes the gate already consumed."""

    def __init__(self, prefix: bytes, reader: asyncio.StreamReader):
        super().__init__(reader)
        self._prefix = prefix

    async def read(self, n: int = -1) -> bytes:
        if not self._prefix:
            return await super().read(n)
        if n < 0:
            head, self._prefix = self._prefix, b""
            return head + await super().read(n)
        head, self._prefix = self._prefix[:n], self._prefix[n:]
        if len(head) < n:
            head += await super().read(n - len(head))
        return head


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


@dataclass
class _Live:
    identity: Identity
    password: str
    writer: asyncio.StreamWriter


class Gate:
    def __init__(self, broker: Broker, authenticator: Authenticator, *, max_connect_bytes: int = 8192,
                 connect_timeout: float = 10.0, max_connections: int = 10000):
        self._broker = broker
        self._auth = authenticator
        self._max_connect_bytes = max_connect_bytes
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._live: dict[str, _Live] = {}
        self._handlers: set[asyncio.Task] = set()
        self.port = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext) -> None:
        self._server = await asyncio.start_server(self._on_client, host, port, ssl=ssl_context,
                                                  ssl_handshake_timeout=self._connect_timeout,
                                                  reuse_address=True, limit=2 ** 16)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for live in list(self._live.values()):
            live.writer.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def connected(self, role: Role | None = None) -> list[str]:
        return [cid for cid, live in self._live.items() if role is None or live.identity.role is role]

    def kick(self, reason_for: Callable[[Identity, str], str | None]) -> list[tuple[Identity, str]]:
        """Drop every live connection ``reason_for(identity, password)`` gives a reason for.

        The hub uses it for revocations (device disabled, removed or re-keyed, service
        key rotated) and for SAS tokens that expired during the session.
        Returns the dropped identities with their reasons.
        """
        kicked = []
        for cid, live in list(self._live.items()):
            reason = reason_for(live.identity, live.password)
            if reason:
                log.info("dropping %s %s: %s", live.identity.role.value, cid, reason)
                live.writer.transport.abort()
                kicked.append((live.identity, reason))
        return kicked

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
        except Exception:
            log.exception("unexpected error on an MQTT connection")
            writer.transport.abort()
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        shrink_tls_buffer(writer)
        peer = writer.get_extra_info("peername")
        if len(self._handlers) > self._max_connections:
            log.warning("refusing %s: %d connections is the limit", peer, self._max_connections)
            writer.transport.abort()
            return
        try:
            raw = await asyncio.wait_for(read_connect(reader, self._max_connect_bytes), self._connect_timeout)
            packet = await ConnectPacket.from_stream(BufferReader(raw))
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.transport.abort()
            return
        except (ValueError, AMQTTError, MQTTError, NoDataError, Exception) as exc:
            log.info("refusing %s: bad CONNECT (%s)", peer, exc)
            writer.transport.abort()
            return
        client_id = packet.client_id or ""
        try:
            identity = self._auth.authenticate(client_id, packet.username, packet.password)
        except AuthRefused as refused:
            log.info("refusing client %r from %s: %s", client_id, peer, refused.reason)
            await self._refuse(writer, refused.code)
            return
        live = _Live(identity, packet.password, writer)
        self._live[client_id] = live
        try:
            await self._broker.external_connected(_ReplayReader(raw, reader), StreamWriterAdapter(writer),
                                                  LISTENER)
        finally:
            if self._live.get(client_id) is live:
                del self._live[client_id]
            writer.transport.abort()

    @staticmethod
    async def _refuse(writer: asyncio.StreamWriter, code: int) -> None:
        writer.write(bytes((0x20, 0x02, 0x00, code)))
        try:
            await asyncio.wait_for(writer.drain(), 2)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        writer.close()
