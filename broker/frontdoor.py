"""The hub's single TLS port: one listener, connections routed to the gate or the gateway.

The TLS handshake happens here (offering the ALPN protocols of
``devstreams.wire.frontdoor``); then ``Sniffer`` decides from the negotiated ALPN
and the first bytes where the connection goes, and the TLS transport is handed
to that endpoint's own protocol (``transport.set_protocol``), which is told the
connection was made and gets the bytes read so far.  From then on the front door
is out of the way: no copy, no extra task per connection.  The routing protocol is the
one a gateway's own port uses too (``devstreams.observe.http.RoutingProtocol``).

A connection that sends nothing decidable within ``decide_timeout`` is closed;
an HTTP request for an unknown path gets a status line with the reason.
"""

from __future__ import annotations

import asyncio
import ssl

from devstreams.observe.http import ProtocolFactory, RoutingProtocol
from devstreams.wire.frontdoor import ALPN_PROTOCOLS, Refusal, Route

from .gate import GateTLSProtocol


def front_door_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """The hub's server TLS context, offering the single port's ALPN protocols."""
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    return context


def _unserved(route: Route) -> Refusal:
    return Refusal(501, f"this hub does not serve {route.value} on this port", http=route != Route.MQTT)


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
        return GateTLSProtocol(loop, RoutingProtocol(routes, decide_timeout, where="the single port",
                                                     unserved=_unserved), context, None, server_side=True,
                               ssl_handshake_timeout=decide_timeout)
    return await loop.create_server(tls_protocol, host, port, backlog=backlog, start_serving=False)
