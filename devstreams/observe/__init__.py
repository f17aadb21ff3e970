"""What the hub and a gateway show about themselves: Prometheus metrics and a small HTTP server.

``metrics`` maps the events of the one event sink (``devstreams.wire.events``, the
controller's, the gateway's and the gate's) to ``prometheus_client`` metric families;
``http`` serves HTTP/1.1 requests (h11) on a listener that also carries stream
WebSockets (``RoutingProtocol`` hands each connection to one or the other).
Shared by the hub (``broker/``) and a standalone gateway (``streamgw/``), which may
not import each other.
"""
