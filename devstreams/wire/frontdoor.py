"""One TLS port for everything: how the hub tells MQTT from streams on its single port.

A device behind a firewall often may open only outbound 443, sometimes only
through an HTTP proxy.  ``devstreams hub up --port P`` therefore serves, on one
TLS listener:

- MQTT over TLS: a client that negotiates the ALPN protocol ``mqtt`` (as brokers
  behind 443 commonly expect), or whose first bytes are an MQTT CONNECT packet
  (clients that send no ALPN, e.g. paho by default);
- streams: an HTTP/1.1 WebSocket upgrade for ``/streams/<id>`` (ALPN ``http/1.1``
  or none), exactly as on the gateway's own port;
- MQTT over WebSocket: an upgrade for ``/mqtt`` with the subprotocol ``mqtt``;
- plain HTTP (``/metrics``, the dashboard: ``/``, ``/login``, ``/api/...``, ``/static/...``):
  GET, HEAD or POST, served by ``devstreams.observe.http.HttpServer``.

``Sniffer`` decides from the negotiated ALPN and the first bytes, without I/O:
feed it what arrives until it returns a ``Route`` or a ``Refusal``.  It reads at
most ``limit`` bytes (the request line of an upgrade; MQTT needs one byte).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from enum import Enum

from .streamproto import STREAM_PATH_PREFIX

ALPN_MQTT = "mqtt"
ALPN_HTTP = "http/1.1"
ALPN_PROTOCOLS = [ALPN_MQTT, ALPN_HTTP]     # what the single port offers, in order of preference
MQTT_WS_PATH = "/mqtt"
MQTT_WS_SUBPROTOCOL = "mqtt"
MQTT_CONNECT_FIRST_BYTE = 0x10                # packet type 1, no flags (MQTT 3.1.1 and 5)
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")
SNIFF_LIMIT = 8 * 1024                        # bytes read before giving up on finding the request line


class Route(str, Enum):
    MQTT = "mqtt"              # MQTT over TLS
    STREAMS = "streams"        # a stream WebSocket (/streams/<id>)
    MQTT_WS = "mqtt-ws"        # MQTT over WebSocket (/mqtt)
    HTTP = "http"              # /metrics and the dashboard (HTTP_PATHS, HTTP_PREFIXES)


METRICS_PATH = "/metrics"
HTTP_PATHS = ("/", METRICS_PATH, "/login", "/logout", "/favicon.ico")
HTTP_PREFIXES = ("/api/", "/static/")
HTTP_METHODS_SERVED = (b"GET", b"HEAD", b"POST")


def is_http_path(path: str) -> bool:
    """A path of the HTTP endpoints (metrics, dashboard) rather than a WebSocket upgrade."""
    return path in HTTP_PATHS or path.startswith(HTTP_PREFIXES)


@dataclass(frozen=True)
class Refusal:
    """Not for this port: an HTTP client gets ``status`` and ``reason``; anything else is closed."""

    status: int
    reason: str
    http: bool

    def http_answer(self) -> bytes:
        """The whole HTTP/1.1 answer an HTTP client gets (the connection closes after it)."""
        body = f"{self.reason}\n".encode()
        return (f"HTTP/1.1 {self.status} {status_phrase(self.status)}\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode() + body


def status_phrase(status: int) -> str:
    """The reason phrase of an HTTP status (the standard library's table)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


@dataclass
class Sniffer:
    alpn: str | None = None
    limit: int = SNIFF_LIMIT
    _seen: bytearray = field(default_factory=bytearray)

    def first(self) -> Route | None:
        """A decision before any byte: the client asked for MQTT by ALPN."""
        return Route.MQTT if self.alpn == ALPN_MQTT else None

    def feed(self, data: bytes) -> Route | Refusal | None:
        """The next bytes from the client; None until there are enough to decide."""
        if self.alpn == ALPN_MQTT:
            return Route.MQTT
        self._seen += data
        seen = self._seen
        if not seen:
            return None
        if seen[0] == MQTT_CONNECT_FIRST_BYTE:
            return Route.MQTT
        head = bytes(seen[:8])
        if not any(head.startswith(m[:len(head)]) for m in HTTP_METHODS):
            return Refusal(400, "neither MQTT nor HTTP", http=False)
        end = seen.find(b"\r\n")
        if end < 0:
            if len(seen) > self.limit:
                return Refusal(414, "request line too long", http=True)
            return None
        return route_for_request_line(bytes(seen[:end]))

    @property
    def buffered(self) -> bytes:
        """Everything fed so far: the chosen handler reads it first."""
        return bytes(self._seen)


def route_for_request_line(line: bytes) -> Route | Refusal:
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return Refusal(400, "malformed HTTP request line", http=True)
    method, target = parts[0], parts[1].decode("ascii", errors="replace")
    path = target.split("?", 1)[0]
    if is_http_path(path):
        if method not in HTTP_METHODS_SERVED:
            return Refusal(405, f"{path[:80]} answers GET, HEAD and POST", http=True)
        return Route.HTTP
    if method != b"GET":
        return Refusal(405, "only WebSocket upgrades (GET) are served here", http=True)
    if path.startswith(STREAM_PATH_PREFIX):
        return Route.STREAMS
    if path == MQTT_WS_PATH:
        return Route.MQTT_WS
    return Refusal(404, f"not an endpoint of this hub: {path[:80]!r} "
                        f"(expected {STREAM_PATH_PREFIX}<id>, {MQTT_WS_PATH}, {METRICS_PATH} or the dashboard at /)",
                   http=True)
