"""The auth hook: an external MQTT broker asks the hub about every login and every topic.

When the hub runs against an external broker (``hub up --broker-url``), devices and
services keep their SAS logins: the broker forwards each CONNECT and each topic check to
this small HTTP/1.1 server, in the shape of mosquitto-go-auth's HTTP backend and EMQX 5's
HTTP authenticator/authorizer (see docs/protocol.md, "Auth hook (external brokers)"):

- ``POST /mqtt/auth``  ``{"clientid", "username", "password"}`` -> 200 allow (with
  ``is_superuser`` true only for the hub's controller) or 403 deny with a reason;
- ``POST /mqtt/acl``   ``{"clientid", "username", "topic", "action"}`` with action
  publish / subscribe / receive -> 200 allow or 403 deny.

Every request carries ``Authorization: Bearer <token>`` (``<data-dir>/keys/auth-hook.token``).
The decisions are the pure :func:`decide`; :class:`AuthHook` is a thin asyncio adapter over
h11 (a sans-I/O HTTP/1.1 parser) with keep-alive, because the Mosquitto plugin reuses one
connection for every call.  Every input is bounded (header bytes, body bytes, a read timeout,
connections at once); passwords and the token never reach the log.
"""

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Mapping

import h11

from devstreams.wire.throttle import EveryInterval
from devstreams.wire.topics import Action, Claim, IdentityError, Role, allowed, parse_login

from .auth import Authenticator, AuthRefused

log = logging.getLogger(__name__)

AUTH_PATH = "/mqtt/auth"
ACL_PATH = "/mqtt/acl"
ALLOW = {"result": "allow"}
_ACTIONS = {a.value: a for a in Action}


def _deny(reason: str) -> dict:
    return {"result": "deny", "reason": reason}


def acl_allows(claim: Claim, action: Action, topic: str) -> bool:
    """The one place the hook asks the topic ACL."""
    return allowed(claim, action, topic)


