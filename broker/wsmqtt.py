"""MQTT over WebSocket on the hub's single port, through the same gate as MQTT over TLS.

amqtt has a WebSocket listener of its own, but a connection there would reach
amqtt without passing the gate (``broker/gate.py``): no credential check before
session state is touched, no takeover rule, no packet guard, no login rate.  So
the WebSocket is only a transport here: after the upgrade (``/mqtt``, subprotocol
``mqtt``) each binary message's bytes are fed to the gate's own per-connection
protocol, exactly as the bytes of a TLS connection are, and what the gate (or
amqtt behind it) writes goes out as binary messages.  MQTT packets may span
messages or share one (MQTT over WebSocket, OASIS MQTT 3.1.1 section 6).

``Tunnel`` is the asyncio transport the gate's protocol sees; flow control passes
through in both directions (the WebSocket's socket buffer full: the gate's writer
waits; the gate pausing its reader: the socket is not read).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from websockets.asyncio.server import Server, ServerConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from devstreams.transport.wslink import take_over_receiving
from devstreams.wire.frontdoor import MQTT_WS_PATH, MQTT_WS_SUBPROTOCOL

log = logging.getLogger(__name__)

_closing: set[asyncio.Future] = set()   # close handshakes under way (a task needs a reference)


class Tunnel(asyncio.Transport):
    """The transport of an MQTT connection that rides a WebSocket."""

    def __init__(self, connection: MqttOverWebSocket):
        super().__init__()
        self._ws = connection

    def write(self, data) -> None:
        ws = self._ws
        if ws.protocol.state is not State.OPEN or not data:
            return
        ws.protocol.send_binary(bytes(data))
        try:
            ws.send_data()
        except OSError:
            ws.transport.abort()

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("MQTT over WebSocket has no half-close")

    def close(self) -> None:
        """A clean WebSocket close after everything written so far."""
        if self._ws.protocol.state is State.OPEN:
            task = asyncio.ensure_future(self._ws.close())
            _closing.add(task)
            task.add_done_callback(_closing.discard)

    def abort(self) -> None:
        self._ws.transport.abort()

    def is_closing(self) -> bool:
        return self._ws.protocol.state is not State.OPEN or self._ws.transport.is_closing()

    def get_extra_info(self, name, default=None):
        return self._ws.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._ws.transport.pause_reading()

    def resume_reading(self) -> None:
        self._ws.transport.resume_reading()

    def is_reading(self) -> bool:
        return self._ws.transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._ws.transport.get_write_buffer_size()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._ws.transport.set_write_buffer_limits(high, low)

    def get_protocol(self):
        return self._ws.inner

    def set_protocol(self, protocol) -> None:
        self._ws.inner = protocol


class MqttOverWebSocket(ServerConnection):
    """websockets' server connection whose binary messages carry an MQTT byte stream."""

    inner: asyncio.Protocol | None = None
    refused = False      # a text frame came: the connection is failing

    def start_mqtt(self, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        """After the upgrade: put the gate's protocol on top; frames queued so far go first."""
        self.inner = protocol_factory()
        self.inner.connection_made(Tunnel(self))
        take_over_receiving(self, self._deliver)

    def process_event(self, event) -> None:
        if self.inner is None:
            super().process_event(event)
        elif isinstance(event, Frame) and event.opcode in (Opcode.BINARY, Opcode.CONT, Opcode.TEXT):
            self._deliver(event)
        else:
            super().process_event(event)

    def _deliver(self, frame: Frame) -> None:
        if self.inner is None or self.refused:
            return  # after a text frame nothing more reaches the gate
        if frame.opcode is Opcode.TEXT:  # MQTT over WebSocket is binary only (MQTT 3.1.1, 6.0)
            self.refused = True
            self.protocol.fail(CloseCode.UNSUPPORTED_DATA, "MQTT over WebSocket uses binary messages only")
            self.send_data()
            self.transport.close()
            return
        if frame.data:
            self.inner.data_received(bytes(frame.data))

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connection_lost(exc)


class MqttWebSocketEndpoint:
    """The ``/mqtt`` upgrade on the single port: a websockets server feeding the gate."""

    def __init__(self, gate_protocol: Callable[[], asyncio.Protocol], *, max_message_bytes: int,
                 open_timeout: float):
        self._gate_protocol = gate_protocol
        self._max_size = max_message_bytes
        self._server = Server(self._handler, process_request=self._check, server_header="devstreams-hub",
                              open_timeout=open_timeout)

    def attach(self, listener: asyncio.Server) -> None:
        self._server.wrap(listener)

    def protocol_factory(self) -> MqttOverWebSocket:
        return MqttOverWebSocket(ServerProtocol(subprotocols=[MQTT_WS_SUBPROTOCOL], max_size=self._max_size),
                                 self._server, ping_interval=None, ping_timeout=None,  # MQTT has its keepalive
                                 close_timeout=2.0, max_queue=16, write_limit=64 * 1024)

    @staticmethod
    def _check(connection: ServerConnection, request):
        if request.path.split("?", 1)[0] != MQTT_WS_PATH:   # the front door routed it here by path
            return connection.respond(404, f"not {MQTT_WS_PATH}\n")
        return None

    async def _handler(self, connection: MqttOverWebSocket) -> None:
        connection.start_mqtt(self._gate_protocol)
        await connection.wait_closed()

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()
