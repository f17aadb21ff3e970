"""A small HTTP/1.1 server (h11) for /metrics and the dashboard, and the listener's router.

Why not websockets' ``process_request``, which already sees every request on the
gateway's listener?  Its parser (websockets/http11.py ``Request.parse``) refuses any
method but GET and any request with a body, and the connection ends after each answer:
the dashboard's actions are POSTs (a close button, with a CSRF token) and its page polls.
So a listener that serves streams *and* HTTP decides per connection from the request line
(``devstreams.wire.frontdoor.route_for_request_line``): stream upgrades go to the gateway's
websockets protocol, everything else to ``HttpServer``.  On the hub's single port the front
door (broker/frontdoor.py) makes that decision, on a gateway's own port the gateway, both with
``RoutingProtocol``.

Everything is bounded: request line + headers (``max_header_bytes``), body
(``max_body_bytes``), connections at once, and a connection silent for ``request_timeout``
(mid-request or idle between keep-alive requests) is closed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import h11

from devstreams.wire.frontdoor import Refusal, Route, Sniffer, status_phrase

log = logging.getLogger(__name__)

MAX_QUERY_FIELDS = 16


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]          # lower-case names; a repeated header keeps its last value
    body: bytes = b""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path or "/"

    @property
    def query(self) -> dict[str, str]:
        try:
            pairs = parse_qsl(urlsplit(self.target).query, max_num_fields=MAX_QUERY_FIELDS)
        except ValueError:   # more fields than that: ignore the query rather than fail the page
            return {}
        return dict(pairs)


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def text(cls, status: int, text: str, **kw) -> "Response":
        return cls(status, (text if text.endswith("\n") else text + "\n").encode(), **kw)


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    def __init__(self, handler: Handler, *, max_header_bytes: int = 8192, max_body_bytes: int = 16384,
                 request_timeout: float = 30.0, max_connections: int = 64):
        self._handler = handler
        self.max_header = max_header_bytes
        self.max_body = max_body_bytes
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._tasks: set[asyncio.Task] = set()

    def protocol_factory(self) -> asyncio.StreamReaderProtocol:
        """The protocol of one HTTP connection once TLS is up (what a router hands over)."""
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=2 ** 16), self._connected)

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Each connection's task is known from its creation, so ``stop`` also ends one that has
        not started yet (a coroutine left unstarted at shutdown was never awaited)."""
        task = asyncio.get_running_loop().create_task(self._accept(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) > self.max_connections:   # this connection's own task is one of them
            writer.transport.abort()
            return
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError, h11.LocalProtocolError):
            pass
        except Exception:  # a bug ends this connection, never the listener
            log.exception("HTTP connection failed")
        finally:
            writer.close()

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader, head: bool = False):
        """The next h11 event.  ``head``: reading a request line + headers, which may not exceed
        ``max_header``: h11 bounds only an *incomplete* event, so a whole oversized head arriving
        in one read would pass; reading no more than the bound leaves it incomplete, and h11
        refuses it (431)."""
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            size = max(1, self.max_header + 1 - len(conn.trailing_data[0])) if head else 65536
            data = await asyncio.wait_for(reader.read(size), self.request_timeout)
            conn.receive_data(data)

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response,
                    close: bool = False, head: bool = False) -> None:
        headers = [("content-type", response.content_type), ("content-length", str(len(response.body))),
                   ("cache-control", "no-store"), ("x-content-type-options", "nosniff"),
                   *response.headers]
        if close:
            headers.append(("connection", "close"))
        out = conn.send(h11.Response(status_code=response.status, headers=headers,
                                     reason=status_phrase(response.status).encode()))
        if not head:
            out += conn.send(h11.Data(data=response.body))
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
        await asyncio.wait_for(writer.drain(), self.request_timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header)
        while True:
            try:
                event = await self._next(conn, reader, head=True)
                if isinstance(event, h11.ConnectionClosed):
                    return
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
                request = Request(event.method.decode("latin-1"), event.target.decode("latin-1"), headers)
                declared = headers.get("content-length", "0")
                if not declared.isdigit() or int(declared) > self.max_body:
                    await self._send(conn, writer, Response.text(413, f"request body over {self.max_body} bytes"),
                                     close=True)
                    return
                body = bytearray()
                while not isinstance(event := await self._next(conn, reader), h11.EndOfMessage):
                    if isinstance(event, h11.ConnectionClosed):
                        return
                    body += event.data
                request.body = bytes(body)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._send(conn, writer, Response.text(exc.error_status_hint, "bad HTTP request"),
                                     close=True)
                return
            try:
                response = await self._handler(request)
            except Exception:
                log.exception("HTTP handler failed on %s %s", request.method, request.path[:80])
                response = Response.text(500, "internal error (see the hub's log)")
            await self._send(conn, writer, response, head=request.method == "HEAD")
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()


ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class RoutingProtocol(asyncio.Protocol):
    """One connection on a shared listener until its ALPN or first bytes say where it goes.

    The decision is ``devstreams.wire.frontdoor.Sniffer``'s; then the transport is handed
    to the chosen protocol (``transport.set_protocol``) with the bytes read so far, and this
    object is out of the way.  Used on a gateway's own port (streams or HTTP) and on the hub's
    single port (broker/frontdoor.py: MQTT, MQTT over WebSocket, streams, HTTP).  A route
    the listener has no handler for is refused with ``unserved(route)``; a connection that
    says nothing within ``decide_timeout`` is closed.
    """

    def __init__(self, routes: dict[Route, ProtocolFactory], decide_timeout: float, *,
                 where: str = "a gateway's port", unserved: Callable[[Route], Refusal] | None = None):
        self._routes = routes
        self._timeout = decide_timeout
        self._where = where
        self._unserved = unserved or (lambda route: Refusal(404, "not an endpoint of this gateway",
                                                             http=route is not Route.MQTT))
        self._transport: asyncio.Transport | None = None
        self._sniffer: Sniffer | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        self._sniffer = Sniffer(alpn=ssl_object.selected_alpn_protocol() if ssl_object is not None else None)
        route = self._sniffer.first()
        if route is not None:
            self._decided(route)
        else:
            self._timer = asyncio.get_running_loop().call_later(self._timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        decision = self._sniffer.feed(data)
        if decision is not None:
            self._decided(decision)

    def connection_lost(self, exc) -> None:
        self._cancel()

    def _decided(self, decision: Route | Refusal) -> None:
        factory = None if isinstance(decision, Refusal) else self._routes.get(decision)
        if factory is None:
            self._refuse(decision if isinstance(decision, Refusal) else self._unserved(decision))
            return
        self._cancel()
        transport, buffered = self._transport, self._sniffer.buffered
        self._transport = self._sniffer = None
        protocol = factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if buffered and not transport.is_closing():
            protocol.data_received(buffered)

    def _refuse(self, refusal: Refusal) -> None:
        self._cancel()
        transport, self._transport = self._transport, None
        log.info("refused a connection from %s on %s: %s", transport.get_extra_info("peername"), self._where,
                 refusal.reason)
        if refusal.http:
            transport.write(refusal.http_answer())
            transport.close()
        else:
            transport.abort()

    def _too_slow(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.abort()
            self._transport = None

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def bearer_ok(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>`` names ``token`` (constant-time; an empty token never matches)."""
    if not token or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode("utf-8", "replace"), token.encode("utf-8"))


def metrics_answer(request: Request, token: str, text: Callable[[], bytes], content_type: str) -> Response:
    """GET /metrics: 401 without the bearer token, else the Prometheus text."""
    if not bearer_ok(request.headers.get("authorization"), token):
        return Response.text(401, "missing or wrong Authorization: Bearer <token> "
                                  "('devstreams hub metrics-token' prints the hub's)",
                             headers=[("www-authenticate", 'Bearer realm="metrics"')])
    if request.method not in ("GET", "HEAD"):
        return Response.text(405, "/metrics answers GET")
    return Response(200, text(), content_type=content_type)