def _fields(body: bytes, names: tuple[str, ...]) -> dict[str, str] | str:
    """The named string fields of a JSON object body, or why the body is unusable."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "body is not JSON"
    if not isinstance(doc, dict):
        return "body must be a JSON object"
    out = {}
    for name in names:
        value = doc.get(name)
        if not isinstance(value, str):
            return f"field {name!r} must be a string"
        out[name] = value
    return out


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def decide(method: str, path: str, headers: Mapping[str, str], body: bytes, *,
           authenticator: Authenticator, token: str, max_body: int) -> tuple[int, dict]:
    """(HTTP status, JSON answer) for one hook request.  Pure apart from the registry read.

    ``headers`` has lower-case names.  Order: the token first (an unauthenticated caller
    learns nothing, not even which paths exist), then method, path, size and body.
    """
    given = _bearer(headers)
    if given is None or not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8")):
        return 401, _deny("missing or wrong hook token")
    if method != "POST":
        return 405, _deny("only POST is allowed")
    if path not in (AUTH_PATH, ACL_PATH):
        return 404, _deny(f"no such hook: use {AUTH_PATH} or {ACL_PATH}")
    if len(body) > max_body:
        return 413, _deny(f"body larger than {max_body} bytes")
    if path == AUTH_PATH:
        fields = _fields(body, ("clientid", "username", "password"))
        if isinstance(fields, str):
            return 400, _deny(fields)
        try:
            identity = authenticator.authenticate(fields["clientid"], fields["username"], fields["password"])
        except AuthRefused as exc:
            log.info("hook: login refused for client %r (%s)", fields["clientid"], exc.reason)
            return 403, _deny(exc.reason)
        return 200, {**ALLOW, "is_superuser": identity.role is Role.CONTROLLER}
    fields = _fields(body, ("clientid", "username", "topic", "action"))
    if isinstance(fields, str):
        return 400, _deny(fields)
    action = _ACTIONS.get(fields["action"])
    if action is None:
        return 400, _deny("action must be publish, subscribe or receive")
    try:
        claim = parse_login(fields["username"], fields["clientid"])
    except IdentityError as exc:
        return 403, _deny(str(exc))
    if claim.role is Role.CONTROLLER or acl_allows(claim, action, fields["topic"]):
        return 200, dict(ALLOW)
    log.debug("hook: %s %s %r denied", fields["clientid"], action.value, fields["topic"])
    return 403, _deny(f"{action.value} on this topic is not allowed")


class _Close(Exception):
    """End this connection without answering (peer gone, idle too long, protocol error answered)."""


class AuthHook:
    """The hook's HTTP/1.1 server (asyncio + h11).  ``await start()``, then ``.port``; ``await stop()``."""

    def __init__(self, authenticator: Authenticator, token: bytes | str, *, bind: str = "127.0.0.1",
                 port: int = 0, max_body: int = 4096, max_header: int = 8192,
                 request_timeout: float = 10.0, max_connections: int = 64):
        self._authenticator = authenticator
        self._token = token.decode("ascii") if isinstance(token, bytes) else token
        self._bind = bind
        self._port = port
        self.max_body = max_body
        self.max_header = max_header
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._full_log = EveryInterval(60.0)
        self.connections_accepted = 0   # counters for 'hub show' and tests: a plugin that keeps its
        self.requests_answered = 0      # connection and caches its answers makes few of both

    @classmethod
    def from_settings(cls, authenticator: Authenticator, token: bytes | str, settings) -> "AuthHook":
        return cls(authenticator, token, bind=settings.auth_hook_bind, port=settings.auth_hook_port,
                   max_body=settings.auth_hook_max_body_bytes, max_header=settings.auth_hook_max_header_bytes,
                   request_timeout=settings.auth_hook_request_timeout,
                   max_connections=settings.auth_hook_max_connections)

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._bind, self._port,
                                                  limit=max(self.max_header, self.max_body) + 1024)
        log.info("auth hook listening on http://%s:%d", self._bind, self.port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= self.max_connections:
            say, skipped = self._full_log.ready(time.monotonic())
            if say:
                log.warning("auth hook: %d connections open (auth_hook_max_connections); refusing more"
                            "%s", len(self._tasks), f" ({skipped} more since the last line)" if skipped else "")
            writer.close()
            return
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections_accepted += 1
        try:
            await self._serve(reader, writer)
        except (_Close, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug must not take the hook down: this connection ends, the others go on
            log.exception("auth hook: connection failed")
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader):
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await asyncio.wait_for(reader.read(65536), self.request_timeout)
            except asyncio.TimeoutError:
                raise _Close() from None
            conn.receive_data(data)  # b"" = the peer closed: h11 turns it into ConnectionClosed

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, answer: dict,
                    close: bool = False) -> None:
        body = json.dumps(answer, separators=(",", ":")).encode()  # "is_superuser":true, as the plugin looks for it
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        if close:
            headers.append(("connection", "close"))
        out = conn.send(h11.Response(status_code=status, headers=headers))
        out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        writer.write(out)
        self.requests_answered += 1
        await asyncio.wait_for(writer.drain(), self.request_timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header)
        while True:
            try:
                event = await self._next(conn, reader)
                if isinstance(event, h11.ConnectionClosed):
                    return
                request = event
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
                method, path = request.method.decode("latin-1"), request.target.decode("latin-1")
                if conn.they_are_waiting_for_100_continue:  # curl does this for bodies over 1 KiB
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                declared = headers.get("content-length", "0")
                body = bytearray()
                if declared.isdigit() and int(declared) > self.max_body:
                    too_big = True
                else:
                    too_big = False
                    while not isinstance(event := await self._next(conn, reader), h11.EndOfMessage):
                        if isinstance(event, h11.ConnectionClosed):
                            return
                        body += event.data
                        if len(body) > self.max_body:
                            too_big = True
                            break
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._send(conn, writer, exc.error_status_hint, {"result": "deny",
                                     "reason": "bad HTTP request"}, close=True)
                return
            if too_big:  # decide() says 413 (after the token check); the rest of the body is not read
                status, answer = decide(method, path, headers, bytes(body[:self.max_body + 1]) or
                                        b"x" * (self.max_body + 1), authenticator=self._authenticator,
                                        token=self._token, max_body=self.max_body)
                await self._send(conn, writer, status, answer, close=True)
                return
            status, answer = decide(method, path, headers, bytes(body), authenticator=self._authenticator,
                                    token=self._token, max_body=self.max_body)
            await self._send(conn, writer, status, answer)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
