"""The hub's single TLS port: one listener, connections routed to the gate or the gateway.

The TLS handshake happens here (offering the ALPN protocols of
``devstreams.wire.frontdoor``); then ``Sniffer`` decides from the negotiated ALPN
and the first bytes where the connection goes, and the TLS transport is handed
to that endpoint's own protocol (``transport.set_protocol``), which is told the
connection was made and gets the bytes read so far.  From then on the front door
is out of the way: no copy, no extra task per connection.

A connection that sends nothing decidable within ``decide_timeout`` is closed;
an HTTP request for an unknown path gets a status line with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from devstreams.wire.frontdoor import ALPN_PROTOCOLS, Refusal, Route, Sniffer

from .gate import GateTLSProtocol

log = logging.getLogger(__name__)

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


def front_door_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """The hub's server TLS context, offering the single port's ALPN protocols."""
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    return context


class FrontDoor(asyncio.Protocol):
    """One connection on the single port, until it is handed over."""

    def __init__(self, routes: dict[Route, ProtocolFactory], decide_timeout: float):
        self._routes = routes
        self._timeout = decide_timeout
        self._transport: asyncio.Transport | None = None
        self._sniffer: Sniffer | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        self._sniffer = Sniffer(alpn=ssl_object.selected_alpn_protocol() if ssl_object is not None else None)
        route = self._sniffer.first()
        if route is not None:
            self._hand_over(route)
        else:
            self._timer = asyncio.get_running_loop().call_later(self._timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        decision = self._sniffer.feed(data)
        if decision is None:
            return
        if isinstance(decision, Refusal):
            self._refuse(decision)
        else:
            self._hand_over(decision)

    def connection_lost(self, exc) -> None:
        self._cancel_timer()

    def _hand_over(self, route: Route) -> None:
        self._cancel_timer()
        factory = self._routes.get(route)
        if factory is None:
            self._refuse(Refusal(501, f"this hub does not serve {route.value} on this port", http=route != Route.MQTT))
            return
        transport, buffered = self._transport, self._sniffer.buffered
        self._transport = self._sniffer = None
        protocol = factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if buffered and not transport.is_closing():
            protocol.data_received(buffered)

    def _refuse(self, refusal: Refusal) -> None:
        self._cancel_timer()
        transport = self._transport
        peer = transport.get_extra_info("peername")
        log.info("refused a connection from %s on the single port: %s", peer, refusal.reason)
        if refusal.http:
            transport.write(refusal.http_answer())
            transport.close()
        else:
            transport.abort()

    def _too_slow(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def serve_front_door(host: str, port: int, context: ssl.SSLContext, routes: dict[Route, ProtocolFactory], *,
                           decide_timeout: float, backlog: int) -> asyncio.AbstractServer:
    """Bind the single port, not serving yet: ``routes`` is filled in, then ``start_serving()``.

    TLS is the gate's (``GateTLSProtocol``: asyncio's TLS protocol, small per connection, on
    any event loop), since most connections on this port are idle devices; a stream's
    connection reads into the gateway's shared bulk-sized buffer once it is handed over
    (streamgw/server.py).
    ``decide_timeout`` bounds the TLS handshake and, separately, the wait for the first bytes.
    """
    loop = asyncio.get_running_loop()
    context = front_door_context(context)

    def tls_protocol() -> GateTLSProtocol:
        return GateTLSProtocol(loop, FrontDoor(routes, decide_timeout), context, None, server_side=True,
                               ssl_handshake_timeout=decide_timeout)
    return await loop.create_server(tls_protocol, host, port, backlog=backlog, start_serving=False)
